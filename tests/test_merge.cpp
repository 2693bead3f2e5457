// SPDX-License-Identifier: MIT
// Model merging (merge.hpp) and sharded checkpoints (sharded_checkpoint.hpp): each method against
// its formula on small tensors, worked out by hand here (the papers' and mergekit's definitions,
// not polyak's code), with the edge cases the definitions fix; files and shards streamed to the same
// bytes as the in-memory merge; hostile inputs refused with nothing written.
#include "polyak/merge.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>  // getpid

namespace {

using polyak::MergeMethod;
using polyak::MergeOptions;
using polyak::StateDict;

StateDict one(const std::vector<float>& x, const std::string& name = "w") {
  StateDict sd;
  sd.insert(name, x.data(), {static_cast<std::int64_t>(x.size())});
  return sd;
}

std::vector<double> merged(const std::vector<StateDict>& models, const StateDict* base, const MergeOptions& o,
                           const std::string& name = "w") {
  std::vector<const StateDict*> inputs;
  for (const auto& m : models) inputs.push_back(&m);
  return polyak::to_doubles(polyak::merge_state_dicts(inputs, base, o).at(name));
}

MergeOptions with(MergeMethod method) {
  MergeOptions o;
  o.method = method;
  return o;
}

std::string folder_for(const std::string& name) {
  const std::string folder = "polyak_merge_" + std::to_string(::getpid()) + "_" + name;
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  return folder;
}

std::string file_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

}  // namespace

TEST_CASE("average and task arithmetic are their formulas", "[merge]") {
  const std::vector<StateDict> models{one({1, 2, 3}), one({3, 2, 1}), one({2, 6, 2})};
  MergeOptions average = with(MergeMethod::Average);
  CHECK(merged(models, nullptr, average) == std::vector<double>{2, 10.0f / 3, 2});
  average.weights = {1, 2, 1};  // (1*1 + 2*3 + 1*2) / 4 = 2.25, ...
  CHECK(merged(models, nullptr, average) == std::vector<double>{2.25, 3, 1.75});
  const StateDict base = one({1, 1, 1});
  MergeOptions arithmetic = with(MergeMethod::TaskArithmetic);
  arithmetic.scale = 0.5;  // 1 + 0.5 (0 + 2 + 1), 1 + 0.5 (1 + 1 + 5), 1 + 0.5 (2 + 0 + 1)
  CHECK(merged(models, &base, arithmetic) == std::vector<double>{2.5, 4.5, 2.5});
}

TEST_CASE("TIES: trim, elect sign (ties go to +), disjoint mean", "[merge][ties]") {
  const StateDict base = one({0, 0, 0, 0});
  const std::vector<StateDict> models{one({3, -1, 0.5, -2}), one({-2, 4, 0.5, -1}), one({1, -3, -0.25, 2})};
  MergeOptions ties = with(MergeMethod::Ties);
  ties.density = 0.5;  // two of four kept: {3, -2}, {-2, 4}, {-3, 2}
  // Elected signs from the trimmed sums 1, 1, 0, 0: +, +, + (a tie), + (a tie). Element 2: no model
  // keeps it, the base stays; element 3: only the third agrees with +.
  CHECK(merged(models, &base, ties) == std::vector<double>{3, 4, 0, 2});
  ties.density = 1.0;  // nothing trimmed: sums 2, 0, 0.75, -1: +, + (tie), +, -
  CHECK(merged(models, &base, ties) == std::vector<double>{2, 4, 0.5, -1.5});
  ties.density = 0.0;  // everything trimmed: the base
  CHECK(merged(models, &base, ties) == std::vector<double>{0, 0, 0, 0});
  ties.density = 0.5;  // equal magnitudes at the threshold: the first ones in position order are kept
  CHECK(merged({one({1, 1, 1, 1})}, &base, ties) == std::vector<double>{1, 1, 0, 0});
  ties.density = 1.0;  // weights weigh the election and the mean: element 1 elects - (4 * 1 < 3 * 2)
  ties.weights = {1, 1, 2};
  CHECK(merged(models, &base, ties)[1] == Approx((-1 * 1 + -3 * 2) / 3.0));
}

