// SPDX-License-Identifier: MIT
// local_sgd_mpi: post-local SGD over MPI on the handwritten digits (PyTorch's PostLocalSGD recipe).
//
// Each rank trains the MLP of swa_digits on its own shard of the training data. For the warm-up
// steps the ranks average gradients every step (what DistributedDataParallel does); after it, each
// rank takes local SGD steps and a PeriodicModelAverager averages the models every `period` steps,
// so the ranks talk `period` times less often. It trains twice, with the same seeds: averaging
// blocking, then overlapped (polyak::Overlap: each average lands `delay` steps after it starts, while
// the ranks go on training), and prints each run's test score and wall time per epoch. Rank 0 then
// trains the same model in one process with the same total batch.
//
//   usage: mpirun -np 4 local_sgd_mpi [data/digits.csv] [--hidden N] [--delay D]
#include <polyak/core/model_averaging.hpp>
#include <polyak/mpi.hpp>

#include <mpi.h>

#include <algorithm>  // std::shuffle
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/digits.hpp"
#include "../common/mlp.hpp"

namespace {

struct Settings {
  int hidden = 128;
  int epochs = 30;
  int total_batch = 32;      // over all ranks
  std::int64_t warmup = 84;  // steps of gradient averaging: two epochs
  std::int64_t period = 8;   // then a model average every 8 steps
  double lr = 0.1, momentum = 0.9, weight_decay = 5e-4;
  unsigned seed = 1;
  std::int64_t delay = 4;  // the overlapped run's: an average lands 4 steps after it starts
};

/// What one run gives: the test score, and the slowest rank's seconds per epoch.
struct Run {
  Score score;
  double seconds_per_epoch = 0;
  std::int64_t averages = 0;
};

/// PyTorch's CosineAnnealingLR over the whole run (eta_min 0), by step.
double cosine_lr(const Settings& s, std::int64_t step, std::int64_t steps) {
  return s.lr * (1 + std::cos(M_PI * static_cast<double>(step) / static_cast<double>(steps))) / 2;
}

/// Trains on `samples` (this rank's shard) with `batch` samples a step. With a communicator of more
/// than one rank, it averages gradients during the warm-up and models every `period` steps after,
/// blocking or, with `overlap`, overlapped.
template <class Comm>
Run train(const Settings& s, const Digits& data, const std::vector<int>& samples, std::size_t batch,
          Comm* comm, bool overlap) {
  const double start = MPI_Wtime();
  std::mt19937 init_rng(s.seed);  // the same initial model on every rank
  Mlp model(s.hidden, init_rng);
  MlpGradients velocity(model);
  const auto tensors = model.tensors();
  std::mt19937 rng(s.seed * 1000 + (comm ? static_cast<unsigned>(comm->rank()) : 0u));
  std::vector<int> order = samples;
  const std::size_t steps_per_epoch = order.size() / batch;
  const auto steps = static_cast<std::int64_t>(steps_per_epoch) * s.epochs;

  std::optional<polyak::PeriodicModelAverager<Comm>> averager;  // polyak: post-local SGD's averager
  if (comm && overlap) {
    averager.emplace(s.period, s.warmup, *comm, polyak::Overlap{s.delay});
  } else if (comm) {
    averager.emplace(s.period, s.warmup, *comm);
  }
  Run run;

  std::int64_t step = 0;
  std::vector<int> labels;
  for (int epoch = 0; epoch < s.epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    for (std::size_t b = 0; b < steps_per_epoch; ++b, ++step) {
      const RowMatrix x = rows_of(data.train, order, b * batch, (b + 1) * batch, &labels);
      double loss = 0;
      MlpGradients g = gradients(model, x, labels, &loss);
      if (comm && step < s.warmup) polyak::average_parameters(g.tensors(), *comm);  // polyak: as DDP does
      sgd_update(model, velocity, g, cosine_lr(s, step, steps), s.momentum, s.weight_decay);
      // polyak: averages the weights and the batch-norm statistics when this step is one of its own.
      if (averager && averager->average_parameters(tensors)) ++run.averages;
    }
  }
  if (averager) averager->synchronize(tensors);          // polyak: lands an average still in flight
  if (comm) polyak::average_parameters(tensors, *comm);  // one final average: every rank ends equal
  run.seconds_per_epoch = (MPI_Wtime() - start) / s.epochs;
  if (comm) MPI_Allreduce(MPI_IN_PLACE, &run.seconds_per_epoch, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  run.score = evaluate(model, data.test);
  return run;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    polyak::MpiCommunicator world(MPI_COMM_WORLD);
    Settings s;
    std::string path = POLYAK_EXAMPLE_DATA "/digits.csv";
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if ((arg == "--hidden" || arg == "--delay") && i + 1 < argc) {
        const long value = std::stol(argv[++i]);
        if (value < 1) throw std::runtime_error(arg + " must be >= 1");
        if (arg == "--hidden") s.hidden = static_cast<int>(value);
        if (arg == "--delay") s.delay = value;
      } else if (arg.rfind("--", 0) == 0) {
        throw std::runtime_error("unknown option " + arg +
                                 " (usage: local_sgd_mpi [digits.csv] [--hidden N] [--delay D])");
      } else {
        path = arg;
      }
    }
    const Digits data = load_digits(path);
    if (s.total_batch % world.size() != 0)
      throw std::runtime_error("the world size must divide the total batch");
    const std::size_t local_batch = static_cast<std::size_t>(s.total_batch / world.size());

    std::vector<int> shard;  // rank r takes every size-th training sample, from r on
    for (std::size_t i = static_cast<std::size_t>(world.rank()); i < data.train.labels.size();
         i += static_cast<std::size_t>(world.size())) {
      shard.push_back(static_cast<int>(i));
    }
    // Timing: one run to warm up (the first run of a process is slower: its pages fault in), then
    // three pairs, blocking and overlapped alternating; the median of each. Same seeds: every run
    // of a kind gives the same model.
    train(s, data, shard, local_batch, &world, false);
    std::vector<Run> blocking_runs, overlapped_runs;
    for (int pair = 0; pair < 3; ++pair) {
      blocking_runs.push_back(train(s, data, shard, local_batch, &world, false));
      overlapped_runs.push_back(train(s, data, shard, local_batch, &world, true));
    }
    const Run blocking = median_time(blocking_runs), overlapped = median_time(overlapped_runs);
    const std::int64_t steps = static_cast<std::int64_t>(shard.size() / local_batch) * s.epochs;

    if (world.rank() == 0) {
      std::vector<int> all(data.train.labels.size());
      std::iota(all.begin(), all.end(), 0);
      const Run single = train<polyak::MpiCommunicator>(s, data, all, static_cast<std::size_t>(s.total_batch),
                                                        nullptr, false);
      std::printf(
          "post-local SGD on the digits: %d ranks x %zu samples a step (%d in all), %d epochs, %d hidden\n",
          world.size(), local_batch, s.total_batch, s.epochs, s.hidden);
      std::printf(
          "  %lld steps: %lld with gradient averaging (warm-up), then a model average every %lld steps\n",
          static_cast<long long>(steps), static_cast<long long>(s.warmup), static_cast<long long>(s.period));
      std::printf("%-40s %-14s %-10s %-17s %s\n", "", "test accuracy", "test loss", "averaging rounds",
                  "ms per epoch");
      const std::string ranks = std::to_string(world.size()) + " ranks";
      const auto row = [&](const std::string& name, const Run& run, bool distributed) {
        std::printf("%-40s %-14.2f %-10.4f %-17s %.2f\n", name.c_str(), 100 * run.score.accuracy,
                    run.score.loss, distributed ? std::to_string(s.warmup + run.averages + 1).c_str() : "-",
                    1e3 * run.seconds_per_epoch);
      };
      row("post-local SGD, " + ranks + ", blocking", blocking, true);
      row("post-local SGD, " + ranks + ", overlapped (" + std::to_string(s.delay) + ")", overlapped, true);
      row("SGD, one process, same total batch", single, false);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "local_sgd_mpi: %s\n", e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
