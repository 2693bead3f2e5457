// SPDX-License-Identifier: MIT
// The checkpoint layer's bridges: StateIO<T> for each stateful core type, which its state_dict()
// and load_state_dict() members call. Names follow PyTorch's state_dict() keys. Every load checks
// the whole state first and changes nothing when it refuses it (FormatError naming what is wrong).
#pragma once

#include <algorithm>  // std::min
#include <cmath>      // std::isfinite
#include <cstddef>
#include <cstring>  // std::memcpy, std::memmove
#include <cstdint>  // std::int64_t
#include <limits>
#include <optional>
#include <string>
#include <utility>  // std::move
#include <vector>

#include "polyak/core/detail/counter.hpp"
#include "polyak/core/averaged_model.hpp"
#include "polyak/core/batch_norm.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/model_averaging.hpp"
#include "polyak/checkpoint/rule_settings.hpp"
#include "polyak/checkpoint/state_dict.hpp"
#include "polyak/core/swag.hpp"
#include "polyak/core/swalr.hpp"

namespace polyak {

namespace detail {

/// The names in AveragedModel's state, as PyTorch's AveragedModel.state_dict() spells them; what
/// readers of such states (post_hoc_ema.hpp) look for.
struct AveragedModelKeys {
  static constexpr const char* module_prefix = "module.";  ///< before each of the model's names
  static constexpr const char* n_averaged = "n_averaged";
};

}  // namespace detail

namespace detail {

/// Checks what an averaged model's state holds beside its tensors, whose names, dtypes and shapes
/// the caller checked: nothing else (`tensors` + n_averaged entries), n_averaged >= 0, the same
/// use_buffers and the same averaging settings as `avg_fn`. Returns n_averaged; FormatError naming
/// the first difference otherwise. Shared by every backend's averaged model, so that their states
/// load into each other.
template <class AvgFn>
std::int64_t check_averaged_state(const StateDict& sd, std::size_t tensors, bool use_buffers,
                                  const AvgFn& avg_fn, const char* who) {
  if (sd.size() != tensors + 1) {
    throw FormatError(std::string(who) + ": the state holds " + std::to_string(sd.size()) +
                      " entries, this model " + std::to_string(tensors + 1));
  }
  const auto n_averaged = sd.scalar<std::int64_t>(detail::AveragedModelKeys::n_averaged);
  check_counter(n_averaged, "n_averaged", who);
  const auto saved_use_buffers = sd.metadata.find("use_buffers");
  if (saved_use_buffers != sd.metadata.end() &&
      saved_use_buffers->second != (use_buffers ? "true" : "false")) {
    throw FormatError(std::string(who) + ": the state has use_buffers " + saved_use_buffers->second);
  }
  Metadata settings;
  save_settings(avg_fn, settings);
  for (const auto& [key, value] : settings) {
    const auto saved = sd.metadata.find(key);
    if (saved == sd.metadata.end() || !same_setting(saved->second, value)) {
      throw FormatError(std::string(who) + ": the state's averaging function has " + key + " '" +
                        (saved == sd.metadata.end() ? std::string("(none)") : saved->second) +
                        "' where this model's has '" + value + "'");
    }
  }
  return n_averaged;
}

/// What an averaged model's state holds beside its tensors: n_averaged, use_buffers and the
/// averaging function's settings.
template <class AvgFn>
StateDict averaged_state_scalars(std::int64_t n_averaged, bool use_buffers, const AvgFn& avg_fn) {
  StateDict sd;
  sd.insert_scalar<std::int64_t>(detail::AveragedModelKeys::n_averaged, n_averaged);
  sd.metadata["use_buffers"] = use_buffers ? "true" : "false";
  save_settings(avg_fn, sd.metadata);
  return sd;
}

}  // namespace detail

/// The averaged copy as PyTorch's AveragedModel.state_dict() names it: "module.<name>" for each
/// tensor (in accumulator_t<T>), "n_averaged"; the averaging function's settings (EMA's decay) and
/// use_buffers in the metadata. The tensors are borrowed from the average (StateDict::borrow): the
/// state copies nothing, follows later updates and lives no longer than the model; owned() makes a
/// snapshot.
template <class T, class AvgFn>
struct StateIO<AveragedModel<T, AvgFn>> {
  using Model = AveragedModel<T, AvgFn>;  ///< the model whose state it is

