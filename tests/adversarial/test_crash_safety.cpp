// SPDX-License-Identifier: MIT
// A process saving checkpoints in a loop is killed with SIGKILL at random moments; the file on disk
// must always load and hold one complete state.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <iostream>
#include <random>
#include <regex>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "polyak/checkpoint/merge.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/checkpoint/sharded_checkpoint.hpp"

#include "support.hpp"

namespace {

/// State k: 65536 floats equal to k, and k in the metadata; a torn write would break the match.
polyak::StateDict state(int k) {
  static std::vector<float> values;
  values.assign(65536, static_cast<float>(k));
  polyak::StateDict sd;
  sd.insert("values", polyak::TensorView<float>(values.data(), {256, 256}));
  sd.insert_scalar<std::int64_t>("k", k);
  sd.metadata["k"] = std::to_string(k);
  return sd;
}

/// Loads `path` and checks it is one whole state; returns its k.
int check_whole(const std::string& path) {
  const polyak::StateDict sd = polyak::load_safetensors(path);
  const auto k = sd.scalar<std::int64_t>("k");
  REQUIRE(sd.metadata.at("k") == std::to_string(k));
  const auto& t = sd.at("values");
  std::vector<float> values(65536);
  REQUIRE(t.bytes.size() == values.size() * sizeof(float));
  std::memcpy(values.data(), t.bytes.data(), t.bytes.size());
  REQUIRE(std::all_of(values.begin(), values.end(), [&](float v) { return v == static_cast<float>(k); }));
  return static_cast<int>(k);
}

}  // namespace

TEST_CASE("a save killed at any moment leaves a whole earlier state", "[adversarial]") {
  const polyak_test::TemporaryFolder folder("crash_test");
  const std::string path = folder / "checkpoint.safetensors";
  polyak::save_safetensors(path, state(0));

  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> delay_us(0, 20000);
  const int kills = 40;  // bounded: about half a second of saving in all
  int latest = 0, advanced = 0;
  for (int round = 0; round < kills; ++round) {
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      for (int k = latest + 1;; ++k) polyak::save_safetensors(path, state(k));  // until killed
    }
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us(rng)));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    REQUIRE(WIFSIGNALED(status));
    const int k = check_whole(path);
    CHECK(k >= latest);  // never goes back to an older state
    advanced += k > latest;
    latest = k;
  }
  std::cout << "crash test: " << kills << " SIGKILLs while saving; the file always loaded whole; " << advanced
            << " kills came after a newer save had landed (last state " << latest << ")\n";
  CHECK(advanced > 0);
  // What the kills left behind is what save_safetensors documents: its own temporaries, named
  // "<path>.tmp.<pid>.<n>", and nothing else.
  int temporaries = 0;
  for (const auto& entry : std::filesystem::directory_iterator(folder.path())) {
    const std::string name = entry.path().filename().string();
    if (name == "checkpoint.safetensors") continue;
    CAPTURE(name);
    CHECK(std::regex_match(name, std::regex(R"(checkpoint\.safetensors\.tmp\.[0-9]+\.[0-9]+)")));
    ++temporaries;
  }
  std::cout << "crash test: " << temporaries << " temporaries left by the killed saves\n";
}

// Issue 21, item 1: a sharded merge writes a folder; killed at any moment or racing other merges
// into the same OUT, it must leave one whole merge (the old one or a new one), never shards of two.

namespace {

/// A sharded model in `dir` whose every value is `value`: three shards of 32768 floats each.
void sharded_constant(const std::string& dir, float value) {
  std::filesystem::create_directories(dir);
  std::vector<float> values(32768, value);
  std::string weight_map;
  for (int s = 1; s <= 3; ++s) {
    polyak::StateDict shard;
    shard.insert("layer" + std::to_string(s), values.data(), {32768});
    const std::string file = "model-0000" + std::to_string(s) + "-of-00003.safetensors";
    polyak::save_safetensors(dir + "/" + file, shard);
    weight_map += std::string(s == 1 ? "" : ", ") + "\"layer" + std::to_string(s) + "\": \"" + file + "\"";
  }
  polyak_test::write_file(dir + "/model.safetensors.index.json", "{\"weight_map\": {" + weight_map + "}}");
}

/// Reads the merge at `out` and returns its one value, checking that every scalar of every shard holds
/// it (a mix of two merges would not); -1 where there is no merge yet.
float whole_merge_value(const std::string& out) {
  if (!std::filesystem::exists(out)) return -1;
  polyak::CheckpointReader reader(out);
  REQUIRE(reader.tensors().size() == 3);
  float value = -1;
  for (const auto& tensor : reader.tensors()) {
    const auto values = polyak::to_doubles(reader.read(tensor));
    for (const double v : values) {
      if (value < 0) value = static_cast<float>(v);
      REQUIRE(static_cast<float>(v) == value);
    }
  }
  return value;
}

/// Merge k averages inputs k % 3 and k % 3 + 1: the value 1.5, 2.5 or 3.5.
void merge_number(const polyak_test::TemporaryFolder& folder, int k, const std::string& out) {
  const int first = k % 3 + 1;
  polyak::merge_checkpoints(
      {folder / ("in" + std::to_string(first)), folder / ("in" + std::to_string(first + 1))}, "",
      polyak::MergeOptions{}, out);
}

}  // namespace

