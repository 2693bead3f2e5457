// SPDX-License-Identifier: MIT
// polyak for dlib's deep-learning toolkit: views onto a net's layer parameters, the same views kept
// in step with a dnn_trainer's thread, and SWALR on the trainer's learning rate.
//
//     dlib::dnn_trainer<net_type> trainer(net, dlib::sgd());
//     trainer.train_one_step(x, y);                         // dlib makes the parameters here
//     polyak::dlib_dnn::TrainerParameters params(trainer);
//     polyak::AveragedModel<float, polyak::EMA> ema(params.synced(), polyak::EMA{0.999});
//     ... trainer.train_one_step(x, y); ema.update_parameters(params.synced()); ...
//
// Optional: needs dlib (CMake: find_package(dlib), then link polyak::dlib); nothing else in polyak
// includes it.
#pragma once

#include <dlib/dnn.h>

#include <cmath>    // std::isfinite
#include <cstddef>  // std::size_t
#include <cstdint>  // std::int64_t
#include <memory>   // std::make_shared
#include <sstream>
#include <string>
#include <utility>  // std::move
#include <vector>

#include "polyak/core/error.hpp"
#include "polyak/core/swalr.hpp"
#include "polyak/core/tensor_view.hpp"

#ifdef DLIB_USE_CUDA
// A CUDA dlib keeps a tensor's current values on the GPU and copies them to the host on demand, so a
// view's host pointer could read stale values or write values the GPU copy then overrides.
#error \
    "polyak/dlib: needs dlib built without CUDA (the parameters must live on the host, as Debian's libdlib-dev has them)"
#endif

/// The dlib adapter: views of a dlib net's layer parameters, in step with its trainer.
/// (Not polyak::dlib, which `using namespace polyak;` would make clash with dlib's own namespace.)
namespace polyak::dlib_dnn {

namespace detail {

/// The first word dlib prints for a layer ("fc", "con", "bn_con", ...): its kind.
template <class Details>
std::string kind_of(const Details& details) {
  std::ostringstream text;
  text << details;
  std::istringstream words(text.str());
  std::string kind;
  words >> kind;
  return kind.empty() ? "layer" : kind;
}

/// The parameter tensor of `net`'s computational layer `index` (as layer<index>(net) counts), or
/// nullptr where that layer has none.
template <class Net>
::dlib::tensor* layer_tensor(Net& net, std::size_t index) {
  ::dlib::tensor* found = nullptr;
  ::dlib::visit_computational_layers(net, [&](std::size_t i, auto& details) {
    if (i == index) found = &details.get_layer_params();
  });
  return found;
}

/// What a view of a layer's tensor was made of: the net, the layer and the tensor's four extents.
/// The tensor is found again through the net at each check, never kept: dlib's assignment of a net
/// moves the layers under the top one to new objects (and frees the old ones), and storage alone
/// does not tell a tensor apart from another of the same size in other extents ((5, 6) and (6, 5)).
template <class Net>
struct ViewedLayer {
  Net* net;
  std::size_t index;
  long long extents[4];

