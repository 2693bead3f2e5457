// SPDX-License-Identifier: MIT
// average_parameters against the bare MPI_Allreduce of the same bytes, paired so that this
// machine's noise cannot decide the comparison: each iteration times polyak and the bare collective
// back to back (in alternating order), and the benchmark reports the median of the per-pair ratios.
// The bare collective is what polyak's wire carries, in place, in the same pieces polyak sends
// (average_chunk_bytes_v<MpiCommunicator>). For a float model that is the model's own memory: its
// tensors (the resnet50 layout) lie one after another in one allocation and the bare collective
// reduces that allocation, because two equal buffers allocated apart differed by up to 14% here in
// an A/A run, more than what is measured. A bf16 model's wire is floats, which MPI needs in a buffer
// of their own: the bare collective reduces a float buffer of the model's scalar count. Run on 2
// ranks:
//   mpirun -np 2 bench_mpi [--polyak_max_size=1e8] [--benchmark_out=...]
// Every rank runs every benchmark with fixed iteration counts (collectives must pair up); rank 0
// reports. A pair's time is the slower rank's (both ranks' times are reduced with MPI_MAX).
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <polyak/core/model_averaging.hpp>
#include <polyak/mpi.hpp>

#include <algorithm>
#include <chrono>
#include <type_traits>
#include <string>
#include <vector>

#include "layouts.hpp"
#include "max_size_flag.hpp"
#include "paired.hpp"

