// SPDX-License-Identifier: MIT
// Planned merges (merge_plan.hpp): each output tensor by its own method from named tensors of several
// checkpoints, renamed, converted to its output dtype once; shards split at a byte limit; refusals
// before anything is written.
#include "polyak/checkpoint/merge_plan.hpp"
#include "polyak/checkpoint/merge.hpp"

#include "support.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::string plan_folder(const std::string& name) {
  const std::string folder = polyak_test::temporary_path("plan_" + name);
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  return folder;
}

/// A checkpoint of tensors "a" (F32 {2}) and "n" (I64 scalar), a = {x, 2x}.
std::string two_tensors(const std::string& folder, const std::string& name, float x, std::int64_t n) {
  polyak::StateDict sd;
  const float a[2] = {x, 2 * x};
  sd.insert("a", a, {2});
  sd.insert_scalar<std::int64_t>("n", n);
  polyak::save_safetensors(folder + "/" + name, sd);
  return folder + "/" + name;
}

polyak::StateDict shard_of(const std::string& folder, std::size_t shard, std::size_t count) {
  return polyak::load_safetensors(folder + "/" + polyak::shard_file_name(shard, count));
}

}  // namespace

TEST_CASE("shards split where the next tensor would pass the limit", "[merge][plan]") {
  CHECK(polyak::shard_assignment({100, 100, 100}, 200) == std::vector<std::size_t>{0, 0, 1});
  CHECK(polyak::shard_assignment({300, 50, 50, 300}, 200) == std::vector<std::size_t>{0, 1, 1, 2});  // alone
  CHECK(polyak::shard_assignment({1, 1, 1}, 1) == std::vector<std::size_t>{0, 1, 2});
  CHECK(polyak::shard_file_name(0, 3) == "model-00001-of-00003.safetensors");
}

TEST_CASE("a plan merges each tensor by its own options, renamed, in its output dtype", "[merge][plan]") {
  const std::string folder = plan_folder("run");
  polyak::MergePlan plan;
  plan.checkpoints = {two_tensors(folder, "x.safetensors", 1, 5), two_tensors(folder, "y.safetensors", 3, 7),
                      two_tensors(folder, "b.safetensors", 0.5f, 9)};
  polyak::PlannedTensor average;  // {1, 2} and {3, 6}: {2, 4}, as BF16
  average.name = "model.layers.0.avg";
  average.dtype = polyak::DType::BF16;
  average.models = {{0, "a"}, {1, "a"}};
  polyak::PlannedTensor arithmetic;  // 0.5 + 2 (0.5) + 2 (2.5), ...: {6.5, 13}
  arithmetic.name = "model.layers.1.task";
  arithmetic.models = {{0, "a"}, {1, "a"}};
  arithmetic.base = polyak::TensorRef{2, "a"};
  arithmetic.options.method = polyak::MergeMethod::TaskArithmetic;
  arithmetic.options.scale = 2;
  polyak::PlannedTensor copied;  // passthrough of y's a, renamed
  copied.name = "copy";
  copied.models = {{1, "a"}};
  copied.options.method = polyak::MergeMethod::Passthrough;
  polyak::PlannedTensor counter;  // I64: the last model's
  counter.name = "n";
  counter.models = {{0, "n"}, {1, "n"}};
  plan.tensors = {average, arithmetic, copied, counter};
  plan.files["config.json"] = "{}";
  plan.files["mergekit_config.yml"] = "merge_method: linear\n";
  plan.index_metadata["merge_method"] = "mixed";
  const std::string out = folder + "/out";
  polyak::run_merge_plan(plan, out, 1 << 20);
  const polyak::StateDict merged = shard_of(out, 0, 1);
  CHECK(merged.at("model.layers.0.avg").dtype == polyak::DType::BF16);
  CHECK(polyak::to_doubles(merged.at("model.layers.0.avg")) == std::vector<double>{2, 4});
  CHECK(polyak::to_doubles(merged.at("model.layers.1.task")) == std::vector<double>{6.5, 13});
  CHECK(polyak::to_doubles(merged.at("copy")) == std::vector<double>{3, 6});
  CHECK(merged.scalar<std::int64_t>("n") == 7);
  CHECK(merged.metadata.at("format") == "pt");
  const polyak::CheckpointReader reader(out);
  CHECK(reader.tensors().size() == 4);
  CHECK(reader.metadata().at("merge_method") == "mixed");
  std::ifstream config(out + "/config.json");
  std::string text;
  std::getline(config, text);
  CHECK(text == "{}");
  // Shards of 8 bytes: each tensor alone (BF16 {2} is 4 bytes: it and the next F32 {2} make 12).
  const std::string small = folder + "/small";
  polyak::run_merge_plan(plan, small, 8);
  CHECK(polyak::CheckpointReader(small).shards().size() == 4);
  CHECK(shard_of(small, 3, 4).scalar<std::int64_t>("n") == 7);
  // An earlier output (its manifest lists every file in it) is replaced whole...
  plan.tensors.pop_back();
  polyak::run_merge_plan(plan, small, 8);
  CHECK(polyak::CheckpointReader(small).shards().size() == 3);
  CHECK_FALSE(std::filesystem::exists(small + "/model-00004-of-00004.safetensors"));
  // ...but not once the user has added a file to it, nor a folder that only looks like one (a merged
  // model downloaded with its mergekit_config.yml).
  std::ofstream(small + "/notes.txt") << "mine";
  CHECK_THROWS_WITH(polyak::run_merge_plan(plan, small, 8), Catch::Contains("notes.txt"));
  CHECK(std::filesystem::exists(small + "/notes.txt"));
  const std::string downloaded = folder + "/downloaded";
  std::filesystem::create_directories(downloaded);
  std::filesystem::copy_file(plan.checkpoints[0], downloaded + "/model.safetensors");
  std::ofstream(downloaded + "/mergekit_config.yml") << "merge_method: linear\n";
  CHECK_THROWS(polyak::run_merge_plan(plan, downloaded, 8));
  CHECK(std::filesystem::exists(downloaded + "/model.safetensors"));
}

