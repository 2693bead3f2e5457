// SPDX-License-Identifier: MIT
// A process saving checkpoints in a loop is killed with SIGKILL at random moments; the file on disk
// must always load and hold one complete state.
#include <catch2/catch.hpp>

#include <algorithm>
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

#include "polyak/serialization.hpp"

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
  const auto folder =
      std::filesystem::temp_directory_path() / ("polyak_crash_test_" + std::to_string(::getpid()));
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  const std::string path = (folder / "checkpoint.safetensors").string();
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
  for (const auto& entry : std::filesystem::directory_iterator(folder)) {
    const std::string name = entry.path().filename().string();
    if (name == "checkpoint.safetensors") continue;
    CAPTURE(name);
    CHECK(std::regex_match(name, std::regex(R"(checkpoint\.safetensors\.tmp\.[0-9]+\.[0-9]+)")));
    ++temporaries;
  }
  std::cout << "crash test: " << temporaries << " temporaries left by the killed saves\n";
  std::filesystem::remove_all(folder);  // the killed children's temporaries too
}
