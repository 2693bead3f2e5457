// SPDX-License-Identifier: MIT
// The training order of a run's checkpoints (checkpoint_order.hpp), which LAWA's last k and an EMA
// over files depend on: recorded steps first, natural name order else; every ambiguity refused.
#include "polyak/checkpoint/checkpoint_order.hpp"
#include "polyak/checkpoint/merge.hpp"

#include "support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <unistd.h>  // symlink

namespace {

/// A fresh folder for this file's cases.
std::string order_folder(const std::string& name) {
  const std::string folder = polyak_test::temporary_path("order_" + name);
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  return folder;
}

/// A one-tensor checkpoint at folder/name, recording `metadata`.
std::string snapshot(const std::string& folder, const std::string& name,
                     const std::map<std::string, std::string>& metadata = {}) {
  const float w = 1.0f;
  polyak::StateDict sd;
  sd.insert("w", &w, {1});
  for (const auto& [key, value] : metadata) sd.metadata[key] = value;
  const std::string path = folder + "/" + name;
  polyak::save_safetensors(path, sd);
  return path;
}

std::vector<std::string> file_names(const std::vector<std::string>& paths) {
  std::vector<std::string> names;
  for (const auto& p : paths) names.push_back(std::filesystem::path(p).filename().string());
  return names;
}

}  // namespace

TEST_CASE("natural order reads digit runs as numbers", "[merge][order]") {
  using polyak::natural_compare;
  CHECK(natural_compare("ep2", "ep10") < 0);
  CHECK(natural_compare("ep10", "ep2") > 0);
  CHECK(natural_compare("ep9.safetensors", "ep10.safetensors") < 0);
  CHECK(natural_compare("ep007", "ep7") == 0);  // the same position: order_checkpoints refuses the pair
  CHECK(natural_compare("ep0", "ep00") == 0);
  CHECK(natural_compare("a", "b") < 0);
  CHECK(natural_compare("ep1", "ep1a") < 0);             // a prefix first
  CHECK(natural_compare("run2/ep10", "run10/ep2") < 0);  // the first difference decides
  CHECK(natural_compare("checkpoint-500/model.safetensors", "checkpoint-1000/model.safetensors") < 0);
  CHECK(natural_compare("x18446744073709551616", "x18446744073709551615") > 0);  // beyond 64 bits
  CHECK(natural_compare("ep\xff", "ep1") > 0);                                   // bytes compared unsigned
}

TEST_CASE("checkpoints are ordered by name, digits as numbers, whatever order they are given in",
          "[merge][order]") {
  const std::string folder = order_folder("names");
  std::vector<std::string> paths;
  for (int e = 1; e <= 12; ++e) paths.push_back(snapshot(folder, "ep" + std::to_string(e) + ".safetensors"));
  std::vector<std::string> glob = paths;  // as a shell's glob lists them: by text
  std::sort(glob.begin(), glob.end());
  REQUIRE(file_names(glob)[1] == "ep10.safetensors");
  const polyak::CheckpointOrder order = polyak::order_checkpoints(glob);
  CHECK_FALSE(order.by_step);
  CHECK(order.steps.empty());
  CHECK(order.paths == paths);
}

TEST_CASE("recorded steps order checkpoints over their names", "[merge][order]") {
  const std::string folder = order_folder("steps");
  // Names that sort the other way: the step each records decides.
  const std::string a = snapshot(folder, "a.safetensors", {{"step", "3000"}});
  const std::string b = snapshot(folder, "b.safetensors", {{"global_step", "200"}});
  const std::string c = snapshot(folder, "c.safetensors", {{"step", "10"}, {"global_step", "10"}});
  const polyak::CheckpointOrder order = polyak::order_checkpoints({a, b, c});
  CHECK(order.by_step);
  CHECK(order.paths == std::vector<std::string>{c, b, a});
  CHECK(order.steps == std::vector<std::uint64_t>{10, 200, 3000});
  // The largest step there is.
  const std::string big = snapshot(folder, "big.safetensors", {{"step", "18446744073709551615"}});
  CHECK(polyak::order_checkpoints({big, a}).paths == std::vector<std::string>{a, big});
}