TEST_CASE("a sharded merge killed at any moment leaves the old merge or the new one, whole",
          "[adversarial]") {
  polyak_test::TemporaryFolder folder("merge_kill");
  for (int k = 1; k <= 4; ++k) sharded_constant(folder / ("in" + std::to_string(k)), static_cast<float>(k));
  const std::string out = folder / "out";
  std::mt19937 rng(2026);
  std::uniform_int_distribution<int> delay_us(0, 250000);  // a merge with its fsyncs takes ~50 ms here
  const int kills = 24;
  std::vector<int> seen(4, 0);
  for (int round = 0; round < kills; ++round) {
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      for (int k = round;; ++k) merge_number(folder, k, out);  // until killed
    }
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us(rng)));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    REQUIRE(WIFSIGNALED(status));
    const float value = whole_merge_value(out);
    CHECK((value == -1 || value == 1.5f || value == 2.5f || value == 3.5f));
    ++seen[value < 0 ? 0 : static_cast<std::size_t>(value)];
  }
  std::size_t interrupted = 0;  // the temporaries of writes the kills interrupted
  for (const auto& entry : std::filesystem::directory_iterator(folder.path()))
    interrupted += entry.path().filename().string().rfind("out.tmp.", 0) == 0;
  std::cout << "merge kill test: " << kills
            << " SIGKILLs while merging into one sharded OUT; it always read as one "
            << "whole merge (values 1.5 / 2.5 / 3.5 seen " << seen[1] << " / " << seen[2] << " / " << seen[3]
            << " times, no merge yet " << seen[0] << "); " << interrupted
            << " interrupted writes left temporaries\n";
  CHECK(interrupted > 0);  // the kills did land mid-write
  CHECK(seen[0] < kills);
}

TEST_CASE("merges racing into one sharded OUT each land whole, and a reader meanwhile sees one whole merge",
          "[adversarial]") {
  polyak_test::TemporaryFolder folder("merge_race");
  for (int k = 1; k <= 4; ++k) sharded_constant(folder / ("in" + std::to_string(k)), static_cast<float>(k));
  const std::string out = folder / "out";
  std::atomic<bool> done{false};
  std::atomic<int> reads{0};
  std::vector<std::string> errors(4);
  std::vector<std::thread> threads;
  for (int writer = 0; writer < 3; ++writer) {
    threads.emplace_back([&, writer] {
      try {
        for (int round = 0; round < 8; ++round) merge_number(folder, writer, out);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(writer)] = e.what();
      }
    });
  }
  threads.emplace_back([&] {  // the reader: every read is one whole merge
    try {
      while (!done) {
        if (!std::filesystem::exists(out)) continue;
        polyak::CheckpointReader reader(out);
        float value = -1;
        for (const auto& tensor : reader.tensors()) {
          for (const double v : polyak::to_doubles(reader.read(tensor))) {
            if (value < 0) value = static_cast<float>(v);
            if (static_cast<float>(v) != value) throw std::runtime_error("a mixed read");
          }
        }
        ++reads;
      }
    } catch (const std::exception& e) {
      errors[3] = e.what();
    }
  });
  for (int t = 0; t < 3; ++t) threads[static_cast<std::size_t>(t)].join();
  done = true;
  threads[3].join();
  CHECK(errors == std::vector<std::string>(4));
  const float value = whole_merge_value(out);
  CHECK((value == 1.5f || value == 2.5f || value == 3.5f));
  std::size_t leftovers = 0;
  for (const auto& entry : std::filesystem::directory_iterator(folder.path()))
    leftovers += entry.path().filename().string().find(".tmp.") != std::string::npos;
  CHECK(leftovers == 0);
  std::cout << "merge race: 3 writers x 8 merges into one OUT, " << reads << " whole reads meanwhile\n";
}