namespace {

/// Seconds `work` takes on the slower rank, starting together.
template <class Work>
double timed(Work&& work) {
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = std::chrono::steady_clock::now();
  work();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return seconds;
}

/// The bare collective: the buffer's floats in place, in the pieces polyak's chunks make (1 MB), the
/// fastest here (one MPI_Allreduce of a whole 40 MB buffer took 9 times as long; against 1 MB
/// pieces, 512 KB ones took 1.11 times as long, 2 MB 1.01-1.04, 4 MB 1.09-1.10).
void bare_allreduce(std::vector<float>& buffer) {
  constexpr std::size_t piece = polyak::average_chunk_bytes_v<polyak::MpiCommunicator> / sizeof(float);
  for (std::size_t done = 0; done < buffer.size(); done += piece) {
    MPI_Allreduce(MPI_IN_PLACE, buffer.data() + done, static_cast<int>(std::min(piece, buffer.size() - done)),
                  MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  }
}

/// A model whose tensors (the layout's sizes) lie one after another in one allocation.
template <class T>
struct ArenaModel {
  std::vector<T> arena;
  polyak::ParameterList<T> list;
  ArenaModel(const std::string& layout, double target) {
    const auto sizes = scaled_layout(layout, target);
    std::size_t total = 0;
    for (const std::size_t n : sizes) total += n;
    arena.resize(total);
    for (std::size_t i = 0; i < total; ++i) arena[i] = T(static_cast<float>(i % 1000) * 1e-3f);
    std::size_t at = 0;
    for (std::size_t k = 0; k < sizes.size(); ++k) {
      list.add("t" + std::to_string(k),
               polyak::TensorView<T>(arena.data() + at, {static_cast<std::int64_t>(sizes[k])}));
      at += sizes[k];
    }
  }
};

/// One pass that reads and writes every scalar of `buffer` (times one, which the compiler cannot
/// see): what dividing by the group size costs at the least, apart from the collective.
template <class T>
void scaling_pass(std::vector<T>& buffer) {
  float opaque = 1.0f;
  benchmark::DoNotOptimize(opaque);
  const float one = opaque;  // a local the loop's stores cannot alias, so that it vectorizes
  for (T& x : buffer) x *= one;
}

template <class T>
void paired(benchmark::State& state, double size) {
  ArenaModel<T> model("resnet50", size);
  std::vector<float> floats;
  if constexpr (!std::is_same_v<T, float>) floats.assign(model.arena.size(), 1.0f);
  std::vector<float>& wire = [&]() -> std::vector<float>& {
    if constexpr (std::is_same_v<T, float>)
      return model.arena;
    else
      return floats;
  }();
  polyak::MpiCommunicator world(MPI_COMM_WORLD);
  const auto polyak_call = [&] { polyak::average_parameters(model.list, world); };
  const auto bare_call = [&] { bare_allreduce(wire); };
  // The passes PyTorch's semantics need beside the collective: the division, and for bf16 the
  // conversions to float and back.
  const auto passes = [&] {
    if constexpr (std::is_same_v<T, float>) {
      scaling_pass(wire);
    } else {
      polyak::detail::widen(model.arena.data(), wire.data(), wire.size());
      scaling_pass(wire);  // (folded into the widening in polyak's path; timed apart here)
      polyak::detail::narrow(wire.data(), model.arena.data(), wire.size());
    }
  };
  polyak_call();  // first touches: MPI's buffers, the pack buffer
  bare_call();
  passes();
  std::vector<double> ratios, limit_ratios, limits, polyak_seconds, bare_seconds, pass_seconds;
  for (auto _ : state) {
    double mine = 0, bare = 0, pass = 0;
    switch (ratios.size() % 3) {  // each first, second and last in turn
      case 0:
        mine = timed(polyak_call), bare = timed(bare_call), pass = timed(passes);
        break;
      case 1:
        bare = timed(bare_call), pass = timed(passes), mine = timed(polyak_call);
        break;
      default:
        pass = timed(passes), mine = timed(polyak_call), bare = timed(bare_call);
    }
    state.SetIterationTime(mine);
    ratios.push_back(mine / bare);
    limit_ratios.push_back(mine / (bare + pass));
    limits.push_back((bare + pass) / bare);
    polyak_seconds.push_back(mine);
    bare_seconds.push_back(bare);
    pass_seconds.push_back(pass);
  }
  state.counters["median_ratio"] = median(ratios);
  state.counters["limit_ratio"] = median(limit_ratios);
  state.counters["limit"] = median(limits);
  state.counters["polyak_ms"] = median(polyak_seconds) * 1e3;
  state.counters["bare_ms"] = median(bare_seconds) * 1e3;
  state.counters["passes_ms"] = median(pass_seconds) * 1e3;
  // Bytes each rank's passes read and write, over their time: this machine's bandwidth, the two
  // ranks running at once.
  const double pass_bytes =
      std::is_same_v<T, float> ? 2.0 * 4 * wire.size() : (2.0 + 4 + 4 + 4 + 4 + 4 + 2) * wire.size();
  state.counters["passes_GBps"] = pass_bytes / median(pass_seconds) / 1e9;
  state.counters["tensors"] = static_cast<double>(model.list.size());
  state.SetBytesProcessed(
      static_cast<std::int64_t>(static_cast<double>(state.iterations() * model.arena.size() * sizeof(T))));
}

/// The latency a call adds at least: an allreduce of 17 doubles, what average_parameters' layout
/// check costs (and a bare allreduce of a tiny model).
void latency(benchmark::State& state) {
  double sums[17] = {};
  for (auto _ : state) MPI_Allreduce(MPI_IN_PLACE, sums, 17, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const double max_size = take_max_size_flag(argc, argv);
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (rank != 0 && std::string(argv[i]).rfind("--benchmark_out", 0) == 0) continue;  // rank 0 writes
    args.push_back(argv[i]);
  }
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());

  benchmark::RegisterBenchmark("mpi/latency/allreduce_17_doubles", latency)->Iterations(5000)->UseRealTime();
  for (const double size : {1e5, 1e6, 1e7, 1e8}) {
    if (size > max_size) continue;
    const std::string scalars = size == 1e5 ? "1e5" : size == 1e6 ? "1e6" : size == 1e7 ? "1e7" : "1e8";
    const int pairs = size >= 1e8 ? 9 : 31;
    benchmark::RegisterBenchmark(("mpi/paired/float/resnet50/" + scalars).c_str(), paired<float>, size)
        ->Iterations(pairs)
        ->UseManualTime();
    benchmark::RegisterBenchmark(("mpi/paired/bf16/resnet50/" + scalars).c_str(), paired<Eigen::bfloat16>,
                                 size)
        ->Iterations(pairs)
        ->UseManualTime();
  }
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    SilentReporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
