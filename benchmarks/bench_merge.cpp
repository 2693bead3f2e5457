// SPDX-License-Identifier: MIT
// Merging checkpoints (polyak/checkpoint/merge.hpp) against the disk's bound, and its peak memory.
//
//   merge/<method>/<bytes>    merge_checkpoints, every method, of two float32 checkpoints of <bytes>
//                             each (64 tensors; one for nearswap and passthrough), against a third
//                             as the base where the method takes one, in a child process: its time,
//                             its peak resident memory (peak_rss_MB, from wait4), and bound_ratio:
//                             the time of the same I/O without the arithmetic (the same inputs read
//                             in 1 MiB blocks, one output's bytes written and fsynced, as the merge
//                             does), run just before in the same iteration, over the merge's time.
//                             Each run starts after sync(), so that no earlier write is still
//                             draining; the median of the per-iteration ratios is the figure to quote.
//   merge4/<method>/<bytes>   the same with four models, for the methods that take more than two
//   bound/cat/<bytes>         `cat IN1 IN2 > /dev/null`: reading alone
//   safetensors/save/<bytes>  save_safetensors of a float32 state of <bytes> (64 tensors, held in
//                             memory), timed in this process, against `dd if=/dev/zero bs=1M
//                             conv=fsync` writing and fsyncing as many bytes, run just before in the
//                             same iteration: dd_ratio = dd's time / polyak's
//   safetensors/load/<bytes>  load_safetensors of that file into fresh memory, timed in this process
//                             (the state freed after the clock stops), against `dd bs=1M` reading it
//                             to /dev/null, likewise paired; limit_ratio adds to dd's time what
//                             faulting in as much fresh memory costs (measured in the same iteration,
//                             allocated as the load allocates): what a load that materializes its
//                             tensors cannot go below, and dd, reusing one buffer, never pays
//   safetensors/read_into/<bytes>  a SafetensorsReader reading each tensor of that file into memory
//                             the caller already holds (read_bytes), against the same dd
// All read warm files (the page cache holds them after they are made): the bound is this machine's
// memory and file system, not a cold disk.
//
//   usage: bench_merge [--polyak_max_size=BYTES, default 1e9] [Google Benchmark flags]
#include <benchmark/benchmark.h>

#include <polyak/checkpoint/merge.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "max_size_flag.hpp"

