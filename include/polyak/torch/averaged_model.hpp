// SPDX-License-Identifier: MIT
// An average of a libtorch module kept where the module lives: on its device (CPU or CUDA), as
// torch tensors, updated by torch's own kernels.
//
//     model->to(torch::kCUDA);
//     polyak::libtorch::AveragedModel<polyak::EMA> ema(*model, polyak::EMA{0.999});
//     ... optimizer.step(); ema.update_parameters(*model); ...
//     ema.copy_to(*eval_model);                       // or ema.swap(*model), evaluate, swap back
//
// Design: polyak::AveragedModel averages Eigen views of CPU memory; this one holds torch tensors and
// runs the same rules through their StepKernel (averaging_functions.hpp): the rule's per-step
// weight is computed once on the host and handed to every tensor.
// - On a GPU, torch's kernels apply it: EMA-like rules as one multi-tensor lerp (torch::_foreach_lerp_
//   on libtorch 2.x; one lerp_ a tensor on 1.x, which has no _foreach_lerp_), as PyTorch's
//   get_ema_multi_avg_fn and timm's ModelEmaV3; SWA as sub_, div_, add_ a tensor, as PyTorch's
//   get_swa_avg_fn.
// - On the CPU, polyak's own kernel applies it to the tensors' memory (the Eigen path's arithmetic,
//   split over torch's intra-op threads): the numbers of polyak::AveragedModel bit for bit, at about
//   twice the speed of torch 1.13's CPU lerp_ (benchmarks/bench_torch.cpp).
// Rules without a kernel (a user's functor) need the Eigen path: polyak::AveragedModel over
// libtorch::tensors().
//
// Placement::Host keeps the average in host memory instead (timm's ModelEmaV3(device='cpu'),
// diffusers' EMA offload): GPU memory holds no copy, each update copies the module into pinned
// host buffers asynchronously and folds them into the average on a background thread, overlapped
// with the next training steps.
//
// Optional: needs libtorch (link polyak::torch). Checkpoints: <polyak/torch/checkpoint.hpp>.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <future>  // the deferred fold of Placement::Host
#include <string>
#include <string_view>
#include <utility>  // std::move
#include <vector>

#include "polyak/core/detail/apply_range.hpp"
#include "polyak/core/detail/counter.hpp"
#include "polyak/core/averaging_functions.hpp"
#include "polyak/core/detail/tensor_spec.hpp"
#include "polyak/core/detail/state_io_fwd.hpp"
#include "polyak/core/error.hpp"
#include "polyak/torch/parameters.hpp"