  /// The state, as the checkpoint layer saves it.
  static StateDict save(const Model& model) {
    StateDict sd;
    for (const auto& entry : model.averaged_)
      sd.borrow(detail::AveragedModelKeys::module_prefix + entry.name(), entry.view());
    sd.merge("", detail::averaged_state_scalars(model.n_averaged_, model.use_buffers_, model.avg_fn_));
    return sd;
  }

  /// Refused: tensors that differ from the model's in names, shapes or types, a negative n_averaged,
  /// another use_buffers, or averaging settings (EMA's decay, a schedule's, PowerEMA's gamma) other
  /// than the model's. As in PyTorch, the averaging function is the one the model was constructed
  /// with: construct it with the settings of the run it resumes. A user's function with no settings
  /// is not checked.
  static void load(Model& model, const StateDict& sd) {
    using Accumulator = typename Model::Accumulator;
    for (const auto& entry : model.averaged_) {
      sd.expect<Accumulator>(detail::AveragedModelKeys::module_prefix + entry.name(), entry.shape());
    }
    const std::int64_t n_averaged =
        detail::check_averaged_state(sd, model.averaged_.size(), model.use_buffers_, model.avg_fn_,
                                     "polyak::AveragedModel::load_state_dict");
    for (const auto& entry : model.averaged_) {
      sd.copy_to(detail::AveragedModelKeys::module_prefix + entry.name(), entry.view());
    }
    model.n_averaged_ = n_averaged;
  }
};

/// PyTorch's SWALR.state_dict() without the optimizer: "swa_lrs", "last_lrs" (F64, one per group),
/// "anneal_epochs", "last_epoch", "step_count" (I64), and the strategy in the metadata.
template <class Optimizer>
struct StateIO<SWALR<Optimizer>> {
  using Scheduler = SWALR<Optimizer>;  ///< the scheduler whose state it is

  /// The state, as the checkpoint layer saves it.
  static StateDict save(const Scheduler& scheduler) {
    const auto& state = scheduler.state_;
    StateDict sd;
    sd.insert("swa_lrs", state.swa_lrs.data(), {static_cast<std::int64_t>(state.swa_lrs.size())});
    sd.insert("last_lrs", state.last_lrs.data(), {static_cast<std::int64_t>(state.last_lrs.size())});
    sd.insert_scalar<std::int64_t>("anneal_epochs", state.anneal_epochs);
    sd.insert_scalar<std::int64_t>("last_epoch", state.last_epoch);
    sd.insert_scalar<std::int64_t>("step_count", state.step_count);
    sd.metadata["anneal_strategy"] = state.strategy == AnnealStrategy::Cos ? "cos" : "linear";
    return sd;
  }

  /// Refused: a state the constructor would refuse (another number of groups, a negative or
  /// non-finite swa_lr, a negative anneal_epochs), a non-finite last rate, a step count or epoch out
  /// of range (negative, or at the largest value, where the next step would overflow), an unknown
  /// strategy.
  static void load(Scheduler& scheduler, const StateDict& sd) {
    const auto groups = static_cast<std::int64_t>(Scheduler::Access::size(scheduler.optimizer_));
    typename Scheduler::State state;
    state.swa_lrs.resize(static_cast<std::size_t>(groups));
    state.last_lrs.resize(static_cast<std::size_t>(groups));
    sd.copy_to("swa_lrs", state.swa_lrs.data(), {groups});
    sd.copy_to("last_lrs", state.last_lrs.data(), {groups});
    state.anneal_epochs = sd.scalar<std::int64_t>("anneal_epochs");
    state.last_epoch = sd.scalar<std::int64_t>("last_epoch");
    state.step_count = sd.scalar<std::int64_t>("step_count");
    const auto strategy = sd.metadata.find("anneal_strategy");
    if (strategy == sd.metadata.end() || (strategy->second != "cos" && strategy->second != "linear")) {
      throw FormatError("polyak::SWALR::load_state_dict: no anneal_strategy 'cos' or 'linear' in the state");
    }
    state.strategy = strategy->second == "cos" ? AnnealStrategy::Cos : AnnealStrategy::Linear;
    std::string problem = Scheduler::invalid(state, static_cast<std::size_t>(groups));
    constexpr auto largest = std::numeric_limits<std::int64_t>::max();
    for (std::size_t g = 0; g < state.last_lrs.size() && problem.empty(); ++g) {
      if (!std::isfinite(state.last_lrs[g]))
        problem = "last_lr of group " + std::to_string(g) + " is not finite";
    }
    if (problem.empty() && (state.step_count < 0 || state.step_count == largest)) {
      problem = "step_count " + std::to_string(state.step_count) + " is out of range";
    }
    if (problem.empty() && state.last_epoch == largest) {
      problem = "last_epoch " + std::to_string(state.last_epoch) + " is out of range";
    }
    if (!problem.empty()) throw FormatError("polyak::SWALR::load_state_dict: " + problem);
    scheduler.state_ = std::move(state);
  }
};

/// PyTorch's names: "running_mean", "running_var", "num_batches_tracked"; the momentum in the
/// metadata ("none" when empty), written by the settings codec. The statistics are borrowed, as
/// AveragedModel's tensors are.
template <class T>
struct StateIO<BatchNormStats<T>> {
  /// The state, as the checkpoint layer saves it.
  static StateDict save(const BatchNormStats<T>& stats) {
    StateDict sd;
    const std::vector<std::int64_t> shape{stats.num_features()};
    sd.insert("running_mean", StoredTensor::borrow(stats.running_mean.data(), shape));
    sd.insert("running_var", StoredTensor::borrow(stats.running_var.data(), shape));
    sd.insert_scalar<std::int64_t>("num_batches_tracked", stats.num_batches_tracked);
    sd.metadata["momentum"] = stats.momentum ? detail::setting_text(*stats.momentum) : "none";
    return sd;
  }

