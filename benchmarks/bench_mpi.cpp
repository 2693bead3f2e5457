// SPDX-License-Identifier: MIT
// average_parameters (pack, allreduce, unpack) against bare MPI_Allreduce schedules of the same
// bytes: one buffer, and chunks of 1e5, 2^18 and 1e6 floats. Run on 2 ranks:
//   mpirun -np 2 bench_mpi [--benchmark_out=...]
// Every rank runs every benchmark with fixed iteration counts (collectives must pair up); rank 0
// reports.
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <polyak/model_averaging.hpp>
#include <polyak/mpi.hpp>

#include <string>
#include <vector>

#include "layouts.hpp"

namespace {

constexpr int iterations = 30;

void average_parameters(benchmark::State& state, const std::string& layout, double size) {
  static BenchModel<float> model(layout, size);
  polyak::MpiCommunicator world(MPI_COMM_WORLD);
  for (auto _ : state) polyak::average_parameters(model.list, world);
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * size * 4));
  state.counters["tensors"] = static_cast<double>(model.list.size());
}

void bare_allreduce(benchmark::State& state, double size, std::size_t chunk) {
  const auto n = static_cast<std::size_t>(size);
  std::vector<float> buffer(n, 1.0f);
  for (auto _ : state) {
    for (std::size_t done = 0; done < n; done += chunk) {
      MPI_Allreduce(MPI_IN_PLACE, buffer.data() + done, static_cast<int>(std::min(chunk, n - done)),
                    MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * size * 4));
}

class SilentReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (rank != 0 && std::string(argv[i]).rfind("--benchmark_out", 0) == 0) continue;  // rank 0 writes
    args.push_back(argv[i]);
  }
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());

  const double size = 1e7;
  benchmark::RegisterBenchmark("mpi/average_parameters/float/resnet50/1e7", average_parameters, "resnet50",
                               size)
      ->Iterations(iterations)
      ->UseRealTime();
  benchmark::RegisterBenchmark("mpi/bare_allreduce/float/one_buffer/1e7", bare_allreduce, size,
                               static_cast<std::size_t>(size))
      ->Iterations(iterations)
      ->UseRealTime();
  for (const double chunk : {1e5, 262144.0, 1e6}) {
    benchmark::RegisterBenchmark(
        ("mpi/bare_allreduce/float/chunks_of_" + std::to_string(static_cast<long>(chunk)) + "/1e7").c_str(),
        bare_allreduce, size, static_cast<std::size_t>(chunk))
        ->Iterations(iterations)
        ->UseRealTime();
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