namespace {

constexpr int tensors = 64;

std::string path_of(const std::string& name) { return "polyak_bench_merge_" + name; }

/// A float32 checkpoint of about `bytes`, offset + sin(frequency (i + k)) for element i of tensor
/// k, generated piece by piece as it is written (its maker holds no copy).
void make_checkpoint(const std::string& path, double bytes, float offset, float frequency = 1.0f) {
  const auto per_tensor = static_cast<std::size_t>(bytes / 4 / tensors);
  std::vector<polyak::detail::TensorWriter> writers;
  for (int k = 0; k < tensors; ++k) {
    writers.push_back(
        {"layer" + std::to_string(k) + ".weight",
         polyak::DType::F32,
         {static_cast<std::int64_t>(per_tensor)},
         per_tensor * 4,
         [=](int fd, const std::string& file) {
           std::vector<float> piece(1 << 16);
           for (std::size_t begin = 0; begin < per_tensor; begin += piece.size()) {
             const std::size_t count = std::min(piece.size(), per_tensor - begin);
             for (std::size_t i = 0; i < count; ++i)
               piece[i] =
                   offset + std::sin(frequency * static_cast<float>(begin + i + static_cast<std::size_t>(k)));
             polyak::detail::write_all(fd, piece.data(), count * 4, file);
           }
         }});
  }
  polyak::detail::write_safetensors(path, {}, writers);
}

/// Runs `body` in a child process; returns its peak resident memory in MB and sets `seconds`.
template <class Body>
double in_child(Body&& body, double* seconds = nullptr) {
  ::sync();
  const auto start = std::chrono::steady_clock::now();
  const pid_t child = ::fork();
  if (child == 0) {
    int code = 0;
    try {
      body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_merge: %s\n", e.what());
      code = 1;
    }
    std::_Exit(code);
  }
  int status = 0;
  struct rusage usage {};
  ::wait4(child, &status, 0, &usage);
  if (seconds) *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw std::runtime_error("bench_merge: the child failed");
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // Linux reports KiB
}

/// The merge's I/O without its arithmetic: its inputs read, one output's bytes written, fsynced.
void read_write(const std::vector<std::string>& inputs, double bytes) {
  std::vector<char> block(1 << 20);
  for (const auto& name : inputs) {
    const int fd = ::open(name.c_str(), O_RDONLY);
    while (::read(fd, block.data(), block.size()) > 0) {
    }
    ::close(fd);
  }
  const int out = ::open(path_of("copy").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  for (double written = 0; written < bytes; written += static_cast<double>(block.size()))
    polyak::detail::write_all(out, block.data(), block.size(), "copy");
  ::fsync(out);
  ::close(out);
}

/// Each method's settings here: the sparsified ones keep 20% (mergekit's examples' range), the rest
/// their defaults.
polyak::MergeOptions options_for(polyak::MergeMethod method) {
  polyak::MergeOptions options;
  options.method = method;
  const polyak::Sparsification rule = polyak::sparsification_of(method);
  if (rule == polyak::Sparsification::RankSampling) {
    options.density = 0.5;  // (della: density +- epsilon inside (0, 1))
  } else if (rule != polyak::Sparsification::None) {
    options.density = 0.2;
  }
  if (method == polyak::MergeMethod::NearSwap) options.t = 0.01;
  if (method == polyak::MergeMethod::Sce) options.select_topk = 0.5;
  return options;
}

/// How many models `method` merges here: one (nearswap, passthrough), two, or `most` where it takes
/// more than two.
std::size_t models_for(polyak::MergeMethod method, std::size_t most) {
  using M = polyak::MergeMethod;
  if (method == M::NearSwap || method == M::Passthrough) return 1;
  if (method == M::Slerp || method == M::NuSlerp) return 2;
  return most;
}

/// The inputs of a merge of `count` models: a, b, then d, e (c is the base).
std::vector<std::string> model_paths(std::size_t count) {
  std::vector<std::string> paths;
  for (const char* name : {"a", "b", "d", "e"}) paths.push_back(path_of(name));
  paths.resize(count);
  return paths;
}

void merge(benchmark::State& state, polyak::MergeMethod method, std::size_t model_count, double bytes) {
  const polyak::MergeOptions options = options_for(method);
  const std::vector<std::string> models = model_paths(model_count);
  const std::string base = polyak::needs_base(method) ? path_of("c") : "";
  std::vector<std::string> read = models;
  if (!base.empty()) read.push_back(base);
  double peak = 0, ratio = 0;
  for (auto _ : state) {
    double bound = 0, seconds = 0;
    std::remove(path_of("copy").c_str());  // neither run pays for freeing the last one's output
    std::remove(path_of("out").c_str());
    in_child([&] { read_write(read, bytes); }, &bound);
    peak = std::max(
        peak, in_child([&] { polyak::merge_checkpoints(models, base, options, path_of("out")); }, &seconds));
    ratio = bound / seconds;
    state.SetIterationTime(seconds);
  }
  state.counters["bound_ratio"] = ratio;
  state.counters["peak_rss_MB"] = peak;
  state.counters["largest_tensor_MB"] = bytes / tensors / 1e6;
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) *
                                                    static_cast<double>(read.size()) * bytes));
}

void cat_bound(benchmark::State& state, double bytes) {
  const std::string command = "cat " + path_of("a") + " " + path_of("b") + " > /dev/null";
  for (auto _ : state) {
    if (std::system(command.c_str()) != 0) state.SkipWithError("cat failed");
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * 2 * bytes));
}

/// The time `body` takes, after sync() (no earlier write still draining), in seconds.
template <class Body>
double timed(Body&& body) {
  ::sync();
  const auto start = std::chrono::steady_clock::now();
  body();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Runs a shell command (dd), which must succeed.
void run(const std::string& command) {
  if (std::system(command.c_str()) != 0) throw std::runtime_error("bench_merge: '" + command + "' failed");
}

std::string dd_reading(const std::string& path) {
  return "dd if=" + path + " of=/dev/null bs=1M status=none";
}

/// save_safetensors of a state of `bytes` against dd writing and fsyncing the same bytes, in the same
/// iteration.
void safetensors_save(benchmark::State& state, double bytes) {
  polyak::StateDict sd;
  const auto per_tensor = static_cast<std::size_t>(bytes / 4 / tensors);
  std::vector<float> values(per_tensor);
  for (int k = 0; k < tensors; ++k) {
    for (std::size_t i = 0; i < per_tensor; ++i) values[i] = std::sin(static_cast<float>(i + k));
    sd.insert("layer" + std::to_string(k) + ".weight", values.data(),
              {static_cast<std::int64_t>(per_tensor)});
  }
  const std::string dd = "dd if=/dev/zero of=" + path_of("copy") +
                         " bs=1M count=" + std::to_string(static_cast<long>(bytes / (1 << 20))) +
                         " conv=fsync status=none";
  double ratio = 0;
  for (auto _ : state) {
    std::remove(path_of("copy").c_str());  // neither run pays for freeing the last one's output
    std::remove(path_of("saved").c_str());
    const double bound = timed([&] { run(dd); });
    const double seconds = timed([&] { polyak::save_safetensors(path_of("saved"), sd); });
    ratio = bound / seconds;
    state.SetIterationTime(seconds);
  }
  state.counters["dd_ratio"] = ratio;
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * bytes));
}

