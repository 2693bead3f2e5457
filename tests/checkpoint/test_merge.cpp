// SPDX-License-Identifier: MIT
// Model merging (merge.hpp) and sharded checkpoints (sharded_checkpoint.hpp): each method against
// its formula on small tensors, worked out by hand here (the papers' and mergekit's definitions,
// not polyak's code), with the edge cases the definitions fix; files and shards streamed to the same
// bytes as the in-memory merge; hostile inputs refused with nothing written.
#include "polyak/checkpoint/merge.hpp"

#include "support.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <cmath>
#include <limits>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <sys/stat.h>  // mkfifo

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

/// A fresh folder of this test process's own.
std::string folder_for(const std::string& name) {
  const std::string folder = polyak_test::temporary_path("merge_" + name);
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  return folder;
}

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

TEST_CASE("DARE: drop 0 is task arithmetic, drops are seeded and rescale", "[merge][dare]") {
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

TEST_CASE("SLERP: the arc between two tensors, parallel, opposite or zero ones linearly", "[merge][slerp]") {
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
    CAPTURE(polyak::to_string(method));
    MergeOptions o = with(method);
    if (method == MergeMethod::Ties) o.density = 0.4;
    if (method == MergeMethod::Dare) o.drop = 0.3;
    const bool needs_base = polyak::needs_base(method);
    const std::string out = folder + "/out.safetensors";
    polyak::merge_checkpoints({folder + "/a.safetensors", folder + "/b.safetensors"},
                              needs_base ? folder + "/base.safetensors" : "", o, out);
    const StateDict from_file = polyak::load_safetensors(out);
    const StateDict in_memory = polyak::merge_state_dicts({&a, &b}, needs_base ? &base : nullptr, o);
    REQUIRE(from_file.size() == in_memory.size());
    for (const auto& [name, tensor] : in_memory) CHECK(from_file.at(name).bytes == tensor.bytes);
    CHECK(from_file.scalar<std::int64_t>("step") == 9);  // a counter: the last model's
    CHECK(from_file.metadata.at("merge_method") == polyak::to_string(method));
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
    polyak_test::write_file(
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
  CHECK(polyak_test::file_bytes(out + "/model.safetensors.index.json").find("\"total_size\": 600020") !=
        std::string::npos);
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
  o.weights = {1, std::numeric_limits<double>::infinity()};
  refused({A, A}, A, o, "not finite");
  refused({A, folder + "/missing.safetensors"}, "", with(MergeMethod::Average), "cannot open");
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

// Issue 21: what the second adversarial sweep found on the merge paths.

namespace {

/// A sharded checkpoint in `dir`: "w" (n floats equal to `value`) in shard 1, "b" (3 floats) and
/// "step" in shard 2, each shard with {"format": "pt"} as transformers writes it.
void sharded_model(const std::string& dir, float value, std::size_t n = 1000) {
  std::filesystem::create_directories(dir);
  std::vector<float> w(n, value), b(3, value);
  StateDict first, second;
  first.insert("w", w.data(), {static_cast<std::int64_t>(n)});
  second.insert("b", b.data(), {3});
  second.insert_scalar<std::int64_t>("step", 7);
  first.metadata["format"] = second.metadata["format"] = "pt";
  polyak::save_safetensors(dir + "/model-00001-of-00002.safetensors", first);
  polyak::save_safetensors(dir + "/model-00002-of-00002.safetensors", second);
  polyak_test::write_file(
      dir + "/model.safetensors.index.json",
      R"({"metadata": {"total_size": 1}, "weight_map": {"w": "model-00001-of-00002.safetensors", )"
      R"("b": "model-00002-of-00002.safetensors", "step": "model-00002-of-00002.safetensors"}})");
}

}  // namespace

TEST_CASE("sharded outputs keep each shard's own metadata and the index's", "[merge][sharded]") {
  polyak_test::TemporaryFolder folder("merge_metadata");
  sharded_model(folder / "a", 1.0f);
  sharded_model(folder / "b", 3.0f);
  polyak::merge_checkpoints({folder / "a", folder / "b"}, "", with(MergeMethod::Average), folder / "out");
  for (const std::string shard : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
    const auto metadata = polyak::read_safetensors_header(folder / ("out/" + shard)).metadata;
    CHECK(metadata.at("format") == "pt");  // without it, transformers' loader refuses the file
    CHECK(metadata.at("merge_method") == "average");
  }
  const std::string index = polyak_test::file_bytes(folder / "out/model.safetensors.index.json");
  CHECK(index.find("\"total_size\": 4020") != std::string::npos);  // 1003 floats and one int64
  CHECK(index.find("\"merge_method\": \"average\"") != std::string::npos);
  polyak::CheckpointReader merged(folder / "out");
  CHECK(polyak::to_doubles(merged.read(*merged.find("w")))[0] == 2.0);
}

TEST_CASE("TIES ranks F64 task values in double: values float would round together still rank",
          "[merge][ties]") {
  // Two task values a tensor, density 0.5: one is kept, the larger. In float, 1 and 1 + 1e-12 (and
  // 1e300 and 2e300, both inf) tie and the first by position was kept.
  for (const auto& [small, large] :
       std::vector<std::pair<double, double>>{{1.0, 1.0 + 1e-12}, {1e300, 2e300}, {-1.0, -(1.0 + 1e-12)}}) {
    CAPTURE(small, large);
    const double values[2] = {small, large};
    StateDict model, base;
    model.insert("w", values, {2});
    const double zeros[2] = {0, 0};
    base.insert("w", zeros, {2});
    MergeOptions o = with(MergeMethod::Ties);
    o.density = 0.5;
    const auto m = polyak::to_doubles(polyak::merge_state_dicts({&model}, &base, o).at("w"));
    CHECK(m == std::vector<double>{0.0, large});
  }
}

TEST_CASE("a merge refuses every setting its method does not use, and DARE takes mergekit's density",
          "[merge][adversarial]") {
  const StateDict a = one({1, 2}), b = one({3, 5}), base = one({0, 0});
  const auto refused = [&](MergeOptions o, const StateDict* with_base, const std::string& fragment) {
    CAPTURE(polyak::to_string(o.method), fragment);
    CHECK_THROWS_WITH(polyak::merge_state_dicts({&a, &b}, with_base, o), Catch::Contains(fragment));
  };
  MergeOptions o = with(MergeMethod::Average);
  o.density = 0.1;
  refused(o, nullptr, "density is not a setting of average");
  o = with(MergeMethod::Average);
  o.t = 0.3;
  refused(o, nullptr, "t is not a setting of average");
  o = with(MergeMethod::Slerp);
  o.scale = 2;
  refused(o, nullptr, "scale is not a setting of slerp");
  o = with(MergeMethod::Slerp);
  o.weights = {1, 2};
  refused(o, nullptr, "weights is not a setting of slerp");
  o = with(MergeMethod::Ties);
  o.drop = 0.5;
  refused(o, &base, "drop is not a setting of ties");
  o = with(MergeMethod::Ties);
  o.seed = 3;
  refused(o, &base, "seed is not a setting of ties");
  o = with(MergeMethod::TaskArithmetic);
  o.density = 0.5;
  refused(o, &base, "density is not a setting of task_arithmetic");
  o = with(MergeMethod::Dare);
  o.density = 0.5;
  o.drop = 0.5;
  refused(o, &base, "not both");
  o = with(MergeMethod::Dare);
  o.density = 0;
  refused(o, &base, "dare's density must be in (0, 1]");

  // DARE with density d drops with probability 1 - d: the same bytes as drop 1 - d.
  MergeOptions by_density = with(MergeMethod::Dare), by_drop = with(MergeMethod::Dare);
  by_density.density = 0.25;
  by_drop.drop = 0.75;
  by_density.seed = by_drop.seed = 11;
  std::vector<float> big(4096);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i % 13) - 6;
  StateDict x;
  x.insert("w", big.data(), {4096});
  std::vector<float> zeros(4096, 0.0f);
  StateDict zero;
  zero.insert("w", zeros.data(), {4096});
  const auto kept = polyak::merge_state_dicts({&x}, &zero, by_density);
  CHECK(kept.at("w").bytes == polyak::merge_state_dicts({&x}, &zero, by_drop).at("w").bytes);
  const auto values = polyak::to_doubles(kept.at("w"));
  const auto nonzero = std::count_if(values.begin(), values.end(), [](double v) { return v != 0; });
  const auto candidates = std::count_if(big.begin(), big.end(), [](float v) { return v != 0; });
  // Binomial(candidates, 0.25): within 5 standard deviations.
  const double mean = 0.25 * static_cast<double>(candidates), sd = std::sqrt(mean * 0.75);
  CHECK(std::abs(static_cast<double>(nonzero) - mean) < 5 * sd);

  // Task arithmetic takes negative weights (task negation).
  o = with(MergeMethod::TaskArithmetic);
  o.weights = {-1, 1};
  CHECK(polyak::to_doubles(polyak::merge_state_dicts({&a, &b}, &base, o).at("w")) ==
        std::vector<double>{2, 3});
}

TEST_CASE("a merge never writes over its inputs: OUT is compared by identity with every file it reads",
          "[merge][sharded][adversarial]") {
  polyak_test::TemporaryFolder folder("merge_identity");
  sharded_model(folder / "a", 1.0f);
  sharded_model(folder / "b", 3.0f);
  const std::string index = folder / "a/model.safetensors.index.json";
  const std::string shard = folder / "a/model-00001-of-00002.safetensors";
  std::filesystem::create_directory_symlink(folder / "a", folder / "link_to_a");
  std::filesystem::create_hard_link(shard, folder / "hard_link_to_shard.safetensors");
  const std::string before_index = polyak_test::file_bytes(index),
                    before_shard = polyak_test::file_bytes(shard);
  const auto refused = [&](const std::string& out, const std::vector<std::string>& inputs) {
    CAPTURE(out);
    CHECK_THROWS_WITH(polyak::merge_checkpoints(inputs, "", with(MergeMethod::Average), out),
                      Catch::Contains("which writing it would destroy"));
    CHECK(polyak_test::file_bytes(index) == before_index);
    CHECK(polyak_test::file_bytes(shard) == before_shard);
  };
  const std::vector<std::string> inputs{folder / "a", folder / "b"};
  refused(folder / "a", inputs);                                     // the input's folder
  refused(folder / "a/", inputs);                                    // spelled with a slash
  refused(index, inputs);                                            // its index
  refused(shard, inputs);                                            // one of its shards
  refused(folder / "link_to_a", inputs);                             // a link to it
  refused(folder / "hard_link_to_shard.safetensors", inputs);        // another name of a shard
  refused(folder.path(), inputs);                                    // a folder above it
  refused(folder / "a/../a", {folder / "link_to_a", folder / "b"});  // the input given by a link
  CHECK(polyak::CheckpointReader(folder / "a").tensors().size() == 3);
}

TEST_CASE("a folder output replaces a merge folder whole, and refuses a folder holding other files",
          "[merge][sharded][adversarial]") {
  polyak_test::TemporaryFolder folder("merge_replace");
  sharded_model(folder / "a", 1.0f);
  sharded_model(folder / "b", 3.0f);
  const std::string out = folder / "out";
  // An older output with a third shard that the new layout does not have: it must not survive.
  std::filesystem::create_directories(out);
  polyak_test::write_file(out + "/model-00003-of-00003.safetensors", "stale");
  polyak_test::write_file(out + "/model.safetensors.index.json",
                          R"({"weight_map": {"x": "model-00003-of-00003.safetensors"}})");
  polyak::merge_checkpoints({folder / "a", folder / "b"}, "", with(MergeMethod::Average), out);
  CHECK_FALSE(std::filesystem::exists(out + "/model-00003-of-00003.safetensors"));
  CHECK(polyak::CheckpointReader(out).shards().size() == 2);
  std::size_t entries = 0;
  for (const auto& entry : std::filesystem::directory_iterator(folder.path())) {
    CHECK(entry.path().filename().string().find(".tmp.") == std::string::npos);  // no temporary left
    ++entries;
  }
  CHECK(entries == 3);

  // A folder with a file of the user's in it is refused, and kept as it was.
  const std::string mine = folder / "mine";
  std::filesystem::create_directories(mine);
  polyak_test::write_file(mine + "/notes.txt", "keep me");
  CHECK_THROWS_WITH(
      polyak::merge_checkpoints({folder / "a", folder / "b"}, "", with(MergeMethod::Average), mine),
      Catch::Contains("holds 'notes.txt'"));
  CHECK(polyak_test::file_bytes(mine + "/notes.txt") == "keep me");
  // Found by the hostile pass: files that merely look like checkpoints are the user's too: a folder of
  // them without an index, or with an index that does not name them all, is refused and kept.
  const std::string runs = folder / "runs";
  std::filesystem::create_directories(runs);
  polyak_test::write_file(runs + "/run7_best.safetensors", "keep me");
  CHECK_THROWS_WITH(
      polyak::merge_checkpoints({folder / "a", folder / "b"}, "", with(MergeMethod::Average), runs),
      Catch::Contains("holds 'run7_best.safetensors' and no model.safetensors.index.json"));
  polyak_test::write_file(runs + "/model.safetensors.index.json",
                          R"({"weight_map": {"w": "model-1.safetensors"}})");
  polyak_test::write_file(runs + "/model-1.safetensors", "x");
  CHECK_THROWS_WITH(
      polyak::merge_checkpoints({folder / "a", folder / "b"}, "", with(MergeMethod::Average), runs),
      Catch::Contains("holds 'run7_best.safetensors', which its model.safetensors.index.json does not name"));
  CHECK(polyak_test::file_bytes(runs + "/run7_best.safetensors") == "keep me");
  // ... and what is not a regular file (a FIFO, /dev/null) is never replaced by one.
  REQUIRE(::mkfifo((folder / "fifo").c_str(), 0600) == 0);
  polyak::save_safetensors(folder / "x.safetensors", one({1, 2}));
  CHECK_THROWS_WITH(polyak::merge_checkpoints({folder / "x.safetensors", folder / "x.safetensors"}, "",
                                              with(MergeMethod::Average), folder / "fifo"),
                    Catch::Contains("is not a regular file"));
  CHECK(std::filesystem::is_fifo(folder / "fifo"));
  CHECK_THROWS_WITH(polyak::save_safetensors(folder / "fifo", one({1, 2})),
                    Catch::Contains("is not a regular file"));
  CHECK(std::filesystem::is_fifo(folder / "fifo"));
  // A file where the output is a folder, a folder where it is a file: refused, kept.
  polyak_test::write_file(folder / "file", "a file");
  CHECK_THROWS_WITH(polyak::merge_checkpoints({folder / "a", folder / "b"}, "", with(MergeMethod::Average),
                                              folder / "file"),
                    Catch::Contains("is a file"));
  CHECK(polyak_test::file_bytes(folder / "file") == "a file");
  CHECK_THROWS_WITH(polyak::merge_checkpoints({folder / "x.safetensors", folder / "x.safetensors"}, "",
                                              with(MergeMethod::Average), mine),
                    Catch::Contains("is a folder, and this output is one file"));
  for (const std::string bad : {".", "..", "/", ""}) {
    CAPTURE(bad);
    CHECK_THROWS_AS(
        polyak::merge_checkpoints({folder / "a", folder / "b"}, "", with(MergeMethod::Average), bad),
        std::invalid_argument);
  }
}

TEST_CASE("a merge whose values overflow their dtype from finite inputs is refused, not written as inf",
          "[merge][adversarial]") {
  const StateDict a = one({1, 2}), b = one({3, 5}), base = one({0, 0});
  MergeOptions o = with(MergeMethod::TaskArithmetic);
  o.scale = 1e39;  // finite, and 1e39 * 5 is past float's 3.4e38
  CHECK_THROWS_WITH(polyak::merge_state_dicts({&a, &b}, &base, o), Catch::Contains("beyond F32's range"));
  const double big[1] = {1e308};
  StateDict wide, zero;
  wide.insert("w", big, {1});
  const double nothing[1] = {0};
  zero.insert("w", nothing, {1});
  o.scale = 1e308;
  o.weights = {1e308};
  CHECK_THROWS_WITH(polyak::merge_state_dicts({&wide}, &zero, o), Catch::Contains("beyond F64's range"));
  // An input that holds inf already: the merge carries it, as PyTorch's arithmetic would.
  const float infinite[2] = {std::numeric_limits<float>::infinity(), 1};
  StateDict with_inf;
  with_inf.insert("w", infinite, {2});
  CHECK(std::isinf(polyak::to_doubles(
      polyak::merge_state_dicts({&with_inf, &a}, nullptr, with(MergeMethod::Average)).at("w"))[0]));
}

TEST_CASE(
    "second hostile pass: shards that change under a reader, a file added to OUT during a merge, "
    "NaN, dtype rounding, hostile index names",
    "[merge][sharded][adversarial]") {
  polyak_test::TemporaryFolder folder("merge_second_pass");
  SECTION("a closed shard deleted and made again is refused, not read mixed") {
    const std::string dir = folder / "many";
    std::filesystem::create_directories(dir);
    std::string weight_map;
    const std::size_t shards = polyak::CheckpointReader::max_open_shards + 4;
    for (std::size_t s = 0; s < shards; ++s) {
      const std::string file = "shard-" + std::to_string(s) + ".safetensors";
      polyak::save_safetensors(dir + "/" + file, one({1, 2}, "t" + std::to_string(s)));
      weight_map += std::string(s == 0 ? "" : ", ") + "\"t" + std::to_string(s) + "\": \"" + file + "\"";
    }
    polyak_test::write_file(dir + "/model.safetensors.index.json", "{\"weight_map\": {" + weight_map + "}}");
    polyak::CheckpointReader reader(dir);
    // shard-0 was the first opened and is closed now; it is made again (ext4 may give it its inode).
    std::filesystem::remove(dir + "/shard-0.safetensors");
    polyak::save_safetensors(dir + "/shard-0.safetensors", one({7, 7}, "t0"));
    CHECK_THROWS_WITH(reader.read(*reader.find("t0")), Catch::Contains("changed or went since"));
    CHECK(polyak::to_doubles(reader.read(*reader.find("t19"))) == std::vector<double>{1, 2});  // still open
  }
  SECTION("a file of the user's added to OUT while a merge writes it survives") {
    sharded_model(folder / "a", 1.0f, 1 << 20);
    sharded_model(folder / "b", 3.0f, 1 << 20);
    const std::string out = folder / "out";
    polyak::merge_checkpoints({folder / "a", folder / "b"}, "", with(MergeMethod::Average), out);
    for (int round = 0; round < 3; ++round) {
      std::filesystem::remove(out + "/config.json");
      std::atomic<bool> added{false};
      std::thread user([&] {  // copies config.json in as soon as the merge's temporary folder appears
        for (int wait = 0; wait < 20000 && !added; ++wait) {
          for (const auto& entry : std::filesystem::directory_iterator(folder.path())) {
            if (entry.path().filename().string().rfind("out.tmp.", 0) == 0) {
              polyak_test::write_file(out + "/config.json", "{}");
              added = true;
              break;
            }
          }
        }
      });
      try {
        polyak::merge_checkpoints({folder / "a", folder / "b"}, "", with(MergeMethod::Average), out);
      } catch (const std::invalid_argument& e) {
        CHECK_THAT(e.what(), Catch::Contains("config.json"));
      }
      user.join();
      if (added) CHECK(polyak_test::file_bytes(out + "/config.json") == "{}");
    }
  }
  SECTION("NaN is carried by TIES as by arithmetic; F16 rounded once, and refused at its edge") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const StateDict x = one({nan, 2}), y = one({1, 3}), zero = one({0, 0});
    MergeOptions ties = with(MergeMethod::Ties);
    ties.density = 0.5;
    const auto merged = polyak::to_doubles(polyak::merge_state_dicts({&x, &y}, &zero, ties).at("w"));
    CHECK(std::isnan(merged[0]));
    const Eigen::half h[1] = {Eigen::half(1.0f)};
    StateDict half_model, half_zero;
    half_model.insert("w", h, {1});
    const Eigen::half h0[1] = {Eigen::half(0.0f)};
    half_zero.insert("w", h0, {1});
    MergeOptions arithmetic = with(MergeMethod::TaskArithmetic);
    arithmetic.scale = 65519.999;  // below F16's rounding edge, 65520: rounded once, F16's largest
    CHECK(polyak::to_doubles(polyak::merge_state_dicts({&half_model}, &half_zero, arithmetic).at("w"))[0] ==
          65504);  // (through float it was 65520, infinity: issue 24's hostile pass made it round once)
    arithmetic.scale = 65520;  // the edge itself: infinity, refused
    CHECK_THROWS_WITH(polyak::merge_state_dicts({&half_model}, &half_zero, arithmetic),
                      Catch::Contains("beyond F16's range"));
  }
  SECTION(
      "an index naming a shard with a NUL, or nesting deep, is refused; a header error names its tensor") {
    polyak::save_safetensors(folder / "s1.safetensors", one({1, 2}));
    polyak_test::write_file(folder / "model.safetensors.index.json",
                            R"({"weight_map": {"w": "s1.safetensors\u0000junk"}})");
    CHECK_THROWS_WITH(polyak::CheckpointReader(folder.path()), Catch::Contains("not a plain file name"));
    polyak_test::write_file(folder / "model.safetensors.index.json",
                            "{\"metadata\": {\"deep\": " + std::string(100, '[') + std::string(100, ']') +
                                "}, \"weight_map\": {}}");
    CHECK_THROWS_WITH(polyak::CheckpointReader(folder.path()),
                      Catch::Contains("nests deeper than 64 levels"));
    const std::string header = R"({"x":{"dtype":"Q8","shape":[2],"data_offsets":[0,8]}})";
    std::string bytes(8, '\0');
    for (int b = 0; b < 8; ++b)
      bytes[static_cast<std::size_t>(b)] = static_cast<char>(header.size() >> (8 * b));
    polyak_test::write_file(folder / "bad.safetensors", bytes + header + std::string(8, '\0'));
    CHECK_THROWS_WITH(polyak::load_safetensors(folder / "bad.safetensors"),
                      Catch::Contains("tensor 'x': unsupported dtype 'Q8'"));
  }
  SECTION("an output folder whose index names a file of the user's is not replaced") {
    const std::string out = folder / "notes_out";
    std::filesystem::create_directories(out);
    polyak_test::write_file(out + "/model.safetensors.index.json", R"({"weight_map": {"x": "notes.txt"}})");
    polyak_test::write_file(out + "/notes.txt", "keep me");
    polyak::save_safetensors(folder / "x.safetensors", one({1, 2}));
    sharded_model(folder / "a", 1.0f);
    CHECK_THROWS_WITH(
        polyak::merge_checkpoints({folder / "a", folder / "a"}, "", with(MergeMethod::Average), out),
        Catch::Contains("notes.txt"));
    CHECK(polyak_test::file_bytes(out + "/notes.txt") == "keep me");
  }
}
