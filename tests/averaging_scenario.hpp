// SPDX-License-Identifier: MIT
// One run of every averager and of a sharded EMA's save and re-sliced load, written once for any
// communicator, so that the same run over threads, MPI (tests/mpi/test_mpi.cpp) and Gloo
// (tests/torch/test_c10d.cpp) can be compared bit for bit. The group's size must be a power of two
// and its sums are exact in any order (multiples of 1/8 well inside float's 24 bits): MPI and Gloo
// add in orders of their own, so only such sums are the same number on every backend.
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "polyak/checkpoint/distributed_checkpoint.hpp"
#include "polyak/core/averaged_model.hpp"
#include "polyak/core/model_averaging.hpp"
#include "polyak/core/shard_view.hpp"
#include "support.hpp"

namespace polyak_test {

/// What one member saw: values after each averaging step, the bytes of the sharded save, and its
/// piece of the model loaded back on a different cut.
struct ScenarioResult {
  std::vector<double> values;
  std::string saved;
  std::vector<float> reloaded;

  bool operator==(const ScenarioResult& o) const {
    return values == o.values && saved == o.saved && reloaded == o.reloaded;
  }
};

/// Collective over `comm` (2, 4, 8, ... members): average_parameters over a float and a double list,
/// PeriodicModelAverager blocking and overlapped with delays 1 and period, HierarchicalModelAverager
/// blocking and overlapped (its groups made by comm.split), an EMA on an uneven ShardView saved with
/// save_distributed at `path` (the same path on every member) and loaded back on another cut.
template <class Comm>
ScenarioResult averaging_scenario(Comm& comm, const std::string& path) {
  const int n = comm.size(), r = comm.rank();
  ScenarioResult result;
  Eigen::VectorXf w(4099);
  Eigen::VectorXd b(77);
  const auto reset = [&] {
    for (Eigen::Index i = 0; i < w.size(); ++i) w[i] = static_cast<float>((r + 1) * (i % 1013)) / 8;
    for (Eigen::Index i = 0; i < b.size(); ++i) b[i] = static_cast<double>(r * 3 + i % 17) / 4;
  };
  const auto keep = [&] {
    for (const Eigen::Index i : {Eigen::Index{0}, Eigen::Index{5}, Eigen::Index{1012}, w.size() - 1})
      result.values.push_back(w[i]);
    result.values.push_back(b[3]);
  };
  polyak::ParameterList<float> lw;
  lw.add("w", w);
  polyak::ParameterList<double> lb;
  lb.add("b", b);

  reset();
  polyak::average_parameters(lw, comm);
  polyak::average_parameters(lb, comm);
  keep();

  const auto train = [&](int step) {
    w.array() += static_cast<float>(r + step) / 8;
    b.array() -= static_cast<double>(r * step) / 4;
  };
  // Trains `steps` steps from the reset model with `averager` after each, then synchronizes it.
  const auto run = [&](auto averager, int steps) {
    reset();
    for (int step = 0; step < steps; ++step) {
      train(step);
      averager.average_parameters(lw, lb);
      keep();
    }
    averager.synchronize(lw, lb);
    keep();
  };
  // Blocking, then overlapped with delay 1 and with delay = period.
  run(polyak::PeriodicModelAverager<Comm>(3, 1, comm), 9);
  for (const std::int64_t delay : {std::int64_t{1}, std::int64_t{3}})
    run(polyak::PeriodicModelAverager<Comm>(3, 1, comm, polyak::Overlap{delay}), 9);
  // Hierarchical: pairs every 2 steps, everyone every 4 (a group of 2 pairs with itself).
  const std::vector<std::pair<std::int64_t, int>> levels{{2, n >= 4 ? 2 : 1}, {4, n}};
  run(polyak::HierarchicalModelAverager<Comm>(levels, 0, comm), 8);
  run(polyak::HierarchicalModelAverager<Comm>(levels, 0, comm, polyak::Overlap{1}), 8);

  // A sharded EMA: rank r holds an uneven piece (rank 0 the most, the last possibly none).
  polyak::FlatLayout layout;
  layout.add("a", {3, 5}).add("c", {2, 2, 2}).add("d", {1}).add("e", {40});  // 64 scalars
  const auto cut = [&](int member, int shift) {
    return std::min<std::size_t>(layout.numel(), static_cast<std::size_t>(member * (64 / n + shift)));
  };
  const auto trained = [](int t, std::size_t i) {
    return static_cast<float>((static_cast<int>(i) * 37 + t * 11) % 97) / 8.0f;
  };
  {
    const std::size_t begin = cut(r, 1), end = r + 1 == n ? layout.numel() : cut(r + 1, 1);
    std::vector<float> mine(end - begin);
    polyak::ShardView<float> shard(layout, mine.data(), begin, end, comm);
    polyak::AveragedModel<float, polyak::EMA> ema(shard.parameters(), polyak::EMA(0.75));
    for (int t = 0; t < 5; ++t) {
      for (std::size_t i = 0; i < mine.size(); ++i) mine[i] = trained(t, begin + i);
      ema.update_parameters(shard.parameters());
    }
    polyak::save_distributed(path, ema.state_dict(), shard, comm);
    result.saved = file_bytes(path);
  }
  {
    const std::size_t begin = cut(r, -1), end = r + 1 == n ? layout.numel() : cut(r + 1, -1);
    std::vector<float> mine(end - begin, -1.0f);
    polyak::ShardView<float> shard(layout, mine.data(), begin, end, comm);
    polyak::AveragedModel<float, polyak::EMA> ema(shard.parameters(), polyak::EMA(0.75));
    polyak::load_distributed(ema, path, shard, comm);
    ema.copy_to(shard.parameters());
    result.reloaded = mine;
  }
  return result;
}

}  // namespace polyak_test