namespace polyak {
namespace libtorch {

namespace detail {

/// The rule whose kernel() a device average runs: the rule itself, or the per-tensor rule of a
/// multi-tensor form (get_ema_multi_avg_fn's).
template <class Fn>
const Fn& kernel_rule(const Fn& fn) {
  return fn;
}
template <class Fn>
const Fn& kernel_rule(const ForEachTensor<Fn>& multi) {
  return multi.fn;
}

/// The dtype an average of `dtype` is kept in: float for half and bfloat16 (as polyak's
/// accumulator_t, and ema-pytorch's coerce_dtype), the dtype itself otherwise.
inline c10::ScalarType accumulator_dtype(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16 ? c10::ScalarType::Float
                                                                              : dtype;
}

/// A module's averaged tensors as one list: parameters, then floating-point buffers that are not
/// step counters, each once (tied tensors under their first name), in named_parameters() order.
struct ModuleTensor {
  std::string name;
  torch::Tensor tensor;
  bool is_buffer;
};

inline void list_module_tensors(const torch::nn::Module& module, std::vector<ModuleTensor>& out) {
  out.clear();
  const auto seen = [&](const torch::Tensor& tensor) {
    for (const auto& other : out) {
      if (other.tensor.is_same(tensor)) return true;
    }
    return false;
  };
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    if (!seen(item.value())) out.push_back({item.key(), item.value(), false});
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    if (!is_counter(item.key(), item.value()) && !seen(item.value()))
      out.push_back({item.key(), item.value(), true});
  }
}

}  // namespace detail

/// Where a libtorch::AveragedModel keeps its average.
enum class Placement {
  /// On the module's device (CPU or CUDA): the update runs there, nothing crosses the bus.
  WithModule,
  /// In host memory, whatever the module's device: no GPU memory for the average. Each update
  /// enqueues copies of the module's tensors into pinned host buffers (non-blocking from CUDA) and
  /// returns; a background thread waits for them and folds them in. Staleness bound: an update's
  /// fold may still run until the next call on the average (update_parameters, copy_to, swap,
  /// parameters(), buffers(), state_dict(), load_state_dict(), wait()), which first waits for it;
  /// what any of them sees includes every update made before it. Steps a rule skips
  /// (ScheduledEMA's update_every, update_after_step) copy nothing.
  Host,
};

/// A running average of a libtorch module's parameters (and, with use_buffers, its floating-point
/// buffers), kept as torch tensors on the module's device (or, with Placement::Host, in host
/// memory); PyTorch's AveragedModel for the C++ frontend.
///
/// As PyTorch's: the first update_parameters copies the module, later ones apply `AvgFn` (SWA,
/// EMA, ScheduledEMA, PowerEMA or their multi-tensor forms); with use_buffers == false buffers are
/// copied on every update, with true they are averaged. 16-bit modules are averaged in float (as
/// ema-pytorch's coerce_dtype) and rounded once by copy_to. Step counters (num_batches_tracked,
/// integer buffers) are left out, as libtorch::tensors leaves them out.
///
/// Every call that takes a module first checks that its tensors have the average's names, order,
/// kinds, shapes, dtypes and device, and otherwise throws InvalidArgument naming the first that
/// differs, changing nothing. Per step it allocates no tensor memory: a 16-bit or SWA update goes
/// through one scratch buffer made at construction. Not copyable (torch tensors are handles: a copy
/// would share the average); movable.
template <class AvgFn = SWA>
class AveragedModel {
  static_assert(
      polyak::detail::has_kernel<std::decay_t<decltype(detail::kernel_rule(std::declval<AvgFn>()))>>::value,
      "polyak::libtorch::AveragedModel runs the built-in rules (SWA, EMA, ScheduledEMA, PowerEMA, "
      "their multi-tensor forms) on the module's device; for a rule of your own, use "
      "polyak::AveragedModel over polyak::libtorch::tensors()");

 public:
  using AveragingFunction = AvgFn;  ///< the averaging rule

  /// Copies `module`'s tensors (to its device, or to host memory) as the average's starting point.
  explicit AveragedModel(const torch::nn::Module& module, AvgFn avg_fn = AvgFn{}, bool use_buffers = false,
                         Placement placement = Placement::WithModule)
      : avg_fn_(std::move(avg_fn)), use_buffers_(use_buffers), placement_(placement) {
    std::vector<detail::ModuleTensor> tensors;
    detail::list_module_tensors(module, tensors);
    torch::NoGradGuard no_grad;
    std::int64_t scratch_numel = 0;
    for (const auto& entry : tensors) {
      const torch::Tensor& t = entry.tensor;
      if (!t.defined() || t.layout() != c10::kStrided || !t.is_floating_point()) {
        fail("AveragedModel", "tensor '" + entry.name + "' is not a dense floating-point tensor");
      }
      if (!names_.empty() && t.device() != module_device_) {
        fail("AveragedModel", "tensor '" + entry.name + "' is on " + t.device().str() + ", the first on " +
                                  module_device_.str() + ": a module on one device is averaged");
      }
      module_device_ = t.device();
      names_.push_back(entry.name);
      is_buffer_.push_back(entry.is_buffer);
      model_dtypes_.push_back(t.scalar_type());
      const torch::Device home = placement == Placement::Host ? torch::Device(torch::kCPU) : t.device();
      slots_.averaged.push_back(t.detach().to(home, detail::accumulator_dtype(t.scalar_type()),
                                              /*non_blocking=*/false, /*copy=*/true,
                                              c10::MemoryFormat::Contiguous));
      if (placement == Placement::Host) {
        slots_.staging.push_back(torch::empty(
            t.sizes(), torch::TensorOptions().dtype(t.scalar_type()).pinned_memory(t.is_cuda())));
      }
      scratch_numel = std::max(scratch_numel, t.numel());
    }
    if (!names_.empty()) {
      slots_.scratch = torch::empty({scratch_numel}, slots_.averaged.front().options().dtype(torch::kDouble));
    }
  }

  AveragedModel(const AveragedModel&) = delete;
  AveragedModel& operator=(const AveragedModel&) = delete;
  /// Movable (a fold still running moves with it: it reads its own handles, not *this).
  AveragedModel(AveragedModel&&) = default;
  /// Movable.
  AveragedModel& operator=(AveragedModel&&) = default;
  ~AveragedModel() {
    if (pending_.valid()) pending_.wait();  // a fold still running reads the staging buffers
  }