  /// Refused: another size or type, a negative num_batches_tracked, a momentum that is not "none"
  /// or a number in [0, 1] written whole ("0.5abc", "1e999", "nan" and "" are not).
  static void load(BatchNormStats<T>& stats, const StateDict& sd) {
    const char* who = "polyak::BatchNormStats::load_state_dict";
    const std::vector<std::int64_t> shape{stats.num_features()};
    sd.expect<T>("running_mean", shape);
    sd.expect<T>("running_var", shape);
    const auto tracked = sd.scalar<std::int64_t>("num_batches_tracked");
    if (tracked < 0) {
      throw FormatError(std::string(who) + ": num_batches_tracked " + std::to_string(tracked) +
                        " in the state is negative");
    }
    std::optional<double> momentum;
    const auto found = sd.metadata.find("momentum");
    if (found == sd.metadata.end() || found->second != "none") {
      const double value = detail::setting_number(sd.metadata, "momentum", who);
      if (!detail::in_unit_interval(value)) {
        throw FormatError(std::string(who) + ": the state's momentum '" + found->second +
                          "' is outside [0, 1]");
      }
      momentum = value;
    }
    sd.copy_to("running_mean", stats.running_mean.data(), shape);
    sd.copy_to("running_var", stats.running_var.data(), shape);
    stats.num_batches_tracked = tracked;
    stats.momentum = momentum;
  }
};

namespace detail {

/// An overlapped average in flight lives in no checkpoint: saving or loading then is refused.
template <class Averager>
void refuse_in_flight(const Averager& averager, const char* who) {
  if (averager.in_flight()) {
    throw InvalidArgument(std::string(who) +
                          ": an overlapped average is in flight; call synchronize(params) first");
  }
}

}  // namespace detail

/// "step", "period", "warmup_steps" (I64). Refused while an overlapped average is in flight.
template <class Comm>
struct StateIO<PeriodicModelAverager<Comm>> {
  /// The state, as the checkpoint layer saves it.
  static StateDict save(const PeriodicModelAverager<Comm>& averager) {
    detail::refuse_in_flight(averager, "polyak::PeriodicModelAverager::state_dict");
    StateDict sd;
    sd.insert_scalar<std::int64_t>("step", averager.step());
    sd.insert_scalar<std::int64_t>("period", averager.period());
    sd.insert_scalar<std::int64_t>("warmup_steps", averager.warmup_steps());
    return sd;
  }