TEST_CASE("TIES keeps exactly floor(density n) scalars across streamed pieces", "[merge][ties]") {
  // 200,000 scalars (pieces of 65,536): magnitudes 1, 2, 3, 4 repeating; density 0.3 keeps 60,000:
  // all 50,000 fours and the first 10,000 threes, whatever piece they fall in.
  const std::size_t n = 200000;
  std::vector<float> x(n), zero(n, 0.0f);
  for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<float>(i % 4 + 1);
  MergeOptions ties = with(MergeMethod::Ties);
  ties.density = 0.3;
  const StateDict base = one(zero);
  const auto result = merged({one(x)}, &base, ties);
  std::size_t fours = 0, threes = 0, last_three = 0;
  for (std::size_t i = 0; i < n; ++i) {
    fours += result[i] == 4;
    if (result[i] == 3) {
      ++threes;
      last_three = i;
    }
    if (x[i] < 3) REQUIRE(result[i] == 0);
  }
  CHECK(fours == 50000);
  CHECK(threes == 10000);
  CHECK(last_three == 4 * 9999 + 2);  // the 10,000th three
}

TEST_CASE("DARE: drop 0 is task arithmetic; drops are seeded and rescale", "[merge][dare]") {
  const StateDict base = one({1, 1, 1});
  const std::vector<StateDict> models{one({2, 3, 4}), one({0, 1, 5})};
  MergeOptions dare = with(MergeMethod::Dare);
  MergeOptions arithmetic = with(MergeMethod::TaskArithmetic);
  CHECK(merged(models, &base, dare) == merged(models, &base, arithmetic));

  const std::size_t n = 100000;
  const StateDict zeros = one(std::vector<float>(n, 0.0f)), ones = one(std::vector<float>(n, 1.0f));
  dare.drop = 0.5;
  dare.seed = 7;
  const auto a = merged({ones}, &zeros, dare);
  double mean = 0;
  for (const double v : a) {
    REQUIRE((v == 0.0 || v == 2.0));  // dropped, or kept and rescaled by 1 / (1 - 0.5)
    mean += v / static_cast<double>(n);
  }
  CHECK(std::abs(mean - 1.0) < 5.0 / std::sqrt(static_cast<double>(n)));  // E = 1, sd of the mean 1/sqrt(n)
  CHECK(merged({ones}, &zeros, dare) == a);                               // the same seed: the same drops
  dare.seed = 8;
  CHECK(merged({ones}, &zeros, dare) != a);
}

TEST_CASE("SLERP: the arc between two tensors; parallel, opposite or zero ones linearly", "[merge][slerp]") {
  MergeOptions slerp = with(MergeMethod::Slerp);
  const auto half = merged({one({1, 0}), one({0, 1})}, nullptr, slerp);
  CHECK(half[0] == Approx(std::sqrt(0.5)).epsilon(1e-7));
  CHECK(half[1] == Approx(std::sqrt(0.5)).epsilon(1e-7));
  slerp.t = 1.0 / 3;  // a third of the way along the quarter circle: 30 degrees
  const auto third = merged({one({2, 0}), one({0, 2})}, nullptr, slerp);
  CHECK(third[0] == Approx(2 * std::cos(M_PI / 6)).epsilon(1e-6));
  CHECK(third[1] == Approx(2 * std::sin(M_PI / 6)).epsilon(1e-6));
  slerp.t = 0.25;
  CHECK(merged({one({1, 2}), one({2, 4})}, nullptr, slerp) == std::vector<double>{1.25, 2.5});   // parallel
  CHECK(merged({one({1, 2}), one({-1, -2})}, nullptr, slerp) == std::vector<double>{0.5, 1.0});  // opposite
  CHECK(merged({one({0, 0}), one({4, 8})}, nullptr, slerp) == std::vector<double>{1, 2});        // zero
  slerp.t = 0;
  CHECK(merged({one({1, 0}), one({0, 1})}, nullptr, slerp) == std::vector<double>{1, 0});
}

TEST_CASE("bf16 stays bf16, computed in double and rounded once", "[merge]") {
  StateDict a, b;
  const Eigen::bfloat16 x[2] = {Eigen::bfloat16(1.0f), Eigen::bfloat16(1.0f)};
  const Eigen::bfloat16 y[2] = {Eigen::bfloat16(1.0078125f),
                                Eigen::bfloat16(2.0f)};  // 1 + 2^-7: one bf16 ulp
  a.insert("w", x, {2});
  b.insert("w", y, {2});
  MergeOptions average = with(MergeMethod::Average);
  const StateDict m = polyak::merge_state_dicts({&a, &b}, nullptr, average);
  CHECK(m.at("w").dtype == polyak::DType::BF16);
  // 1.00390625 is halfway between two bf16 values: rounds to even, 1.0; 1.5 is exact.
  CHECK(polyak::to_doubles(m.at("w")) == std::vector<double>{1.0, 1.5});
}

