// SPDX-License-Identifier: MIT
// polyak for libtorch, PyTorch's C++ frontend: views onto a torch::nn::Module's tensors, SWALR over
// a torch::optim optimizer, and update_bn over a module tree's batch-norm layers, so that a libtorch
// training loop reads as the Python one does.
//
//     auto params = polyak::libtorch::tensors<float>(*model);         // named as in Python
//     polyak::AveragedModel<float> swa_model(params);
//     polyak::SWALR swa_scheduler(optimizer, /*swa_lr=*/0.05);          // any torch::optim optimizer
//     ... swa_model.update_parameters(params); swa_scheduler.step(); ...
//     swa_model.copy_to(params);
//     polyak::libtorch::update_bn(loader, [&](const torch::Tensor& x) { model->forward(x); }, *model);
//
// Optional: needs libtorch (CMake: find_package(Torch), then link polyak::torch); nothing else in
// polyak includes it.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>  // std::function
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "polyak/core/error.hpp"
#include "polyak/core/scalar_type.hpp"
#include "polyak/core/swalr.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {
namespace libtorch {

namespace detail {

/// libtorch's ScalarType of each DType, in DType's order (Eigen::half and c10::Half are both IEEE
/// binary16).
inline constexpr c10::ScalarType torch_scalar_types[] = {c10::ScalarType::Float, c10::ScalarType::Double,
                                                         c10::ScalarType::Half, c10::ScalarType::BFloat16,
                                                         c10::ScalarType::Long};
static_assert(std::size(torch_scalar_types) == std::size(polyak::detail::dtype_names),
              "one libtorch type for each DType");

template <class T>
constexpr c10::ScalarType torch_scalar_type() {
  return torch_scalar_types[static_cast<std::size_t>(dtype_of<T>())];
}

/// A view of `tensor`, or std::invalid_argument naming it and what makes it unviewable.
template <class T>
TensorView<T> view_of(const std::string& name, const torch::Tensor& tensor) {
  const auto refuse = [&](const std::string& why) {
    throw InvalidArgument("polyak::libtorch::tensors: tensor '" + name + "' " + why);
  };
  if (!tensor.defined()) refuse("is undefined");
  if (tensor.layout() != c10::kStrided) refuse("is sparse");
  if (!tensor.device().is_cpu()) refuse("is on " + tensor.device().str() + ", not the CPU");
  if (tensor.scalar_type() != torch_scalar_type<T>()) {
    refuse(std::string("holds ") + c10::toString(tensor.scalar_type()) + ", not " +
           c10::toString(torch_scalar_type<T>()));
  }
  if (!tensor.is_contiguous()) refuse("is not contiguous (call .contiguous() on it in the module)");
  const auto sizes = tensor.sizes();
  // The view keeps a handle on the tensor and asks it before each use whether its storage is still
  // where the view points: torch::load and module->to() give a module's tensors new storage.
  auto handle = std::make_shared<const torch::Tensor>(tensor);
  ViewSource source{handle.get(),
                    [](const void* object, const void* data, std::size_t numel) {
                      const auto& t = *static_cast<const torch::Tensor*>(object);
                      return t.defined() && t.device().is_cpu() &&
                             t.scalar_type() == torch_scalar_type<T>() && t.is_contiguous() &&
                             t.data_ptr() == data && static_cast<std::size_t>(t.numel()) == numel;
                    },
                    handle};
  return TensorView<T>(static_cast<T*>(tensor.data_ptr()),
                       std::vector<std::int64_t>(sizes.begin(), sizes.end()), StorageOrder::RowMajor,
                       std::move(source));
}

/// True for a module's step counters: integer buffers, and batch norm's num_batches_tracked whatever
/// its dtype (libtorch's Module::to casts every buffer, counters too, where Python's .double() does not).
inline bool is_counter(const std::string& name, const torch::Tensor& buffer) {
  const std::string leaf = "num_batches_tracked";
  const bool named_so = name.size() >= leaf.size() &&
                        name.compare(name.size() - leaf.size(), leaf.size(), leaf) == 0 &&
                        (name.size() == leaf.size() || name[name.size() - leaf.size() - 1] == '.');
  return named_so || !buffer.is_floating_point();
}

}  // namespace detail

namespace detail {

/// The views of tensors() and parameters(): the parameters, then (buffers) the floating-point buffers.
template <class T>
ParameterList<T> module_views(const torch::nn::Module& module, bool buffers) {
  static_assert(is_supported_scalar_v<T>,
                "polyak::libtorch::tensors: T must be float, double, Eigen::half or Eigen::bfloat16");
  ParameterList<T> list;
  std::vector<torch::Tensor> listed;
  const auto seen = [&](const torch::Tensor& tensor) {
    for (const auto& other : listed) {
      if (other.is_same(tensor)) return true;
    }
    listed.push_back(tensor);
    return false;
  };
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    if (!seen(item.value())) list.add(item.key(), view_of<T>(item.key(), item.value()));
  }
  if (buffers) {
    for (const auto& item : module.named_buffers(/*recurse=*/true)) {
      if (is_counter(item.key(), item.value()) || seen(item.value())) continue;
      list.add_buffer(item.key(), view_of<T>(item.key(), item.value()));
    }
  }
  return list;
}

}  // namespace detail

