// SPDX-License-Identifier: MIT
// local_sgd_mpi: post-local SGD over MPI on the handwritten digits (PyTorch's PostLocalSGD recipe).
//
// Each rank trains the MLP of swa_digits on its own shard of the training data. For the warm-up
// steps the ranks average gradients every step (what DistributedDataParallel does); after it, each
// rank takes local SGD steps and a PeriodicModelAverager averages the models every `period` steps,
// so the ranks talk `period` times less often. Rank 0 then trains the same model in one process
// with the same total batch, and prints both test scores.
//
//   usage: mpirun -np 4 local_sgd_mpi [data/digits.csv]
#include <polyak/model_averaging.hpp>
#include <polyak/mpi.hpp>

#include <cmath>
#include <algorithm>  // std::shuffle
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
};

/// PyTorch's CosineAnnealingLR over the whole run (eta_min 0), by step.
double cosine_lr(const Settings& s, std::int64_t step, std::int64_t steps) {
  return s.lr * (1 + std::cos(M_PI * static_cast<double>(step) / static_cast<double>(steps))) / 2;
}

/// Trains on `samples` (this rank's shard) with `batch` samples a step. With a communicator of more
/// than one rank, it averages gradients during the warm-up and models every `period` steps after.
template <class Comm>
Score train(const Settings& s, const Digits& data, const std::vector<int>& samples, std::size_t batch,
            Comm* comm, std::int64_t* model_averages) {
  std::mt19937 init_rng(s.seed);  // the same initial model on every rank
  Mlp model(s.hidden, init_rng);
  MlpGradients velocity(model);
  const auto tensors = model.tensors();
  std::mt19937 rng(s.seed * 1000 + (comm ? static_cast<unsigned>(comm->rank()) : 0u));
  std::vector<int> order = samples;
  const std::size_t steps_per_epoch = order.size() / batch;
  const auto steps = static_cast<std::int64_t>(steps_per_epoch) * s.epochs;

  std::optional<polyak::PeriodicModelAverager<Comm>> averager;
  if (comm) averager.emplace(s.period, s.warmup, *comm);  // polyak: post-local SGD's averager

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
      if (averager && averager->average_parameters(tensors)) ++*model_averages;
    }
  }
  if (comm) polyak::average_parameters(tensors, *comm);  // one final average: every rank ends equal
  return evaluate(model, data.test);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    polyak::MpiCommunicator world(MPI_COMM_WORLD);
    const Settings s;
    const Digits data = load_digits(argc > 1 ? argv[1] : POLYAK_EXAMPLE_DATA "/digits.csv");
    if (s.total_batch % world.size() != 0)
      throw std::runtime_error("the world size must divide the total batch");
    const std::size_t local_batch = static_cast<std::size_t>(s.total_batch / world.size());

    std::vector<int> shard;  // rank r takes every size-th training sample, from r on
    for (std::size_t i = static_cast<std::size_t>(world.rank()); i < data.train.labels.size();
         i += static_cast<std::size_t>(world.size())) {
      shard.push_back(static_cast<int>(i));
    }
    std::int64_t averages = 0;
    const Score local = train(s, data, shard, local_batch, &world, &averages);
    const std::int64_t steps = static_cast<std::int64_t>(shard.size() / local_batch) * s.epochs;

    if (world.rank() == 0) {
      std::vector<int> all(data.train.labels.size());
      std::iota(all.begin(), all.end(), 0);
      std::int64_t unused = 0;
      const Score single = train<polyak::MpiCommunicator>(
          s, data, all, static_cast<std::size_t>(s.total_batch), nullptr, &unused);
      std::printf("post-local SGD on the digits: %d ranks x %zu samples a step (%d in all), %d epochs\n",
                  world.size(), local_batch, s.total_batch, s.epochs);
      std::printf(
          "  %lld steps: %lld with gradient averaging (warm-up), then a model average every %lld steps\n",
          static_cast<long long>(steps), static_cast<long long>(s.warmup), static_cast<long long>(s.period));
      std::printf("%-40s %-14s %-10s %s\n", "", "test accuracy", "test loss", "averaging rounds");
      std::printf(
          "%-40s %-14.2f %-10.4f %lld\n",
          (std::string("post-local SGD, ") + std::to_string(world.size()) + " ranks (polyak)").c_str(),
          100 * local.accuracy, local.loss, static_cast<long long>(s.warmup + averages + 1));
      std::printf("%-40s %-14.2f %-10.4f %s\n", "SGD, one process, same total batch", 100 * single.accuracy,
                  single.loss, "-");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "local_sgd_mpi: %s\n", e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