  /// Folds `module` into the average: the first call copies it, later calls apply the rule's step
  /// (its weight computed once, here on the host); then n_averaged() grows by one. With
  /// Placement::Host the fold may finish after this call returns (see Placement::Host).
  void update_parameters(const torch::nn::Module& module) {
    const auto current = check_matches(module, "update_parameters");
    polyak::detail::check_can_count(n_averaged_, "n_averaged",
                                    "polyak::libtorch::AveragedModel::update_parameters");
    wait();
    const StepKernel kernel = n_averaged_ == 0 ? StepKernel{StepKernel::Kind::Copy, 0.0}
                                               : detail::kernel_rule(avg_fn_).kernel(n_averaged_);
    std::vector<StepKernel> kernels;
    for (std::size_t i = 0; i < names_.size(); ++i) {
      const bool averaged = !is_buffer_[i] || use_buffers_;
      kernels.push_back(averaged ? kernel : StepKernel{StepKernel::Kind::Copy, 0.0});
    }
    if (placement_ == Placement::WithModule) {
      std::vector<torch::Tensor> sources;
      for (const auto& entry : current) sources.push_back(entry.tensor);
      fold(slots_, kernels, sources);
    } else {
      torch::NoGradGuard no_grad;
      const bool from_cuda = module_device_.is_cuda();
      for (std::size_t i = 0; i < names_.size(); ++i) {
        if (kernels[i].kind != StepKernel::Kind::Skip)
          slots_.staging[i].copy_(current[i].tensor, /*non_blocking=*/from_cuda);
      }
      // The slots are handles on the same tensors: the fold needs nothing of *this (which may move).
      pending_ = std::async(std::launch::async, [slots = slots_, kernels, from_cuda] {
        if (from_cuda) torch::cuda::synchronize();  // the copies enqueued above have landed
        fold(slots, kernels, slots.staging);
      });
    }
    ++n_averaged_;
  }

  /// Waits for a fold still running (Placement::Host) and rethrows its error, if it had one. Every
  /// call that reads or writes the average does this first.
  void wait() const {
    if (pending_.valid()) pending_.get();
  }

  /// Writes the average into `module`'s tensors (rounded once for a 16-bit module).
  void copy_to(torch::nn::Module& module) const {
    const auto current = check_matches(module, "copy_to");
    wait();
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < names_.size(); ++i) current[i].tensor.copy_(slots_.averaged[i]);
  }

