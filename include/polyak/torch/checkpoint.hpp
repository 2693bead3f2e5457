// SPDX-License-Identifier: MIT
// Checkpoints of libtorch::AveragedModel: where the libtorch adapter meets the checkpoint layer
// (link polyak::torch and polyak::checkpoint). The state has polyak::AveragedModel's keys and
// settings ("module.<name>" in the average's dtype, "n_averaged"), so a state saved from a GPU
// average loads on the CPU and back, byte for byte, and into either kind of averaged model.
#pragma once

#include <cstdint>
#include <string>
#include <utility>  // std::move
#include <vector>

#include "polyak/checkpoint/post_hoc_ema.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/checkpoint/state_io.hpp"
#include "polyak/core/error.hpp"
#include "polyak/torch/averaged_model.hpp"

namespace polyak {

template <class AvgFn>
/// A libtorch::AveragedModel's state: polyak::AveragedModel's keys and settings.
struct StateIO<libtorch::AveragedModel<AvgFn>> {
  using Model = libtorch::AveragedModel<AvgFn>;  ///< the model whose state it is

  /// The average: borrowed where it lives in host memory (as polyak::AveragedModel's state, it
  /// copies nothing and follows later updates), copied to host memory from a GPU.
  static StateDict save(const Model& model) {
    model.wait();
    StateDict sd;
    for (std::size_t i = 0; i < model.slots_.averaged.size(); ++i) {
      const torch::Tensor& averaged = model.slots_.averaged[i];  // contiguous, float or double
      const std::vector<std::int64_t> shape(averaged.sizes().begin(), averaged.sizes().end());
      const std::string name = detail::AveragedModelKeys::module_prefix + model.names_[i];
      const auto add = [&](auto zero) {
        using T = decltype(zero);
        if (averaged.is_cpu()) {
          sd.insert(name, StoredTensor::borrow(averaged.data_ptr<T>(), shape));
        } else {
          const torch::Tensor host = averaged.to(torch::kCPU);
          sd.insert(name, host.data_ptr<T>(), shape);
        }
      };
      if (averaged.scalar_type() == torch::kDouble) {
        add(double{});
      } else {
        add(float{});
      }
    }
    sd.merge("", detail::averaged_state_scalars(model.n_averaged_, model.use_buffers_, model.avg_fn_));
    return sd;
  }

  /// Refused as polyak::AveragedModel refuses (FormatError naming the first difference, nothing
  /// changed): other names, shapes or dtypes, a negative n_averaged, another use_buffers, other
  /// averaging settings.
  static void load(Model& model, const StateDict& sd) {
    std::vector<const StoredTensor*> stored;
    for (std::size_t i = 0; i < model.slots_.averaged.size(); ++i) {
      const torch::Tensor& averaged = model.slots_.averaged[i];
      const std::vector<std::int64_t> shape(averaged.sizes().begin(), averaged.sizes().end());
      const std::string name = detail::AveragedModelKeys::module_prefix + model.names_[i];
      stored.push_back(averaged.scalar_type() == torch::kDouble ? &sd.expect<double>(name, shape)
                                                                : &sd.expect<float>(name, shape));
    }
    const std::int64_t n_averaged =
        detail::check_averaged_state(sd, model.slots_.averaged.size(), model.use_buffers_, model.avg_fn_,
                                     "polyak::libtorch::AveragedModel::load_state_dict");
    model.wait();
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < model.slots_.averaged.size(); ++i) {
      torch::Tensor& averaged = model.slots_.averaged[i];
      stored[i]->for_each_chunk([&, at = std::int64_t{0}](const std::byte* data, std::size_t length) mutable {
        const auto n = static_cast<std::int64_t>(length / averaged.element_size());
        const torch::Tensor host = torch::from_blob(const_cast<std::byte*>(data), {n},
                                                    torch::TensorOptions().dtype(averaged.scalar_type()));
        averaged.view({-1}).narrow(0, at, n).copy_(host);
        at += n;
      });
    }
    model.n_averaged_ = n_averaged;
  }
};

}  // namespace polyak

namespace polyak {
namespace libtorch {

/// polyak::PostHocEMA for a libtorch module: its power-function EMA profiles kept as
/// libtorch::AveragedModel<PowerEMA> on the module's device (or in host memory with
/// Placement::Host), their snapshots written as polyak::PostHocEMA writes them (same names, keys
/// and settings), so find_power_ema_snapshots, reconstruct_power_ema and polyak-post-hoc-ema read
/// them unchanged. A snapshot of a GPU profile copies it to host memory first.
class PostHocEMA : public polyak::PowerEmaRecorder<AveragedModel<PowerEMA>, torch::nn::Module> {
  using Base = polyak::PowerEmaRecorder<AveragedModel<PowerEMA>, torch::nn::Module>;

 public:
  /// One profile: a libtorch::AveragedModel of the power EMA.
  using Profile = AveragedModel<PowerEMA>;

  /// Keeps a profile of `module` for each of `sigma_rels` (where `placement` says), snapshotted into
  /// `folder` every `snapshot_every` updates.
  PostHocEMA(const torch::nn::Module& module, std::string folder, std::int64_t snapshot_every,
             const std::vector<double>& sigma_rels = {0.05, 0.10},
             Placement placement = Placement::WithModule)
      : Base(std::move(folder), snapshot_every, sigma_rels,
             [&](const PowerEMA& profile) { return Profile(module, profile, false, placement); }) {}
};

}  // namespace libtorch
}  // namespace polyak