  static long long extent(const ::dlib::tensor& t, int i) {
    return i == 0 ? t.num_samples() : i == 1 ? t.k() : i == 2 ? t.nr() : t.nc();
  }
};

/// A view of layer `index`'s tensor `tensor`, which dlib lays out row-major as (num_samples, k,
/// nr, nc); checked before each use to still be that layer's tensor, where the view points, in the
/// same extents.
template <class Net>
TensorView<float> view_of(Net& net, std::size_t index, ::dlib::tensor& tensor) {
  auto viewed = std::make_shared<ViewedLayer<Net>>();
  viewed->net = &net;
  viewed->index = index;
  for (int i = 0; i < 4; ++i) viewed->extents[i] = ViewedLayer<Net>::extent(tensor, i);
  const ViewedLayer<Net>* object = viewed.get();
  ViewSource source{object,
                    [](const void* viewed_object, const void* data, std::size_t numel) {
                      const auto& v = *static_cast<const ViewedLayer<Net>*>(viewed_object);
                      const ::dlib::tensor* t = layer_tensor(*v.net, v.index);
                      if (t == nullptr) return false;
                      for (int i = 0; i < 4; ++i) {
                        if (ViewedLayer<Net>::extent(*t, i) != v.extents[i]) return false;
                      }
                      return t->size() == numel && static_cast<const void*>(t->host()) == data;
                    },
                    std::move(viewed)};
  return TensorView<float>(
      tensor.host(),
      {static_cast<std::int64_t>(object->extents[0]), static_cast<std::int64_t>(object->extents[1]),
       static_cast<std::int64_t>(object->extents[2]), static_cast<std::int64_t>(object->extents[3])},
      StorageOrder::RowMajor, std::move(source));
}

}  // namespace detail

/// Views onto the parameters of `net`'s computational layers, one tensor a layer that has any,
/// named "INDEX.KIND": INDEX the layer's index as dlib's `layer<INDEX>(net)` counts it (from the
/// output: "1.fc" is the fully connected layer under the loss), KIND the word dlib prints for it
/// ("fc", "con", "bn_con", ...). Each view is the layer's whole parameter tensor as dlib keeps it
/// (an fc layer's weights and biases together), shaped (num_samples, k, nr, nc).
///
/// dlib allocates a layer's parameters in the net's first forward pass: a net that has none yet is
/// refused with std::invalid_argument (train one step, or run the net on a batch, first), as is one
/// none of whose layers has parameters. affine_ layers (batch norm made fixed for inference) are
/// not listed: dlib gives them no parameter tensor. A view is checked before each use against the
/// layer it was made of, found again through `net`: where deserializing or assigning another net
/// into `net` gave the layer's tensor new storage or other extents, the next use of an older view is
/// refused; where the tensor kept both (a checkpoint of the same net loaded), the views see the
/// loaded values. `net` itself must outlive its views, as any viewed object must. dlib keeps
/// batch norm's running statistics private, so they are not among the views: average the
/// parameters, then recompute the statistics with polyak::dlib_dnn::update_bn.
///
/// While a dnn_trainer trains `net`, its thread writes these parameters: use TrainerParameters,
/// whose synced() waits for that thread, rather than views of the net itself.
template <class Net>
ParameterList<float> parameters(Net& net) {
  ParameterList<float> list;
  ::dlib::visit_computational_layers(net, [&](std::size_t index, auto& details) {
    ::dlib::tensor& params = details.get_layer_params();
    if (params.size() != 0)
      list.add(std::to_string(index) + "." + detail::kind_of(details), detail::view_of(net, index, params));
  });
  if (list.size() == 0) {
    throw InvalidArgument(
        "polyak::dlib_dnn::parameters: the net has no parameters: dlib allocates a layer's parameters in the "
        "net's first forward pass (train one step with the trainer, or run the net on a batch, first), and a "
        "net of layers without parameters has none to average");
  }
  return list;
}

/// The parameters of the net a dlib::dnn_trainer trains, in step with the trainer's thread.
///
/// dnn_trainer::train_one_step hands the batch to the trainer's own thread and returns while that
/// thread still updates the net; reading or writing the parameters then would race with it.
/// synced() first waits for the thread to finish every step it was given (dlib's
/// get_net(force_flush_to_disk::no), which also rethrows an error the thread met; dlib 19.24 may
/// report such an error one call late, as its own get_net does), then returns the views: pass
/// synced(), never a copy of it kept from before, to update_parameters, copy_to, swap. Where the
/// trainer has a synchronization file, get_net may also save the net there or, when the loss rose,
/// reload an earlier one: a reload of other sizes makes the views refused, as parameters() says.
///
/// Made after the trainer's first step (before it the net has no parameters: refused, see
/// parameters()). Keeps a reference to the trainer, which must outlive it.
template <class Net, class Solver>
class TrainerParameters {
 public:
  /// Waits for the trainer's thread, then views its net's parameters.
  explicit TrainerParameters(::dlib::dnn_trainer<Net, Solver>& trainer)
      : trainer_(trainer), views_(parameters(trainer.get_net(::dlib::force_flush_to_disk::no))) {}

  /// Waits for the trainer's thread to finish the steps it was given, then the views of its net.
  const ParameterList<float>& synced() {
    trainer_.get_net(::dlib::force_flush_to_disk::no);
    return views_;
  }

 private:
  ::dlib::dnn_trainer<Net, Solver>& trainer_;
  ParameterList<float> views_;
};

}  // namespace polyak::dlib_dnn

namespace polyak {

/// SWALR over a dlib::dnn_trainer: one group, the trainer's learning rate, read after waiting for
/// the trainer's thread (which may have shrunk it in a step still running) and written with
/// set_learning_rate (which waits too). dlib takes only a positive rate, so a
/// rate of zero or below (swa_lr 0) is refused with std::invalid_argument, and nothing is written.
/// The trainer's own schedule goes on beside SWALR: set_learning_rate clears an explicit
/// learning-rate schedule, and the trainer still shrinks the rate when the loss stops falling
/// (set_iterations_without_progress_threshold sets how soon); SWALR reads the rate back each step,
/// so it anneals from where the trainer left it.
template <class Net, class Solver>
struct learning_rates<::dlib::dnn_trainer<Net, Solver>> {
  /// One group: the trainer's rate.
  static std::size_t size(const ::dlib::dnn_trainer<Net, Solver>&) { return 1; }
  /// The trainer's rate.
  static double get(const ::dlib::dnn_trainer<Net, Solver>& trainer, std::size_t) {
    trainer.get_average_loss();  // (waits for the trainer's thread: get_learning_rate does not)
    return trainer.get_learning_rate();
  }
  /// Sets the trainer's rate; refuses one that is not positive and finite.
  static void set(::dlib::dnn_trainer<Net, Solver>& trainer, std::size_t, double lr) {
    if (!(lr > 0) || !std::isfinite(lr)) {
      throw InvalidArgument("polyak::SWALR: dlib's trainer takes only a positive learning rate, not " +
                            std::to_string(lr) + " (give SWALR a positive swa_lr)");
    }
    trainer.set_learning_rate(lr);
  }
};

}  // namespace polyak
