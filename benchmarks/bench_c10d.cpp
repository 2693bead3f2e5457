// SPDX-License-Identifier: MIT
// Averaging over a c10d Gloo process group against the bare allreduce of the same bytes by the same
// group, paired as bench_mpi pairs them: each round times, in turn, polyak's average_parameters over
// C10dCommunicator (the model's host memory, its chunks), libtorch::average_parameters on the
// model's tensors (PyTorch's flatten-divide-allreduce), the group's bare allreduce of the model's
// floats in one call, and the division pass PyTorch's semantics add; the benchmark reports medians
// of the per-round ratios. A round's time is the slower process's.
//   bench_c10d [--processes=2] [--polyak_max_size=1e8] [benchmark flags]
// It starts its other processes itself (fork, before libtorch runs anything), meeting at a FileStore
// in a fresh folder; process 0 reports.
#include <benchmark/benchmark.h>

#include <torch/csrc/distributed/c10d/FileStore.hpp>

#include <polyak/core/model_averaging.hpp>
#include <polyak/torch/c10d.hpp>
#include <polyak/torch/process_group_average.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "layouts.hpp"
#include "max_size_flag.hpp"
#include "paired.hpp"

namespace {

using polyak::libtorch::C10dCommunicator;

C10dCommunicator* world = nullptr;

/// Seconds `work` takes on the slower process, starting together.
template <class Work>
double timed(Work&& work) {
  double start_line = 0;
  world->allreduce_sum(&start_line, 1);  // (a barrier)
  const auto start = std::chrono::steady_clock::now();
  work();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<double> all(static_cast<std::size_t>(world->size()), 0.0);
  all[static_cast<std::size_t>(world->rank())] = seconds;
  world->allreduce_sum(all.data(), all.size());
  return *std::max_element(all.begin(), all.end());
}

void paired(benchmark::State& state, double size) {
  const auto sizes = scaled_layout("resnet50", size);
  std::size_t total = 0;
  for (const std::size_t n : sizes) total += n;
  std::vector<float> arena(total);
  for (std::size_t i = 0; i < total; ++i) arena[i] = static_cast<float>(i % 1000) * 1e-3f;
  polyak::ParameterList<float> list;
  std::vector<at::Tensor> tensors;
  std::size_t at = 0;
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    list.add("t" + std::to_string(k),
             polyak::TensorView<float>(arena.data() + at, {static_cast<std::int64_t>(sizes[k])}));
    tensors.push_back(
        torch::from_blob(arena.data() + at, {static_cast<std::int64_t>(sizes[k])}, torch::kFloat));
    at += sizes[k];
  }
  auto& group = *world->group();
  const auto polyak_call = [&] { polyak::average_parameters(list, *world); };
  const auto tensor_call = [&] { polyak::libtorch::average_parameters(tensors, group); };
  const auto bucket_call = [&] {
    polyak::libtorch::average_parameters(tensors, group, std::size_t{64} << 20);
  };
  const auto bare_call = [&] { world->allreduce_sum(arena.data(), arena.size()); };
  const auto division = [&] {
    float opaque = 1.0f;
    benchmark::DoNotOptimize(opaque);
    const float one = opaque;
    for (float& x : arena) x *= one;
  };
  polyak_call(), tensor_call(), bucket_call(), bare_call(), division();  // first touches
  std::vector<double> ratios, tensor_ratios, bucket_ratios, limit_ratios, mine_s, tensor_s, bucket_s, bare_s,
      pass_s;
  for (auto _ : state) {
    double mine = 0, tensor = 0, bare = 0, pass = 0;
    const double bucket = timed(bucket_call);
    switch (ratios.size() % 4) {  // each in each place in turn
      case 0:
        mine = timed(polyak_call), tensor = timed(tensor_call), bare = timed(bare_call),
        pass = timed(division);
        break;
      case 1:
        tensor = timed(tensor_call), bare = timed(bare_call), pass = timed(division),
        mine = timed(polyak_call);
        break;
      case 2:
        bare = timed(bare_call), pass = timed(division), mine = timed(polyak_call),
        tensor = timed(tensor_call);
        break;
      default:
        pass = timed(division), mine = timed(polyak_call), tensor = timed(tensor_call),
        bare = timed(bare_call);
    }
    state.SetIterationTime(mine);
    ratios.push_back(mine / bare);
    tensor_ratios.push_back(tensor / bare);
    bucket_ratios.push_back(bucket / bare);
    bucket_s.push_back(bucket);
    limit_ratios.push_back(mine / (bare + pass));
    mine_s.push_back(mine), tensor_s.push_back(tensor), bare_s.push_back(bare), pass_s.push_back(pass);
  }
  state.counters["median_ratio"] = median(ratios);
  state.counters["tensor_ratio"] = median(tensor_ratios);
  state.counters["bucket_ratio"] = median(bucket_ratios);
  state.counters["bucket_ms"] = median(bucket_s) * 1e3;
  state.counters["limit_ratio"] = median(limit_ratios);
  state.counters["polyak_ms"] = median(mine_s) * 1e3;
  state.counters["tensor_ms"] = median(tensor_s) * 1e3;
  state.counters["bare_ms"] = median(bare_s) * 1e3;
  state.counters["passes_ms"] = median(pass_s) * 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  int processes = 2;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--processes=", 0) == 0) {
      processes = std::atoi(arg.c_str() + 12);
    } else {
      args.push_back(argv[i]);
    }
  }
  if (processes < 1) return 2;
  int count = static_cast<int>(args.size());
  const double max_size = take_max_size_flag(count, args.data());
  args.resize(static_cast<std::size_t>(count));
  const auto folder =
      std::filesystem::temp_directory_path() / ("polyak_bench_c10d_" + std::to_string(::getpid()));
  std::filesystem::create_directories(folder);
  int rank = 0;
  std::vector<pid_t> children;
  for (int r = 1; r < processes; ++r) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      rank = r;
      children.clear();
      break;
    }
    children.push_back(pid);
  }
  if (rank != 0) {  // only process 0 writes the output
    args.erase(std::remove_if(args.begin(), args.end(),
                              [](char* a) { return std::string(a).rfind("--benchmark_out", 0) == 0; }),
               args.end());
    count = static_cast<int>(args.size());
  }
  benchmark::Initialize(&count, args.data());
  torch::set_num_threads(1);  // as torchrun sets OMP_NUM_THREADS=1: processes share the cores
  auto store = c10::make_intrusive<c10d::FileStore>((folder / "store").string(), processes);
  C10dCommunicator comm = C10dCommunicator::gloo(store, rank, processes);
  world = &comm;
  for (const double size : {1e5, 1e6, 1e7, 1e8}) {
    if (size > max_size) continue;
    const std::string scalars = size == 1e5 ? "1e5" : size == 1e6 ? "1e6" : size == 1e7 ? "1e7" : "1e8";
    benchmark::RegisterBenchmark(("c10d/paired/float/resnet50/" + scalars).c_str(), paired, size)
        ->Iterations(size >= 1e8 ? 8 : 24)
        ->UseManualTime();
  }
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    SilentReporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  int failed = 0;
  for (const pid_t pid : children) {
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = 1;
  }
  if (rank == 0) std::filesystem::remove_all(folder);
  return failed;
}