TEST_CASE("merging files streams to the bytes of the in-memory merge, for one file and for shards",
          "[merge][sharded]") {
  const std::string folder = folder_for("files");
  StateDict a, b, base;
  std::vector<float> big(150000);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = std::sin(static_cast<float>(i));
  a.insert("layer.weight", big.data(), {300, 500});
  for (auto& v : big) v = v * 0.5f + 0.25f;
  b.insert("layer.weight", big.data(), {300, 500});
  for (auto& v : big) v = 0.1f;
  base.insert("layer.weight", big.data(), {300, 500});
  for (StateDict* sd : {&a, &b, &base}) {
    const float bias[3] = {1, 2, 3};
    sd->insert("layer.bias", bias, {3});
    sd->insert_scalar<std::int64_t>("step", sd == &b ? 9 : 4);
  }
  polyak::save_safetensors(folder + "/a.safetensors", a);
  polyak::save_safetensors(folder + "/b.safetensors", b);
  polyak::save_safetensors(folder + "/base.safetensors", base);
  for (const auto method : {MergeMethod::Average, MergeMethod::Ties, MergeMethod::Dare, MergeMethod::Slerp}) {
    CAPTURE(polyak::merge_method_name(method));
    MergeOptions o = with(method);
    if (method == MergeMethod::Ties) o.density = 0.4;
    if (method == MergeMethod::Dare) o.drop = 0.3;
    const bool needs_base = polyak::merge_needs_base(method);
    const std::string out = folder + "/out.safetensors";
    polyak::merge_checkpoints({folder + "/a.safetensors", folder + "/b.safetensors"},
                              needs_base ? folder + "/base.safetensors" : "", o, out);
    const StateDict from_file = polyak::load_safetensors(out);
    const StateDict in_memory = polyak::merge_state_dicts({&a, &b}, needs_base ? &base : nullptr, o);
    REQUIRE(from_file.size() == in_memory.size());
    for (const auto& [name, tensor] : in_memory) CHECK(from_file.at(name).bytes == tensor.bytes);
    CHECK(from_file.scalar<std::int64_t>("step") == 9);  // a counter: the last model's
    CHECK(from_file.metadata.at("merge_method") == polyak::merge_method_name(method));
  }

  // The same models as Hugging Face shards: two shards each, an index; the output is laid out alike.
  for (const std::string model : {"a", "b"}) {
    const StateDict& sd = model == "a" ? a : b;
    const std::string dir = folder + "/sharded_" + model;
    std::filesystem::create_directories(dir);
    StateDict first, second;
    first.insert("layer.weight", sd.at("layer.weight").owned());
    second.insert("layer.bias", sd.at("layer.bias").owned());
    second.insert("step", sd.at("step").owned());
    polyak::save_safetensors(dir + "/model-00001-of-00002.safetensors", first);
    polyak::save_safetensors(dir + "/model-00002-of-00002.safetensors", second);
    write_text(
        dir + "/model.safetensors.index.json",
        R"({"metadata": {"total_size": 600020}, "weight_map": {"layer.weight": "model-00001-of-00002.safetensors", )"
        R"("layer.bias": "model-00002-of-00002.safetensors", "step": "model-00002-of-00002.safetensors"}})");
  }
  const std::string out = folder + "/sharded_out";
  polyak::merge_checkpoints({folder + "/sharded_a", folder + "/sharded_b/model.safetensors.index.json"}, "",
                            with(MergeMethod::Average), out);
  polyak::CheckpointReader merged_shards(out);
  CHECK(merged_shards.sharded());
  CHECK(merged_shards.shards() ==
        std::vector<std::string>{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"});
  const StateDict in_memory = polyak::merge_state_dicts({&a, &b}, nullptr, with(MergeMethod::Average));
  for (const auto& tensor : merged_shards.tensors())
    CHECK(merged_shards.read(tensor).bytes == in_memory.at(tensor.name).owned().bytes);
  CHECK(file_text(out + "/model.safetensors.index.json").find("\"total_size\": 600020") != std::string::npos);
  std::filesystem::remove_all(folder);
}

TEST_CASE("merges refuse inputs and options that do not fit, and write nothing", "[merge][adversarial]") {
  const std::string folder = folder_for("refusals");
  const StateDict a = one({1, 2}), wide = one({1, 2, 3}), other = one({1, 2}, "v");
  polyak::save_safetensors(folder + "/a.safetensors", a);
  polyak::save_safetensors(folder + "/wide.safetensors", wide);
  polyak::save_safetensors(folder + "/other.safetensors", other);
  const std::string out = folder + "/out.safetensors";
  const auto refused = [&](const std::vector<std::string>& inputs, const std::string& base,
                           const MergeOptions& o, const std::string& fragment) {
    CAPTURE(fragment);
    CHECK_THROWS_WITH(polyak::merge_checkpoints(inputs, base, o, out), Catch::Contains(fragment));
    CHECK_FALSE(std::filesystem::exists(out));
  };
  const std::string A = folder + "/a.safetensors";
  refused({A, folder + "/wide.safetensors"}, "", with(MergeMethod::Average), "tensor 'w' is F32 [3] in");
  refused({A, folder + "/other.safetensors"}, "", with(MergeMethod::Average), "has no tensor 'w'");
  refused({A, A}, "", with(MergeMethod::Ties), "ties needs a base model");
  refused({A, A}, A, with(MergeMethod::Average), "average takes no base model");
  refused({A, A, A}, "", with(MergeMethod::Slerp), "slerp merges two models, not 3");
  MergeOptions o = with(MergeMethod::Ties);
  o.density = 1.5;
  refused({A}, A, o, "density");
  o = with(MergeMethod::Dare);
  o.drop = 1.0;
  refused({A}, A, o, "drop");
  o = with(MergeMethod::Average);
  o.weights = {0, 0};
  refused({A, A}, "", o, "all 0");
  o.weights = {1};
  refused({A, A}, "", o, "1 weights for 2 models");
  o.weights = {1, std::nan("")};
  refused({A, A}, "", o, "not finite");
  o = with(MergeMethod::Ties);
  o.weights = {1, -1};
  refused({A, A}, A, o, "ties weights must be > 0");
  refused({A, folder + "/missing.safetensors"}, "", with(MergeMethod::Average), "cannot open");
  std::filesystem::remove_all(folder);
}

TEST_CASE("a sharded checkpoint's index is checked before anything is read",
          "[merge][sharded][adversarial]") {
  const std::string folder = folder_for("index");
  polyak::save_safetensors(folder + "/s1.safetensors", one({1, 2}, "w"));
  StateDict two = one({3}, "b");
  two.insert("extra", std::vector<float>{1}.data(), {1});
  polyak::save_safetensors(folder + "/s2.safetensors", two);
  polyak::save_safetensors(folder + "/dup.safetensors", one({5}, "w"));
  const std::string index = folder + "/model.safetensors.index.json";
  const auto refused = [&](const std::string& text, const std::string& fragment) {
    CAPTURE(text);
    write_text(index, text);
    CHECK_THROWS_AS(polyak::CheckpointReader(folder), polyak::FormatError);
    CHECK_THROWS_WITH(polyak::CheckpointReader(folder), Catch::Contains(fragment));
  };
  refused("[1, 2]", "does not start with '{'");
  refused(R"({"metadata": {}})", "weight_map");
  refused(R"({"weight_map": {"w": 3}})", "is not a string");
  refused(R"({"weight_map": {"w": "../s1.safetensors"}})", "not a plain file name");
  refused(R"({"weight_map": {"w": "/etc/passwd"}})", "not a plain file name");
  refused(R"({"weight_map": {}})", "names no tensor");
  refused(R"({"weight_map": {"w": "s1.safetensors", "q": "s1.safetensors"}})", "'q' is not in its shard");
  refused(R"({"weight_map": {"w": "s1.safetensors", "b": "s2.safetensors"}})",
          "which the weight_map does not name");
  refused(R"({"weight_map": {"w": "s1.safetensors", "x": "dup.safetensors"}})", "in two shards");
  refused(R"({"weight_map": {"w": "s1.safetensors", "w": "s1.safetensors"}})", "appears twice");
  refused(R"({"weight_map": {"w": "nowhere.safetensors"}})", "cannot open");
  std::filesystem::remove_all(folder);
}

TEST_CASE("a greedy soup takes a candidate only when the soup does not get worse", "[merge][soup]") {
  const std::string folder = folder_for("soup");
  // Candidates best first; the score is -|w - 2| with w the soup's one value.
  const std::vector<float> values{2.5f, 1.5f, 6.0f, 2.0f};
  std::vector<std::string> paths;
  for (std::size_t i = 0; i < values.size(); ++i) {
    paths.push_back(folder + "/c" + std::to_string(i) + ".safetensors");
    polyak::save_safetensors(paths.back(), one({values[i]}));
  }
  const auto score = [](const StateDict& soup) {
    return -std::abs(polyak::to_doubles(soup.at("w"))[0] - 2.0);
  };
  const polyak::GreedySoup soup = polyak::greedy_soup(paths, score);
  // {2.5}: -0.5; + 1.5 -> 2.0: 0, taken; + 6 -> 3.33: worse, not; + 2 -> 2.0: as good, taken.
  CHECK(soup.ingredients == std::vector<std::size_t>{0, 1, 3});
  CHECK(polyak::to_doubles(soup.soup.at("w"))[0] == 2.0);
  CHECK(soup.score == 0.0);
  std::filesystem::remove_all(folder);
}