  /// Refused: a state of another period or warm-up, a negative step.
  static void load(PeriodicModelAverager<Comm>& averager, const StateDict& sd) {
    detail::refuse_in_flight(averager, "polyak::PeriodicModelAverager::load_state_dict");
    const auto step = sd.scalar<std::int64_t>("step");
    if (sd.scalar<std::int64_t>("period") != averager.period() ||
        sd.scalar<std::int64_t>("warmup_steps") != averager.warmup_steps()) {
      throw FormatError(
          "polyak::PeriodicModelAverager::load_state_dict: the state is for another period or warm-up");
    }
    detail::check_counter(step, "step", "polyak::PeriodicModelAverager::load_state_dict");
    averager.step_ = step;
  }
};

/// "step", "warmup_steps" (I64) and "periods" (I64, one per level). Refused while an overlapped
/// average is in flight.
template <class Comm>
struct StateIO<HierarchicalModelAverager<Comm>> {
  /// The state, as the checkpoint layer saves it.
  static StateDict save(const HierarchicalModelAverager<Comm>& averager) {
    detail::refuse_in_flight(averager, "polyak::HierarchicalModelAverager::state_dict");
    StateDict sd;
    sd.insert_scalar<std::int64_t>("step", averager.step());
    sd.insert_scalar<std::int64_t>("warmup_steps", averager.warmup_steps());
    std::vector<std::int64_t> periods;
    for (const auto& level : averager.levels_) periods.push_back(level.first);
    sd.insert("periods", periods.data(), {static_cast<std::int64_t>(periods.size())});
    return sd;
  }

  /// Refused: a state of other periods or warm-up, a negative step.
  static void load(HierarchicalModelAverager<Comm>& averager, const StateDict& sd) {
    detail::refuse_in_flight(averager, "polyak::HierarchicalModelAverager::load_state_dict");
    const auto step = sd.scalar<std::int64_t>("step");
    const auto& levels = averager.levels_;
    std::vector<std::int64_t> periods(levels.size());
    sd.copy_to("periods", periods.data(), {static_cast<std::int64_t>(levels.size())});
    bool same = sd.scalar<std::int64_t>("warmup_steps") == averager.warmup_steps();
    for (std::size_t i = 0; i < levels.size(); ++i) same = same && periods[i] == levels[i].first;
    if (!same) {
      throw FormatError(
          "polyak::HierarchicalModelAverager::load_state_dict: the state is for other periods or warm-up");
    }
    detail::check_counter(step, "step", "polyak::HierarchicalModelAverager::load_state_dict");
    averager.step_ = step;
  }
};

/// "mean.<name>" and "variance.<name>" (borrowed, as AveragedModel's tensors), "deviations.<name>"
/// ([max_rank, shape...], each row row-major), and the I64 scalars "max_rank", "collect_every",
/// "n_updates", "n_collected", "deviations_held", "next_deviation".
template <class T>
struct StateIO<SWAG<T>> {
  using Model = SWAG<T>;                            ///< the SWAG whose state it is
  using Accumulator = typename Model::Accumulator;  ///< its moments' scalar type

  /// The state, as the checkpoint layer saves it.
  static StateDict save(const Model& swag) {
    StateDict sd;
    for (std::size_t p = 0; p < swag.parameters_.size(); ++p) {
      sd.borrow("mean." + swag.mean_[p].name(), swag.mean_[p].view());
      sd.borrow("variance." + swag.variance_[p].name(), swag.variance_[p].view());
    }
    for (std::size_t p = 0; p < swag.parameters_.size(); ++p) {
      const auto& entry = swag.mean_[p];
      std::vector<std::int64_t> shape{swag.max_rank_};
      shape.insert(shape.end(), entry.shape().begin(), entry.shape().end());
      const std::string name = "deviations." + entry.name();
      if (row_major(entry)) {
        sd.insert(name, StoredTensor::borrow(swag.deviations_[p], std::move(shape)));
      } else {  // rows in the tensor's column-major order: written row-major, one row after another
        StoredTensor t;
        t.dtype = dtype_of<Accumulator>();
        t.shape = std::move(shape);
        t.bytes.resize(t.numel() * sizeof(Accumulator));
        for_each_row(swag, p, [&](Accumulator* row, std::size_t k) {
          detail::for_each_row_major(
              entry.shape(), entry.storage_order(), [&](std::size_t i, std::size_t from) {
                std::memcpy(t.bytes.data() + (k * entry.numel() + i) * sizeof(Accumulator), row + from,
                            sizeof(Accumulator));
              });
        });
        sd.insert(name, std::move(t));
      }
    }
    sd.insert_scalar<std::int64_t>("max_rank", swag.max_rank_);
    sd.insert_scalar<std::int64_t>("collect_every", swag.collect_every_);
    sd.insert_scalar<std::int64_t>("n_updates", swag.n_updates_);
    sd.insert_scalar<std::int64_t>("n_collected", swag.n_collected_);
    sd.insert_scalar<std::int64_t>("deviations_held", swag.held_);
    sd.insert_scalar<std::int64_t>("next_deviation", swag.next_deviation_);
    return sd;
  }