/// load_safetensors of checkpoint a (fresh memory) against dd reading it, and against dd plus the
/// first touch of as much fresh memory, allocated as the load allocates it.
void safetensors_load(benchmark::State& state, double bytes) {
  const polyak::SafetensorsHeader header = polyak::read_safetensors_header(path_of("a"));
  double ratio = 0, limit_ratio = 0;
  for (auto _ : state) {
    const double bound = timed([&] { run(dd_reading(path_of("a"))); });
    double touch = 0, seconds = 0;
    {
      std::vector<std::vector<std::byte>> fresh(header.entries.size());
      touch = timed([&] {
        for (std::size_t e = 0; e < fresh.size(); ++e) {
          const std::size_t size = header.entries[e].end - header.entries[e].begin;
          fresh[e].reserve(size);
          polyak::detail::advise_huge_pages(fresh[e].data(), size);
          fresh[e].resize(size);
        }
      });
    }  // (freed after the clock stops, as the loaded state below)
    {
      polyak::StateDict loaded;
      seconds = timed([&] { loaded = polyak::load_safetensors(path_of("a")); });
    }
    ratio = bound / seconds;
    limit_ratio = (bound + touch) / seconds;
    state.SetIterationTime(seconds);
  }
  state.counters["dd_ratio"] = ratio;
  state.counters["limit_ratio"] = limit_ratio;
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * bytes));
}

/// A SafetensorsReader reading every tensor of checkpoint a into memory held from before (the
/// public read_bytes), against dd reading the file.
void safetensors_read_into(benchmark::State& state, double bytes) {
  const polyak::SafetensorsHeader header = polyak::read_safetensors_header(path_of("a"));
  std::vector<std::vector<std::byte>> held;
  for (const auto& entry : header.entries) held.emplace_back(entry.end - entry.begin);
  double ratio = 0;
  for (auto _ : state) {
    const double bound = timed([&] { run(dd_reading(path_of("a"))); });
    const double seconds = timed([&] {
      polyak::SafetensorsReader reader(path_of("a"));
      for (std::size_t e = 0; e < held.size(); ++e)
        reader.read_bytes(reader.header().entries[e], 0, held[e].size(), held[e].data());
    });
    ratio = bound / seconds;
    state.SetIterationTime(seconds);
  }
  state.counters["dd_ratio"] = ratio;
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * bytes));
}

}  // namespace

int main(int argc, char** argv) {
  const double bytes = take_max_size_flag(argc, argv, 1e9);
  benchmark::Initialize(&argc, argv);
  make_checkpoint(path_of("a"), bytes, 0.0f);
  make_checkpoint(path_of("b"), bytes, 0.5f);
  make_checkpoint(path_of("c"), bytes, 0.25f, 1.7f);  // the base: task vectors that are not parallel
  make_checkpoint(path_of("d"), bytes, 0.75f, 1.3f);
  make_checkpoint(path_of("e"), bytes, -0.25f, 0.9f);
  char size[16];
  std::snprintf(size, sizeof size, "%.0eB", bytes);
  const std::string tail = std::string("/") + size;
  benchmark::RegisterBenchmark(("bound/cat" + tail).c_str(), cat_bound, bytes)->UseRealTime()->Iterations(1);
  for (const std::size_t most : {2, 4}) {
    for (const auto method : polyak::all_merge_methods) {
      const std::size_t count = models_for(method, most);
      if (most == 4 && count < 4) continue;
      const std::string group = most == 4 ? "merge4/" : "merge/";
      benchmark::RegisterBenchmark((group + polyak::to_string(method) + tail).c_str(), merge, method, count,
                                   bytes)
          ->UseManualTime()
          ->Iterations(1);
    }
  }
  benchmark::RegisterBenchmark(("safetensors/save" + tail).c_str(), safetensors_save, bytes)
      ->UseManualTime()
      ->Iterations(1);
  benchmark::RegisterBenchmark(("safetensors/load" + tail).c_str(), safetensors_load, bytes)
      ->UseManualTime()
      ->Iterations(1);
  benchmark::RegisterBenchmark(("safetensors/read_into" + tail).c_str(), safetensors_read_into, bytes)
      ->UseManualTime()
      ->Iterations(1);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  for (const auto& name : {"a", "b", "c", "d", "e", "out", "copy", "saved"})
    std::remove(path_of(name).c_str());
  return 0;
}