/// Views onto `module`'s parameters, then its floating-point buffers (flagged as buffers), under the
/// names of PyTorch's state_dict ("0.weight", "bn1.running_mean", ...), recursively: what
/// polyak::AveragedModel and the averagers take (PyTorch's AveragedModel averages the parameters
/// and keeps, or with use_buffers averages, the buffers).
///
/// Every tensor must be a contiguous CPU tensor of T (float, double, half, bfloat16); anything else
/// is refused with std::invalid_argument naming the tensor. Step counters are not weights and are
/// left out: integer buffers, and batch norm's num_batches_tracked whatever its dtype (module->to()
/// casts it too); update_bn resets them. A tensor registered under two names (tied weights) is
/// viewed once, under its first name, as Python's named_parameters() lists it.
///
/// The views point into the tensors' storage. torch::load(module, path) and module->to(...) give
/// the tensors new storage: a call through views made before (update_parameters, copy_to, swap,
/// average_parameters) is then refused with std::invalid_argument naming the tensor; call
/// tensors() again after loading or moving the module.
template <class T>
ParameterList<T> tensors(const torch::nn::Module& module) {
  return detail::module_views<T>(module, /*buffers=*/true);
}

/// Views onto `module`'s parameters alone, as PyTorch's Module.parameters() lists them (see
/// tensors() for what is refused and when views go stale).
template <class T>
ParameterList<T> parameters(const torch::nn::Module& module) {
  return detail::module_views<T>(module, /*buffers=*/false);
}

namespace detail {

/// One batch-norm layer of a module tree, and the momentum update_bn restores.
struct BatchNormLayer {
  std::function<void()> reset;      // the layer's reset_running_stats()
  c10::optional<double>* momentum;  // the layer's options.momentum()
  c10::optional<double> saved;
};

template <class Impl>
bool collect(torch::nn::Module& module, std::vector<BatchNormLayer>& layers) {
  auto* layer = dynamic_cast<Impl*>(&module);
  if (layer == nullptr) return false;
  layers.push_back(
      {[layer] { layer->reset_running_stats(); }, &layer->options.momentum(), layer->options.momentum()});
  return true;
}

inline void collect_batch_norms(torch::nn::Module& module, std::vector<BatchNormLayer>& layers) {
  collect<torch::nn::BatchNorm1dImpl>(module, layers) ||
      collect<torch::nn::BatchNorm2dImpl>(module, layers) ||
      collect<torch::nn::BatchNorm3dImpl>(module, layers);
}

}  // namespace detail

/// PyTorch's torch.optim.swa_utils.update_bn for a libtorch module tree: one pass over `batches` to
/// recompute the running statistics of every BatchNorm1d/2d/3d in `model` (itself included) for the
/// weights it holds now, typically the averaged ones after AveragedModel::copy_to.
///
/// As PyTorch's: resets each layer's statistics, sets its momentum to none (a cumulative average),
/// puts the model in training mode, calls `forward(batch)` for each batch without autograd, then
/// restores each momentum and the model's mode, also when `forward` throws. With no batch-norm layer
/// it returns at once. `forward` runs the model on one batch, so that any input type works (PyTorch
/// calls model(batch[0])).
template <class Batches, class Forward>
void update_bn(Batches&& batches, Forward&& forward, torch::nn::Module& model) {
  std::vector<detail::BatchNormLayer> layers;
  detail::collect_batch_norms(model, layers);
  for (const auto& child : model.modules(/*include_self=*/false)) detail::collect_batch_norms(*child, layers);
  if (layers.empty()) return;

  struct Restore {  // momenta and mode come back however the pass ends
    std::vector<detail::BatchNormLayer>& layers;
    torch::nn::Module& model;
    bool was_training;
    ~Restore() {
      for (auto& layer : layers) *layer.momentum = layer.saved;
      model.train(was_training);
    }
  } restore{layers, model, model.is_training()};

  for (auto& layer : layers) {
    layer.reset();
    *layer.momentum = c10::nullopt;
  }
  model.train(true);
  torch::NoGradGuard no_grad;
  for (auto&& batch : batches) forward(batch);
}

}  // namespace libtorch

/// SWALR over a libtorch optimizer's parameter groups: each group's options().get_lr()/set_lr().
template <>
struct learning_rates<torch::optim::Optimizer> {
  /// How many parameter groups.
  static std::size_t size(const torch::optim::Optimizer& optimizer) {
    return optimizer.param_groups().size();
  }
  /// Group `group`'s rate.
  static double get(const torch::optim::Optimizer& optimizer, std::size_t group) {
    return optimizer.param_groups()[group].options().get_lr();
  }
  /// Sets group `group`'s rate.
  static void set(torch::optim::Optimizer& optimizer, std::size_t group, double lr) {
    optimizer.param_groups()[group].options().set_lr(lr);
  }
};

// libtorch's own optimizers, so that SWALR's class template argument deduction works on them.
template <>
struct learning_rates<torch::optim::SGD> : learning_rates<torch::optim::Optimizer> {};
template <>
struct learning_rates<torch::optim::Adam> : learning_rates<torch::optim::Optimizer> {};
template <>
struct learning_rates<torch::optim::AdamW> : learning_rates<torch::optim::Optimizer> {};
template <>
struct learning_rates<torch::optim::Adagrad> : learning_rates<torch::optim::Optimizer> {};
template <>
struct learning_rates<torch::optim::RMSprop> : learning_rates<torch::optim::Optimizer> {};
template <>
struct learning_rates<torch::optim::LBFGS> : learning_rates<torch::optim::Optimizer> {};

}  // namespace polyak