TEST_CASE("an order that cannot be known is refused, naming the files", "[merge][order][adversarial]") {
  const std::string folder = order_folder("refused");
  const std::string a = snapshot(folder, "ep1.safetensors", {{"step", "100"}});
  const std::string b = snapshot(folder, "ep2.safetensors");
  const std::string c = snapshot(folder, "ep3.safetensors", {{"step", "100"}});
  const auto refused = [](const std::vector<std::string>& paths, const std::string& why) {
    CHECK_THROWS_WITH(polyak::order_checkpoints(paths), Catch::Contains(why));
  };
  refused({}, "no checkpoints");
  refused({a, b}, "does not: their order is unknown");
  refused({a, c}, "record the same step 100");
  const std::string seven = snapshot(folder, "ep7.safetensors"),
                    oh_seven = snapshot(folder, "ep07.safetensors");
  refused({seven, oh_seven}, "name the same position");
  refused({seven, seven}, "are one checkpoint");
  const std::string link = folder + "/link.safetensors";
  REQUIRE(::symlink(seven.c_str(), link.c_str()) == 0);
  refused({seven, link}, "are one checkpoint");  // another name of the same file
  std::filesystem::create_hard_link(seven, folder + "/hard.safetensors");
  refused({folder + "/hard.safetensors", seven}, "are one checkpoint");
  for (const std::string bad : {"", "-1", "1.5", "1e3", " 7", "7 ", "0x10", "18446744073709551616",
                                "99999999999999999999999", "+3"}) {
    const std::string path = snapshot(folder, "bad.safetensors", {{"step", bad}});
    refused({path, a}, "not a whole number");
  }
  const std::string both = snapshot(folder, "both.safetensors", {{"step", "5"}, {"global_step", "6"}});
  refused({both}, "records its step 5 and its global_step 6");
  refused({a, folder + "/missing.safetensors"}, "missing.safetensors");  // not there: the reader says so
}

TEST_CASE("a sharded checkpoint's step is its index's metadata", "[merge][order][sharded]") {
  const std::string folder = order_folder("sharded");
  const std::string shards = folder + "/late";
  std::filesystem::create_directories(shards);
  snapshot(shards, "model-00001-of-00001.safetensors");
  std::ofstream(shards + "/model.safetensors.index.json")
      << R"({"metadata": {"step": "900"}, "weight_map": {"w": "model-00001-of-00001.safetensors"}})";
  const std::string early = snapshot(folder, "z_early.safetensors", {{"step", "50"}});
  const polyak::CheckpointOrder order = polyak::order_checkpoints({shards, early});
  CHECK(order.paths == std::vector<std::string>{early, shards});
  CHECK(order.steps == std::vector<std::uint64_t>{50, 900});
}

// The hostile pass's cases (issue 24, item 4).
TEST_CASE("paths spelled differently order alike, an extension or a folder's index does not count",
          "[merge][order][adversarial]") {
  const std::string folder = order_folder("spelling");
  const std::string ep2 = snapshot(folder, "ep2.safetensors"), ep10 = snapshot(folder, "ep10.safetensors");
  const std::string ep2_5 = snapshot(folder, "ep2.5.safetensors");
  // "./" and an absolute path before a relative one used to sort '.' and '/' before 'e'.
  const std::string cwd = std::filesystem::current_path().string();
  std::filesystem::current_path(folder);
  const polyak::CheckpointOrder relative =
      polyak::order_checkpoints({"./ep10.safetensors", "ep2.safetensors"});
  const polyak::CheckpointOrder absolute =
      polyak::order_checkpoints({folder + "/ep10.safetensors", "ep2.safetensors"});
  std::filesystem::current_path(cwd);
  CHECK(relative.paths == std::vector<std::string>{"ep2.safetensors", "./ep10.safetensors"});
  CHECK(absolute.paths == std::vector<std::string>{"ep2.safetensors", folder + "/ep10.safetensors"});
  CHECK(polyak::order_checkpoints({ep2_5, ep10, ep2}).paths == std::vector<std::string>{ep2, ep2_5, ep10});
  // A folder "ep3" and a file "ep3.safetensors" are one position: refused, not guessed.
  const std::string shards = folder + "/ep3";
  std::filesystem::create_directories(shards);
  snapshot(shards, "model-00001-of-00001.safetensors");
  std::ofstream(shards + "/model.safetensors.index.json")
      << R"({"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}})";
  const std::string ep3 = snapshot(folder, "ep3.safetensors");
  CHECK_THROWS_WITH(polyak::order_checkpoints({shards, ep3}), Catch::Contains("the same position"));
  CHECK(polyak::order_checkpoints({ep10, shards + "/", ep2}).paths ==
        std::vector<std::string>{ep2, shards + "/", ep10});
}