TEST_CASE("an input written over in place while a merge reads it is refused, nothing written",
          "[merge][plan][adversarial]") {
  const std::string folder = plan_folder("changed");
  const std::string x = two_tensors(folder, "x.safetensors", 1, 5),
                    y = two_tensors(folder, "y.safetensors", 3, 7);
  std::vector<polyak::CheckpointReader> readers;
  readers.emplace_back(x);
  readers.emplace_back(y);
  // y written over in place (the same inode, one byte longer: a change the file's times alone might
  // not show within the clock's tick) after it was opened, before the merge ends.
  {
    std::ifstream in(y, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    in.close();
    std::ofstream rewrite(y, std::ios::binary | std::ios::trunc);
    rewrite << bytes << ' ';
  }
  CHECK_FALSE(readers[1].unchanged());
  CHECK(readers[0].unchanged());
  const std::string out = folder + "/out.safetensors";
  CHECK_THROWS_WITH(polyak::merge_checkpoints(std::move(readers), nullptr, polyak::MergeOptions{}, out),
                    Catch::Contains("was written over while the merge read it"));
  CHECK_FALSE(std::filesystem::exists(out));
}

TEST_CASE("a plan that cannot run is refused before anything is written", "[merge][plan][adversarial]") {
  const std::string folder = plan_folder("refused");
  polyak::MergePlan plan;
  plan.checkpoints = {two_tensors(folder, "x.safetensors", 1, 5), two_tensors(folder, "y.safetensors", 3, 7)};
  polyak::PlannedTensor t;
  t.name = "w";
  t.models = {{0, "a"}, {1, "a"}};
  const std::string out = folder + "/out";
  const auto refused = [&](polyak::MergePlan p, const std::string& why, std::uint64_t shard = 1 << 20) {
    CHECK_THROWS_WITH(polyak::run_merge_plan(p, out, shard), Catch::Contains(why));
    CHECK_FALSE(std::filesystem::exists(out));
  };
  refused(plan, "no tensors");
  polyak::MergePlan p = plan;
  p.tensors = {t};
  refused(p, "a shard size of 0 bytes", 0);
  p.tensors[0].models[1].name = "missing";
  refused(p, "has no tensor 'missing' (for 'w')");
  p = plan;
  p.tensors = {t, t};
  refused(p, "the output tensor 'w' twice");
  p = plan;
  p.tensors = {t};
  p.tensors[0].models[1] = {7, "a"};
  refused(p, "'w' reads no checkpoint");
  p = plan;
  p.tensors = {t};
  p.tensors[0].models[1].name = "n";
  refused(p, "'w': 'n' is [] in");  // a scalar against a {2}
  p = plan;
  p.tensors = {t};
  p.tensors[0].options.method = polyak::MergeMethod::Ties;  // no base
  refused(p, "ties needs a base model");
  p = plan;
  p.tensors = {t};
  p.files["../escape"] = "x";
  refused(p, "'../escape' is not a file name the folder may hold");
  p.files = {{"model-00001-of-00001.safetensors", "x"}};
  refused(p, "is not a file name the folder may hold");
  // OUT among the inputs, or a folder of the user's: refused, kept.
  p = plan;
  p.tensors = {t};
  CHECK_THROWS_WITH(polyak::run_merge_plan(p, folder, 1 << 20),
                    Catch::Contains("which writing it would destroy"));
  const std::string users = folder + "/users";
  std::filesystem::create_directories(users);
  std::ofstream(users + "/notes.txt") << "mine";
  CHECK_THROWS(polyak::run_merge_plan(p, users, 1 << 20));
  CHECK(std::filesystem::exists(users + "/notes.txt"));
}