  /// Exchanges the average and `module`'s values in place (evaluate, then swap back). A 16-bit module
  /// cannot hold the float average without rounding it: refused, use copy_to into a second module.
  void swap(torch::nn::Module& module) {
    const auto current = check_matches(module, "swap");
    for (std::size_t i = 0; i < names_.size(); ++i) {
      if (model_dtypes_[i] != slots_.averaged[i].scalar_type()) {
        fail("swap", "tensor '" + names_[i] + "' is " + c10::toString(model_dtypes_[i]) + ", averaged in " +
                         c10::toString(slots_.averaged[i].scalar_type()) +
                         ": swapping would round the average; use copy_to() into a second module");
      }
    }
    wait();
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < names_.size(); ++i) {
      torch::Tensor held = widened(slots_, slots_.averaged[i], current[i].tensor);
      current[i].tensor.copy_(slots_.averaged[i]);
      slots_.averaged[i].copy_(held);
    }
  }

  /// How many modules have been folded in (PyTorch's n_averaged buffer).
  std::int64_t n_averaged() const noexcept { return n_averaged_; }
  /// The averaging rule.
  const AvgFn& avg_fn() const noexcept { return avg_fn_; }
  /// Whether buffers are averaged (true) or copied from the last module (false), as PyTorch's.
  bool use_buffers() const noexcept { return use_buffers_; }
  /// Where the average is kept.
  Placement placement() const noexcept { return placement_; }

  /// The averaged parameters, by name (views onto the average: writing them changes it).
  torch::OrderedDict<std::string, torch::Tensor> parameters() const { return select(Kind::Parameters); }
  /// The averaged copy's buffers, by name (averaged with use_buffers, else the last module's).
  torch::OrderedDict<std::string, torch::Tensor> buffers() const { return select(Kind::Buffers); }
  /// Every tensor of the average, parameters then buffers in the module's order, by name: as
  /// polyak::AveragedModel::tensors() lists the Eigen path's, so that the two compare directly.
  torch::OrderedDict<std::string, torch::Tensor> tensors() const { return select(Kind::All); }

  /// Where the average lives: the module's device, or the CPU with Placement::Host.
  torch::Device device() const {
    return slots_.averaged.empty() ? torch::Device(torch::kCPU) : slots_.averaged.front().device();
  }

  ///@{
  /// Checkpoints with the keys and settings of polyak::AveragedModel's (a state saved by either
  /// loads into the other, and on any device); defined by <polyak/torch/checkpoint.hpp>.
  POLYAK_DETAIL_STATE_MEMBERS(AveragedModel);
  ///@}

 private:
  /// The tensors an update writes: handles, so that a deferred fold can hold them by value.
  struct Slots {
    std::vector<torch::Tensor> averaged;  ///< in accumulator_dtype, on the module's device or the host
    std::vector<torch::Tensor> staging;   ///< Placement::Host: the module's values, in host memory
    torch::Tensor scratch;  ///< as many doubles as the largest tensor: widening, SWA's difference, swap
    /// SWA's n + 1 as 0-dim host tensors of each average dtype: div_ by a number, or by a tensor of
    /// another dtype, allocates one each time.
    torch::Tensor divisor_double = torch::zeros({}, torch::kDouble);
    torch::Tensor divisor_float = torch::zeros({}, torch::kFloat);
  };

  /// Applies one step's kernels to every tensor: Copy, Skip, SWA's Divide a tensor at a time; all
  /// Lerp tensors whose source has the average's dtype in one multi-tensor lerp.
  static void fold(const Slots& slots, const std::vector<StepKernel>& kernels,
                   const std::vector<torch::Tensor>& sources) {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> lerp_averaged, lerp_sources;
    double lerp_weight = 0;
    for (std::size_t i = 0; i < kernels.size(); ++i) {
      const torch::Tensor& averaged = slots.averaged[i];
      const torch::Tensor& current = sources[i];
      const StepKernel& kernel = kernels[i];
      switch (kernel.kind) {
        case StepKernel::Kind::Skip:
          break;
        case StepKernel::Kind::Copy:
          averaged.copy_(current);
          break;
        case StepKernel::Kind::Lerp:
          if (fold_on_cpu(kernel, averaged, current)) break;
          lerp_weight = kernel.weight;  // one weight a step: every Lerp kernel of it has the same
          if (current.scalar_type() == averaged.scalar_type() && current.device() == averaged.device()) {
            lerp_averaged.push_back(averaged);
            lerp_sources.push_back(current);
          } else {
            averaged.lerp_(widened(slots, averaged, current), kernel.weight);
          }
          break;
        case StepKernel::Kind::Divide: {  // averaged + (current - averaged) / n, PyTorch's SWA
          if (fold_on_cpu(kernel, averaged, current)) break;
          torch::Tensor difference = widened(slots, averaged, current);
          const torch::Tensor& divisor =
              averaged.scalar_type() == torch::kDouble ? slots.divisor_double : slots.divisor_float;
          divisor.fill_(kernel.weight);
          difference.sub_(averaged).div_(divisor);
          averaged.add_(difference);
          break;
        }
      }
    }
    if (lerp_averaged.empty()) return;
#if TORCH_VERSION_MAJOR >= 2
    torch::_foreach_lerp_(lerp_averaged, lerp_sources, lerp_weight);
#else
    for (std::size_t i = 0; i < lerp_averaged.size(); ++i)
      lerp_averaged[i].lerp_(lerp_sources[i], lerp_weight);
#endif
  }

  /// On the CPU: `kernel` applied by polyak's own loop (detail::apply_to_range, as
  /// polyak::AveragedModel applies it) to the tensors' memory, in slices of at least 2^18 scalars
  /// over torch's intra-op threads. False, and nothing done, where it does not apply (a GPU tensor,
  /// a non-contiguous module tensor).
  static bool fold_on_cpu(const StepKernel& kernel, const torch::Tensor& averaged,
                          const torch::Tensor& current) {
    if (!averaged.is_cpu() || !current.is_cpu() || !current.is_contiguous()) return false;
    const auto run = [&](auto zero) {
      using T = decltype(zero);
      auto* out = static_cast<accumulator_t<T>*>(averaged.data_ptr());
      const auto* in = static_cast<const T*>(current.data_ptr());
      at::parallel_for(0, averaged.numel(), std::int64_t{1} << 18, [&](std::int64_t begin, std::int64_t end) {
        polyak::detail::apply_to_range([&](auto&& a, const auto& c) { kernel.apply(a, c); }, out, in,
                                       static_cast<std::size_t>(begin), static_cast<std::size_t>(end));
      });
    };
    const c10::ScalarType dtype = current.scalar_type();
    if (dtype == torch::kFloat) {
      run(float{});
    } else if (dtype == torch::kDouble) {
      run(double{});
    } else if (dtype == torch::kHalf) {  // c10::Half and Eigen::half are both IEEE binary16
      run(Eigen::half{});
    } else if (dtype == torch::kBFloat16) {
      run(Eigen::bfloat16{});
    } else {
      return false;
    }
    return true;
  }

  /// `current` in the average's dtype and device, in the scratch buffer.
  static torch::Tensor widened(const Slots& slots, const torch::Tensor& averaged,
                               const torch::Tensor& current) {
    const torch::Tensor scratch =
        averaged.scalar_type() == torch::kDouble ? slots.scratch : slots.scratch.view(torch::kFloat);
    torch::Tensor out = scratch.narrow(0, 0, averaged.numel()).view(averaged.sizes());
    out.copy_(current);
    return out;
  }

  enum class Kind { Parameters, Buffers, All };
  torch::OrderedDict<std::string, torch::Tensor> select(Kind kind) const {
    wait();
    torch::OrderedDict<std::string, torch::Tensor> out;
    for (std::size_t i = 0; i < names_.size(); ++i) {
      if (kind == Kind::All || is_buffer_[i] == (kind == Kind::Buffers))
        out.insert(names_[i], slots_.averaged[i]);
    }
    return out;
  }

  /// `module`'s tensors, checked against the average (detail::first_mismatch, as every tensor list
  /// in polyak is, then the device): InvalidArgument naming the first difference.
  std::vector<detail::ModuleTensor> check_matches(const torch::nn::Module& module, const char* where) const {
    std::vector<detail::ModuleTensor> current;
    detail::list_module_tensors(module, current);
    const auto spec = [](std::string_view name, const torch::Tensor& t, c10::ScalarType dtype,
                         bool is_buffer) {
      return polyak::detail::TensorSpec{name,
                                        t.sizes().data(),
                                        t.sizes().size(),
                                        StorageOrder::RowMajor,
                                        c10::toString(dtype),
                                        is_buffer ? "buffer" : "parameter"};
    };
    std::string problem = polyak::detail::first_mismatch(
        current.size(),
        [&](std::size_t i) {
          return spec(current[i].name, current[i].tensor, current[i].tensor.scalar_type(),
                      current[i].is_buffer);
        },
        "the module", names_.size(),
        [&](std::size_t i) { return spec(names_[i], slots_.averaged[i], model_dtypes_[i], is_buffer_[i]); },
        "the average");
    for (std::size_t i = 0; i < current.size() && problem.empty(); ++i) {
      if (current[i].tensor.device() != module_device_) {
        problem = "tensor " + std::to_string(i) + " '" + names_[i] + "' is on " +
                  current[i].tensor.device().str() + " where the average was made from " +
                  module_device_.str();
      }
    }
    if (!problem.empty()) fail(where, problem);
    return current;
  }

  [[noreturn]] static void fail(const char* where, const std::string& what) {
    throw InvalidArgument(std::string("polyak::libtorch::AveragedModel::") + where + ": " + what);
  }

  AvgFn avg_fn_;
  bool use_buffers_;
  Placement placement_;
  std::int64_t n_averaged_ = 0;
  std::vector<std::string> names_;
  std::vector<bool> is_buffer_;
  std::vector<c10::ScalarType> model_dtypes_;
  torch::Device module_device_ = torch::Device(torch::kCPU);
  Slots slots_;
  mutable std::future<void> pending_;  ///< Placement::Host: the fold of the last update, if running
};

}  // namespace libtorch

namespace detail {
/// libtorch::AveragedModel's state_dict() is in polyak/torch/checkpoint.hpp (the message says so).
template <class AvgFn>
struct state_io_in_adapter<libtorch::AveragedModel<AvgFn>> : std::true_type {};
}  // namespace detail

}  // namespace polyak