TEST_CASE("a sharded checkpoint's step: every record of it must be a whole number and agree",
          "[merge][order][sharded][adversarial]") {
  const std::string folder = order_folder("shard_steps");
  const auto sharded = [&](const std::string& name, const std::string& index_metadata,
                           const std::map<std::string, std::string>& shard_metadata) {
    const std::string at = folder + "/" + name;
    std::filesystem::create_directories(at);
    snapshot(at, "model-00001-of-00001.safetensors", shard_metadata);
    std::ofstream(at + "/model.safetensors.index.json")
        << R"({"metadata": )" << index_metadata
        << R"(, "weight_map": {"w": "model-00001-of-00001.safetensors"}})";
    return at;
  };
  // Steps in the shards alone order the checkpoints (ep1 at 300 comes after ep3 at 100).
  const std::string ep1 = sharded("ep1", "{}", {{"step", "300"}}),
                    ep3 = sharded("ep3", "{}", {{"step", "100"}});
  CHECK(polyak::order_checkpoints({ep1, ep3}).paths == std::vector<std::string>{ep3, ep1});
  CHECK(polyak::order_checkpoints({ep1, ep3}).steps == std::vector<std::uint64_t>{100, 300});
  // An index step as a JSON number is read; one that disagrees with its shard is refused.
  const std::string numbered = sharded("numbered", R"({"step": 200})", {});
  CHECK(polyak::order_checkpoints({numbered, ep3}).steps == std::vector<std::uint64_t>{100, 200});
  CHECK_THROWS_WITH(
      polyak::order_checkpoints({sharded("torn", R"({"step": "5"})", {{"step", "6"}})}),
      Catch::Contains("records its index's step 5 and its shard model-00001-of-00001.safetensors's step 6"));
  // Values that are no whole number: refused, never skipped (they were, and name order was used).
  for (const std::string bad : {"-300", "null", "true", "{}", "[300]", "1.5", "{\"n\": 1}"}) {
    CAPTURE(bad);
    const std::string at = sharded("bad", "{\"step\": " + bad + "}", {});
    CHECK_THROWS_WITH(polyak::order_checkpoints({at, ep3}), Catch::Contains("is not a whole number"));
    std::filesystem::remove_all(at);
  }
}

TEST_CASE("one checkpoint given twice is the same data files, a shared index is not",
          "[merge][order][adversarial]") {
  const std::string folder = order_folder("identity");
  const auto sharded = [&](const std::string& name) {
    const std::string at = folder + "/" + name;
    std::filesystem::create_directories(at);
    return at;
  };
  const std::string index = R"({"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}})";
  // ep1 and ep2 hold different shards under one hard-linked index (cp -al, then training rewrote
  // the shard): two checkpoints.
  const std::string ep1 = sharded("ep1"), ep2 = sharded("ep2"), ep3 = sharded("ep3");
  snapshot(ep1, "model-00001-of-00001.safetensors");
  snapshot(ep2, "model-00001-of-00001.safetensors");
  std::ofstream(ep1 + "/model.safetensors.index.json") << index;
  std::filesystem::create_hard_link(ep1 + "/model.safetensors.index.json",
                                    ep2 + "/model.safetensors.index.json");
  CHECK(polyak::order_checkpoints({ep2, ep1}).paths == std::vector<std::string>{ep1, ep2});
  // ep3 is ep2's shard hard-linked under a copied index: the same weights, refused.
  std::filesystem::create_hard_link(ep2 + "/model-00001-of-00001.safetensors",
                                    ep3 + "/model-00001-of-00001.safetensors");
  std::ofstream(ep3 + "/model.safetensors.index.json") << index;
  CHECK_THROWS_WITH(polyak::order_checkpoints({ep2, ep3}), Catch::Contains("are one checkpoint"));
}

TEST_CASE("the checkpoints ordered are the ones merged, and a merge records no step",
          "[merge][order][adversarial]") {
  const std::string folder = order_folder("race");
  const auto valued = [&](const std::string& name, float w, const std::string& step) {
    polyak::StateDict sd;
    sd.insert("w", &w, {1});
    sd.metadata["step"] = step;
    polyak::save_safetensors(folder + "/" + name, sd);
    return folder + "/" + name;
  };
  const std::string a = valued("a.safetensors", 1, "100"), b = valued("b.safetensors", 3, "200");
  polyak::CheckpointOrder order = polyak::order_checkpoints({b, a});
  // A trainer renames a new checkpoint over b after the order was taken: the merge reads the b ordered.
  const std::string replacement = valued("new.safetensors", 99, "500");
  std::filesystem::rename(replacement, b);
  const std::string out = folder + "/out.safetensors";
  polyak::merge_checkpoints(std::move(order.checkpoints), nullptr, polyak::MergeOptions{}, out);
  const polyak::StateDict merged = polyak::load_safetensors(out);
  CHECK(polyak::to_doubles(merged.at("w")) == std::vector<double>{2});  // (1 + 3) / 2, not (1 + 99) / 2
  CHECK(merged.metadata.count("step") == 0);  // the earliest's step is not the merge's
  CHECK(merged.metadata.at("merge_method") == "average");
}

TEST_CASE("messages show bytes outside printable ASCII as escapes", "[merge][order]") {
  CHECK(polyak::detail::visible(std::string("ep\n1\0x", 6)) == "ep\\x0a1\\x00x");
  CHECK(polyak::detail::visible("a\\b") == "a\\x5cb");
  const std::string folder = order_folder("visible");
  const std::string path = snapshot(folder, "x.safetensors", {{"step", std::string("5\0", 2)}});
  CHECK_THROWS_WITH(polyak::order_checkpoints({path}),
                    Catch::Contains("step '5\\x00' is not a whole number"));
}
