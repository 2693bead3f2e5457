// SPDX-License-Identifier: MIT
// Sharded checkpoints (polyak/checkpoint/sharded_checkpoint.hpp): a Hugging Face index and its shards,
// read as one checkpoint.
#include "polyak/checkpoint/sharded_checkpoint.hpp"

#include "support.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "polyak/checkpoint/merge.hpp"

namespace {

using polyak::StateDict;
using polyak_test::write_file;

/// A state of one F32 tensor.
StateDict one_tensor(const std::vector<float>& x, const std::string& name) {
  StateDict sd;
  sd.insert(name, x.data(), {static_cast<std::int64_t>(x.size())});
  return sd;
}

}  // namespace

TEST_CASE("a sharded checkpoint's index is checked before anything is read",
          "[merge][sharded][adversarial]") {
  const polyak_test::TemporaryFolder temporary("sharded_index");
  const std::string folder = temporary.path();
  polyak::save_safetensors(folder + "/s1.safetensors", one_tensor({1, 2}, "w"));
  StateDict two = one_tensor({3}, "b");
  two.insert("extra", std::vector<float>{1}.data(), {1});
  polyak::save_safetensors(folder + "/s2.safetensors", two);
  polyak::save_safetensors(folder + "/dup.safetensors", one_tensor({5}, "w"));
  const std::string index = folder + "/model.safetensors.index.json";
  const auto refused = [&](const std::string& text, const std::string& fragment) {
    CAPTURE(text);
    write_file(index, text);
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
}

TEST_CASE("a reader of a checkpoint of many shards keeps few of them open", "[merge][sharded]") {
  polyak_test::TemporaryFolder folder("merge_many_shards");
  const auto open_files = [] {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
    return n;
  };
  for (int model = 0; model < 3; ++model) {
    const std::string dir = folder / ("m" + std::to_string(model));
    std::filesystem::create_directories(dir);
    std::string weight_map;
    for (int s = 0; s < 40; ++s) {
      const float value = static_cast<float>(model + s);
      const std::string file = "shard-" + std::to_string(s) + ".safetensors";
      polyak::save_safetensors(dir + "/" + file, one_tensor({value, value}, "t" + std::to_string(s)));
      weight_map += std::string(s == 0 ? "" : ", ") + "\"t" + std::to_string(s) + "\": \"" + file + "\"";
    }
    write_file(dir + "/model.safetensors.index.json", "{\"weight_map\": {" + weight_map + "}}");
  }
  const std::size_t before = open_files();
  std::vector<polyak::CheckpointReader> readers;
  for (int model = 0; model < 3; ++model) readers.emplace_back(folder / ("m" + std::to_string(model)));
  for (auto& reader : readers) {
    for (const auto& tensor : reader.tensors()) CHECK(reader.read(tensor).bytes.size() == 8);
  }
  // Each: its folder and at most max_open_shards shards (40 each were open, 120 in all).
  CHECK(open_files() - before <= 3 * (polyak::CheckpointReader::max_open_shards + 1));
  readers.clear();
  polyak::merge_checkpoints({folder / "m0", folder / "m1", folder / "m2"}, "", polyak::MergeOptions{},
                            folder / "out");
  polyak::CheckpointReader out(folder / "out");
  CHECK(polyak::to_doubles(out.read(*out.find("t7")))[0] == 8.0);  // (7 + 8 + 9) / 3
}
