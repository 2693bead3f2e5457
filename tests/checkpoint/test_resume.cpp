// SPDX-License-Identifier: MIT
// A run killed at step k and resumed from its checkpoint ends bit-identical to one never stopped.
// Two ranks (threads) train the flagship example's MLP on their shards with SGD, an EMA every step,
// SWA and SWALR every 10 steps after step 30, and a periodic averager across the two.
#include "support.hpp"

#include <catch2/catch.hpp>

#include <filesystem>
#include <sstream>
#include <thread>

#include "../../examples/common/digits.hpp"
#include "../../examples/common/mlp.hpp"
#include "polyak/checkpoint.hpp"
#include "polyak/polyak.hpp"

namespace {

constexpr int total_steps = 80, batch = 16;

std::vector<std::int64_t> as_int64(const std::vector<int>& v) { return {v.begin(), v.end()}; }

/// Runs rank `rank` from step 0, or from `resume` (a checkpoint file) if given, to `total_steps`;
/// saves a checkpoint at step `save_at` (if >= 0) to `save`. Returns the final SWA and EMA weights.
std::vector<float> run(const Digits& data, polyak::ThreadCommunicator comm, int save_at,
                       const std::string& save, const std::string& resume) {
  std::mt19937 rng(7);  // the same initial model on both ranks
  Mlp model(32, rng);
  MlpGradients velocity(model);
  const auto tensors = model.tensors();
  const auto velocities = velocity.tensors();
  polyak::AveragedModel<float> swa(tensors);
  polyak::AveragedModel<float, polyak::EMA> ema(tensors, polyak::EMA{0.95});
  std::vector<double> lrs{0.05};
  polyak::SWALR scheduler(lrs, 0.02, 3);
  polyak::PeriodicModelAverager averager(4, 8, comm);
  std::vector<int> order;
  for (int i = comm.rank(); i < static_cast<int>(data.train.labels.size()); i += 2) order.push_back(i);
  std::mt19937 shuffle_rng(100 + static_cast<unsigned>(comm.rank()));
  int start = 0;

  if (!resume.empty()) {  // restore every piece of state the loop reads
    const polyak::StateDict sd = polyak::load_safetensors(resume);
    for (const auto& t : tensors) sd.copy_to("model." + t.name(), t.view());
    for (const auto& t : velocities) sd.copy_to("velocity." + t.name(), t.view());
    swa.load_state_dict(sd.extract("swa."));
    ema.load_state_dict(sd.extract("ema."));
    scheduler.load_state_dict(sd.extract("swalr."));
    averager.load_state_dict(sd.extract("averager."));
    model.bn.load_state_dict(sd.extract("bn."));
    sd.copy_to("lrs", polyak::TensorView<double>(lrs.data(), {1}));
    std::vector<std::int64_t> stored(order.size());
    sd.copy_to("order", stored.data(), {static_cast<std::int64_t>(stored.size())});
    order.assign(stored.begin(), stored.end());
    std::istringstream(sd.metadata.at("rng")) >> shuffle_rng;
    start = static_cast<int>(sd.scalar<std::int64_t>("step"));
  }

  const int steps_per_epoch = static_cast<int>(order.size()) / batch;
  std::vector<int> labels;
  for (int step = start; step < total_steps; ++step) {
    if (step == save_at) {
      polyak::StateDict sd;
      for (const auto& t : tensors) sd.insert("model." + t.name(), t.view());
      for (const auto& t : velocities) sd.insert("velocity." + t.name(), t.view());
      sd.merge("swa.", swa.state_dict());
      sd.merge("ema.", ema.state_dict());
      sd.merge("swalr.", scheduler.state_dict());
      sd.merge("averager.", averager.state_dict());
      sd.merge("bn.", model.bn.state_dict());
      sd.insert("lrs", polyak::TensorView<double>(lrs.data(), {1}));
      auto order64 = as_int64(order);
      sd.insert("order", order64.data(), {static_cast<std::int64_t>(order64.size())});
      std::ostringstream rng_text;
      rng_text << shuffle_rng;
      sd.metadata["rng"] = rng_text.str();
      sd.insert_scalar<std::int64_t>("step", step);
      polyak::save_safetensors(save, sd);
      return {};  // the run "dies" here
    }
    if (step % steps_per_epoch == 0) std::shuffle(order.begin(), order.end(), shuffle_rng);
    const auto b = static_cast<std::size_t>(step % steps_per_epoch) * batch;
    const RowMatrix x = rows_of(data.train, order, b, b + batch, &labels);
    sgd_step(model, velocity, x, labels, lrs[0], 0.9, 5e-4);
    averager.average_parameters(tensors);
    ema.update_parameters(tensors);
    if (step >= 30 && step % 10 == 0) {
      swa.update_parameters(tensors);
      scheduler.step();
    }
  }
  std::vector<float> out;
  for (const auto* averaged : {&swa.tensors(), &ema.tensors()}) {
    for (const auto& t : *averaged) out.insert(out.end(), t.data(), t.data() + t.numel());
  }
  return out;
}

/// Runs both ranks on threads.
std::vector<std::vector<float>> run_both(const Digits& data, int save_at, const std::string& folder,
                                         bool resume) {
  std::vector<std::vector<float>> results(2);
  const auto errors = polyak_test::on_threads(2, [&](polyak::ThreadCommunicator& comm) {
    const std::string file = folder + "/rank" + std::to_string(comm.rank()) + ".safetensors";
    results[static_cast<std::size_t>(comm.rank())] =
        run(data, comm, resume ? -1 : save_at, file, resume ? file : "");
  });
  for (const auto& e : errors) {
    if (!e.empty()) throw std::runtime_error(e);
  }
  return results;
}

}  // namespace

TEST_CASE("a resumed run ends bit-identical to an uninterrupted one", "[serialization][resume]") {
  const Digits data = load_digits(POLYAK_EXAMPLE_DATA "/digits.csv");
  const polyak_test::TemporaryFolder temporary("resume");
  const std::string folder = temporary.path();
  const auto uninterrupted = run_both(data, -1, folder, false);
  for (const int k : {37, 53}) {  // mid-epoch, past SWA's start, between averaging steps
    INFO("checkpoint at step " << k);
    run_both(data, k, folder, false);
    const auto resumed = run_both(data, k, folder, true);
    CHECK(resumed[0] == uninterrupted[0]);
    CHECK(resumed[1] == uninterrupted[1]);
  }
  CHECK(uninterrupted[0].size() == 2 * (32 * 64 + 32 + 32 + 32 + 10 * 32 + 10 + 32 + 32));  // SWA and EMA
  std::filesystem::remove_all(folder);
}