  /// Refused (FormatError, nothing changed): other tensors, names or shapes; another max_rank or
  /// collect_every; counters that do not fit together; a negative or NaN variance.
  static void load(Model& swag, const StateDict& sd) {
    const char* who = "polyak::SWAG::load_state_dict";
    const auto fail = [&](const std::string& what) { throw FormatError(std::string(who) + ": " + what); };
    const std::size_t count = swag.parameters_.size();
    if (sd.size() != 3 * count + 6) {
      fail("the state holds " + std::to_string(sd.size()) + " entries, this SWAG " +
           std::to_string(3 * count + 6));
    }
    if (sd.scalar<std::int64_t>("max_rank") != swag.max_rank_ ||
        sd.scalar<std::int64_t>("collect_every") != swag.collect_every_) {
      fail("the state is for max_rank " + std::to_string(sd.scalar<std::int64_t>("max_rank")) +
           ", collect_every " + std::to_string(sd.scalar<std::int64_t>("collect_every")) +
           "; this SWAG has " + std::to_string(swag.max_rank_) + ", " + std::to_string(swag.collect_every_));
    }
    const auto updates = sd.scalar<std::int64_t>("n_updates");
    const auto collected = sd.scalar<std::int64_t>("n_collected");
    const auto held = sd.scalar<std::int64_t>("deviations_held");
    const auto next = sd.scalar<std::int64_t>("next_deviation");
    detail::check_counter(updates, "n_updates", "polyak::SWAG::load_state_dict");
    if (updates < 0 || collected != updates / swag.collect_every_ ||
        held != std::min(collected, swag.max_rank_) ||
        next != (swag.max_rank_ == 0 ? 0 : collected % swag.max_rank_)) {
      fail("its counters do not fit together (n_updates " + std::to_string(updates) + ", n_collected " +
           std::to_string(collected) + ", deviations_held " + std::to_string(held) + ", next_deviation " +
           std::to_string(next) + ")");
    }
    for (std::size_t p = 0; p < count; ++p) {
      const auto& entry = swag.mean_[p];
      const std::vector<std::int64_t> shape(entry.shape().begin(), entry.shape().end());
      sd.expect<Accumulator>("mean." + entry.name(), shape);
      std::vector<std::int64_t> rows{swag.max_rank_};
      rows.insert(rows.end(), shape.begin(), shape.end());
      sd.expect<Accumulator>("deviations." + entry.name(), rows);
      bool non_negative = true;
      detail::for_each_double(sd.expect<Accumulator>("variance." + entry.name(), shape),
                              [&](std::size_t, double v) { non_negative = non_negative && v >= 0.0; });
      if (!non_negative) fail("'variance." + entry.name() + "' holds a negative or NaN value");
    }
    for (std::size_t p = 0; p < count; ++p) {
      const auto& entry = swag.mean_[p];
      sd.copy_to("mean." + entry.name(), entry.view());
      sd.copy_to("variance." + entry.name(), swag.variance_[p].view());
      const StoredTensor& stored = sd.at("deviations." + entry.name());
      if (row_major(entry)) {  // (memmove: the state may borrow these very rows)
        stored.for_each_chunk([&, at = std::size_t{0}](const std::byte* data, std::size_t length) mutable {
          std::memmove(reinterpret_cast<std::byte*>(swag.deviations_[p]) + at, data, length);
          at += length;
        });
        continue;
      }
      const StoredTensor owned = stored.owned();
      const std::size_t numel = entry.numel();
      for_each_row(swag, p, [&](Accumulator* row, std::size_t k) {
        detail::for_each_row_major(entry.shape(), entry.storage_order(), [&](std::size_t i, std::size_t to) {
          std::memcpy(row + to, owned.bytes.data() + (k * numel + i) * sizeof(Accumulator),
                      sizeof(Accumulator));
        });
      });
    }
    swag.n_updates_ = updates;
    swag.n_collected_ = collected;
    swag.held_ = held;
    swag.next_deviation_ = next;
  }

 private:
  static bool row_major(const NamedTensor<Accumulator>& entry) {
    return entry.storage_order() == StorageOrder::RowMajor || entry.shape().size() <= 1;
  }
  template <class Visit>
  static void for_each_row(const Model& swag, std::size_t p, Visit&& visit) {
    for (std::int64_t k = 0; k < swag.max_rank_; ++k)
      visit(swag.deviation_row(p, k), static_cast<std::size_t>(k));
  }
};

}  // namespace polyak
