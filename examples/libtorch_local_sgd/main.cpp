// SPDX-License-Identifier: MIT
// libtorch_local_sgd: post-local SGD of the digits CNN over a c10d Gloo process group, the processes
// started the way torchrun starts them: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the
// environment (launch.sh beside this file does it on one machine).
//
// Each process trains libtorch_swa's CNN on its own shard of the training data. For the warm-up
// steps the processes average gradients every step (DistributedDataParallel's way, here with
// libtorch::average_parameters on the gradients themselves); after it each takes local SGD steps
// and a PeriodicModelAverager over C10dCommunicator averages the models' parameters every `period`
// steps. It trains twice with the same seeds, averaging blocking and then overlapped (each average
// lands `delay` steps after it starts), prints each run's test score and time per epoch, and
// process 0 then trains the same model alone with the same total batch. As local_sgd_mpi does
// over MPI.
//
//   usage: examples/libtorch_local_sgd/launch.sh N build/.../libtorch_local_sgd [digits.csv] [--epochs E]
//   [--delay D]
#include <polyak/core/model_averaging.hpp>
#include <polyak/torch.hpp>
#include <polyak/torch/c10d.hpp>
#include <polyak/torch/process_group_average.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cerrno>
#include <cstdlib>  // std::getenv, std::strtol
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/digits_cnn.hpp"
#include "../common/report.hpp"

namespace {

using polyak::libtorch::C10dCommunicator;

struct Settings {
  int epochs = 20;
  int total_batch = 32;      // over all processes
  std::int64_t warmup = 84;  // steps of gradient averaging: two epochs at 4 processes
  std::int64_t period = 8;   // then a model average every 8 steps
  double lr = 0.05, momentum = 0.9, weight_decay = 5e-4;
  std::uint64_t seed = 1;
  std::int64_t delay = 4;  // the overlapped run's: an average lands 4 steps after it starts
};

struct Run {
  Score score;
  double seconds_per_epoch = 0;
  std::int64_t rounds = 0;  // the group's averaging rounds: gradients, models, and the final one
};

/// The slowest process's value (every member learns it).
double slowest(C10dCommunicator& comm, double value) {
  std::vector<double> all(static_cast<std::size_t>(comm.size()), 0.0);
  all[static_cast<std::size_t>(comm.rank())] = value;
  comm.allreduce_sum(all.data(), all.size());
  return *std::max_element(all.begin(), all.end());
}

/// Trains on the samples `shard` (indices into the training set), `batch` a step. With a group of
/// more than one process: gradients averaged during the warm-up, models every `period` steps after.
Run train(const Settings& s, const Digits& data, const torch::Tensor& shard, std::int64_t batch,
          C10dCommunicator* comm, bool overlap) {
  const auto start = std::chrono::steady_clock::now();
  const torch::Tensor images = images_of(data.train), labels = labels_of(data.train);
  torch::manual_seed(s.seed);  // the same initial model in every process
  torch::nn::Sequential model = make_digits_cnn();
  torch::optim::SGD optimizer(
      model->parameters(), torch::optim::SGDOptions(s.lr).momentum(s.momentum).weight_decay(s.weight_decay));
  const auto params = polyak::libtorch::parameters<float>(*model);  // what PyTorch's averager averages
  std::vector<torch::Tensor> grads;
  torch::manual_seed(s.seed * 1000 + static_cast<std::uint64_t>(comm ? comm->rank() : 0));  // own shuffles

  std::optional<polyak::PeriodicModelAverager<C10dCommunicator>> averager;  // polyak: post-local SGD's
  if (comm && overlap) {
    averager.emplace(s.period, s.warmup, *comm, polyak::Overlap{s.delay});
  } else if (comm) {
    averager.emplace(s.period, s.warmup, *comm);
  }
  Run run;
  const std::int64_t steps_per_epoch = shard.size(0) / batch, steps = steps_per_epoch * s.epochs;
  std::int64_t step = 0;
  for (int epoch = 0; epoch < s.epochs; ++epoch) {
    model->train();
    const torch::Tensor order = shard.index_select(0, torch::randperm(shard.size(0), torch::kLong));
    for (std::int64_t b = 0; b < steps_per_epoch; ++b, ++step) {
      const torch::Tensor index = order.slice(0, b * batch, (b + 1) * batch);
      const torch::Tensor loss = torch::nn::functional::cross_entropy(
          model->forward(images.index_select(0, index)), labels.index_select(0, index));
      optimizer.zero_grad();
      loss.backward();
      if (comm && step < s.warmup) {  // polyak: the gradients averaged over the group, as DDP does
        grads.clear();
        for (const auto& p : model->parameters()) grads.push_back(p.grad());
        polyak::libtorch::average_parameters(grads, *comm->group());
        ++run.rounds;
      }
      // PyTorch's CosineAnnealingLR over the run (eta_min 0), by step.
      optimizer.param_groups()[0].options().set_lr(s.lr * (1 + std::cos(M_PI * step / steps)) / 2);
      optimizer.step();
      if (averager && averager->average_parameters(params)) ++run.rounds;  // polyak: at its steps
    }
  }
  if (averager) averager->synchronize(params);  // polyak: lands an average still in flight
  if (comm)
    polyak::average_parameters(params, *comm), ++run.rounds;  // one final average: every process ends equal
  run.seconds_per_epoch =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / s.epochs;
  if (comm) run.seconds_per_epoch = slowest(*comm, run.seconds_per_epoch);
  run.score = evaluate(model, images_of(data.test), labels_of(data.test));
  return run;
}

/// `text` as a whole number in [low, high], or an error naming `what`.
long whole_number(const std::string& what, const char* text, long low, long high) {
  if (!text) throw std::runtime_error(what + " is not set (start the program with launch.sh, or torchrun)");
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || errno == ERANGE || value < low || value > high) {
    throw std::runtime_error(what + " must be a whole number in [" + std::to_string(low) + ", " +
                             std::to_string(high) + "], not '" + text + "'");
  }
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Settings s;
    std::string path = POLYAK_EXAMPLE_DATA "/digits.csv";
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--epochs" || arg == "--delay") {
        // (The delay is at most the averaging period: checked here, not after two trainings.)
        const long value =
            whole_number(arg, i + 1 < argc ? argv[++i] : nullptr, 1, arg == "--epochs" ? 10000 : s.period);
        if (arg == "--epochs") s.epochs = static_cast<int>(value);
        if (arg == "--delay") s.delay = value;
      } else if (arg.rfind("--", 0) == 0) {
        throw std::runtime_error("unknown option " + arg +
                                 " (usage: libtorch_local_sgd [digits.csv] [--epochs E] [--delay D])");
      } else {
        path = arg;
      }
    }
    // Everything a process can find wrong by itself, before it meets the others (one that left
    // while the others connect would leave them waiting).
    const int size = static_cast<int>(whole_number("WORLD_SIZE", std::getenv("WORLD_SIZE"), 1, 1024));
    const int rank = static_cast<int>(whole_number("RANK", std::getenv("RANK"), 0, size - 1));
    const char* host = std::getenv("MASTER_ADDR");
    c10d::TCPStoreOptions options;
    options.port =
        static_cast<std::uint16_t>(whole_number("MASTER_PORT", std::getenv("MASTER_PORT"), 1, 65535));
    options.isServer = rank == 0;
    options.numWorkers = static_cast<std::size_t>(size);
    if (s.total_batch % size != 0)
      throw std::runtime_error("the world size must divide the total batch of 32");
    const Digits data = load_digits(path);
    auto store = c10::make_intrusive<c10d::TCPStore>(host ? host : "127.0.0.1", options);
    C10dCommunicator world = C10dCommunicator::gloo(store, rank, size);
    torch::set_num_threads(1);  // as torchrun sets OMP_NUM_THREADS=1: the processes share the cores

    const std::int64_t local_batch = s.total_batch / size;
    const auto n = static_cast<std::int64_t>(data.train.labels.size());
    const torch::Tensor shard = torch::arange(rank, n, size, torch::kLong);  // every size-th sample
    // One run to warm up, then three pairs, blocking and overlapped alternating; the median of each.
    train(s, data, shard, local_batch, &world, false);
    std::vector<Run> blocking_runs, overlapped_runs;
    for (int pair = 0; pair < 3; ++pair) {
      blocking_runs.push_back(train(s, data, shard, local_batch, &world, false));
      overlapped_runs.push_back(train(s, data, shard, local_batch, &world, true));
    }
    const Run blocking = median_time(blocking_runs), overlapped = median_time(overlapped_runs);
    if (rank == 0) {
      const Run single = train(s, data, torch::arange(n, torch::kLong), s.total_batch, nullptr, false);
      std::printf(
          "post-local SGD of the digits CNN over Gloo: %d processes x %lld samples a step (%d in all), %d "
          "epochs\n",
          size, static_cast<long long>(local_batch), s.total_batch, s.epochs);
      const std::int64_t steps = shard.size(0) / local_batch * s.epochs;
      std::printf(
          "  %lld steps: %lld with gradient averaging (warm-up), then a model average every %lld steps%s\n",
          static_cast<long long>(steps), static_cast<long long>(std::min(steps, s.warmup)),
          static_cast<long long>(s.period),
          steps <= s.warmup ? " (none: the warm-up is the whole run, so both runs are the same)" : "");
      std::printf("%-44s %-14s %-10s %-17s %s\n", "", "test accuracy", "test loss", "averaging rounds",
                  "ms per epoch");
      const std::string processes = std::to_string(size) + " processes";
      const auto row = [&](const std::string& name, const Run& run, bool distributed) {
        std::printf("%-44s %-14.2f %-10.4f %-17s %.2f\n", name.c_str(), 100 * run.score.accuracy,
                    run.score.loss, distributed ? std::to_string(run.rounds).c_str() : "-",
                    1e3 * run.seconds_per_epoch);
      };
      row("post-local SGD, " + processes + ", blocking", blocking, true);
      row("post-local SGD, " + processes + ", overlapped (" + std::to_string(s.delay) + ")", overlapped,
          true);
      row("SGD, one process, same total batch", single, false);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "libtorch_local_sgd: %s\n", e.what());
    return 1;
  }
  return 0;
}
