// SPDX-License-Identifier: MIT
// update_bn for dlib nets: the running statistics of every bn_ layer recomputed, as a cumulative
// average over batches, for the weights the net holds now (typically averaged ones).
//
//     ema.copy_to(polyak::dlib_dnn::parameters(net));
//     polyak::dlib_dnn::update_bn(
//         batches, [&](const auto& batch) { net.subnet()(batch.begin(), batch.end()); }, net);
//
// Optional: needs dlib (CMake: link polyak::dlib); nothing else in polyak includes it.
#pragma once

#include <dlib/dnn.h>

#include <cstddef>     // std::size_t
#include <functional>  // std::function
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "polyak/core/error.hpp"

namespace polyak::dlib_dnn {

namespace detail {

/// One bn_ layer of a net, reached through dlib's own serialization: dlib keeps the counter that
/// makes its running statistics a cumulative average (num_updates) and their window private, and
/// writes both, after the statistics, in the layer's serialized form.
class BatchNormCounters {
 public:
  /// Reads the layer's serialized form; refuses a format other than the one this knows.
  template <class Layer>
  explicit BatchNormCounters(const Layer& layer) {
    std::ostringstream out;
    serialize(layer, out);
    saved_ = out.str();
    std::istringstream in(saved_);
    std::string version;
    ::dlib::deserialize(version, in);
    if (version != "bn_con2" && version != "bn_fc2") {
      throw InvalidArgument("polyak::dlib_dnn::update_bn: this dlib writes its bn_ layers as '" + version +
                            "', a format polyak does not know (it knows dlib 19's bn_con2 and bn_fc2)");
    }
    // params, gamma, beta, means, invstds, running_means, running_variances: then the two counters.
    ::dlib::resizable_tensor tensor;
    ::dlib::alias_tensor alias;
    ::dlib::deserialize(tensor, in);
    never_ran_ = tensor.size() == 0;
    ::dlib::deserialize(alias, in);
    ::dlib::deserialize(alias, in);
    for (int i = 0; i < 4; ++i) ::dlib::deserialize(tensor, in);
    counters_at_ = static_cast<std::size_t>(in.tellg());
    ::dlib::deserialize(updates_, in);
    ::dlib::deserialize(window_, in);
    const auto after = in.tellg();
    if (!in || after < 0 || static_cast<std::size_t>(after) > saved_.size()) {
      throw InvalidArgument("polyak::dlib_dnn::update_bn: a bn_ layer's serialized form ended early");
    }
    after_counters_ = static_cast<std::size_t>(after);
  }

  /// How many batches the running statistics have averaged (at most the window).
  unsigned long updates() const { return updates_; }
  /// The window: the statistics average the last `window` batches, older ones decaying.
  unsigned long window() const { return window_; }
  /// True for a layer dlib has not set up: no forward pass has reached it.
  bool never_ran() const { return never_ran_; }

  /// Writes the layer back as it was read, with these counters.
  template <class Layer>
  void write(Layer& layer, unsigned long updates, unsigned long window) const {
    std::ostringstream out;
    out.write(saved_.data(), static_cast<std::streamsize>(counters_at_));
    ::dlib::serialize(updates, out);
    ::dlib::serialize(window, out);
    out.write(saved_.data() + after_counters_, static_cast<std::streamsize>(saved_.size() - after_counters_));
    std::istringstream in(out.str());
    deserialize(layer, in);
  }

  /// Writes the layer back exactly as it was read: statistics, counters and all.
  template <class Layer>
  void restore(Layer& layer) const {
    std::istringstream in(saved_);
    deserialize(layer, in);
  }

 private:
  std::string saved_;
  std::size_t counters_at_ = 0, after_counters_ = 0;
  unsigned long updates_ = 0, window_ = 0;
  bool never_ran_ = false;
};

/// The bn_ layers of a net, each with a way back to its state before update_bn.
struct BatchNormLayer {
  std::function<BatchNormCounters()> read;
  std::function<void(const BatchNormCounters&, unsigned long, unsigned long)> write;
  std::function<void(const BatchNormCounters&)> restore;
  BatchNormCounters before;
};

/// Collects the net's bn_ layers (batch norm over channels, bn_con, and over features, bn_fc).
struct CollectBatchNorms {
  std::vector<BatchNormLayer>& layers;

  template <class Details>
  void operator()(std::size_t, Details&) const {}  // not batch norm

  template <::dlib::layer_mode Mode>
  void operator()(std::size_t, ::dlib::bn_<Mode>& layer) const {
    auto* bn = &layer;
    layers.push_back({[bn] { return BatchNormCounters(*bn); },
                      [bn](const BatchNormCounters& c, unsigned long updates, unsigned long window) {
                        c.write(*bn, updates, window);
                      },
                      [bn](const BatchNormCounters& c) { c.restore(*bn); }, BatchNormCounters(layer)});
  }
};

}  // namespace detail

/// PyTorch's torch.optim.swa_utils.update_bn for a dlib net: one pass over `batches` recomputes the
/// running statistics of every bn_ layer of `net` (bn_con and bn_fc) as the cumulative average of the
/// batches' statistics, for the weights the net holds now (typically averaged ones, after copy_to).
///
/// dlib keeps a bn_ layer's running statistics as an average over its last `window` batches, each
/// batch weighted 1/(n+1) while it has seen n < window; update_bn sets n to 0 and the window beyond
/// the batch count for the pass, so the statistics are the plain mean of the batches' (exactly
/// PyTorch's with momentum None), then gives each layer back its window. dlib's batch statistics are
/// its own: the batch mean, and the variance as dlib computes it.
///
/// `forward(batch)` runs the net once on one batch: `net.subnet()(batch.begin(), batch.end())` for
/// a vector of samples. (A loss net's `net(batch)` runs it in pieces of 128 samples: a batch of
/// 256 is then two passes, refused, but one of 129 ends in a piece of one sample that dlib's bn_
/// does not record, which no check here can see.) dlib's bn_ computes and records batch statistics only
/// on a batch of more than one sample (on one sample it normalises with the running ones), so every
/// batch must hold at least two. Refused with std::invalid_argument, every bn_ layer left exactly as
/// it was: a net that has never run (dlib makes bn_'s parameters in the first forward pass: run the
/// net or train a step first), no batches, a batch on which some bn_ layer recorded statistics not
/// exactly once (one sample; a `forward` that did not run the net, or ran it twice). Where `forward`
/// throws, every bn_ layer is put back as it was and the exception goes on. With no bn_ layer in the
/// net it returns without calling `forward`.
///
/// While a dnn_trainer trains `net`, wait for its thread first: pass trainer.get_net() (or call it
/// before). Every bn_ layer's state passes through dlib's serialize and deserialize, which keep its
/// parameters where they are: views of the net stay valid.
template <class Batches, class Forward, class Net>
void update_bn(Batches&& batches, Forward&& forward, Net& net) {
  std::vector<detail::BatchNormLayer> layers;
  ::dlib::visit_computational_layers(net, detail::CollectBatchNorms{layers});
  if (layers.empty()) return;
  for (const auto& layer : layers) {
    if (layer.before.never_ran()) {
      throw InvalidArgument(
          "polyak::dlib_dnn::update_bn: the net has never run: dlib makes a bn_ layer's parameters in the "
          "net's first forward pass (run the net on a batch, or train a step, first); nothing was changed");
    }
  }

  struct Restore {  // every bn_ layer comes back as it was unless the pass completes
    std::vector<detail::BatchNormLayer>& layers;
    bool done = false;
    ~Restore() {
      if (done) return;
      for (auto& layer : layers) layer.restore(layer.before);
    }
  } restore{layers};

  for (auto& layer : layers) layer.write(layer.before, 0, std::numeric_limits<unsigned long>::max());
  std::size_t count = 0;
  for (auto&& batch : batches) {
    forward(batch);
    ++count;
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const unsigned long recorded = layers[i].read().updates();
      if (recorded != count) {
        throw InvalidArgument(
            "polyak::dlib_dnn::update_bn: on batch " + std::to_string(count - 1) + " batch norm layer " +
            std::to_string(i) + " (counting from the output) recorded statistics " +
            (recorded < count ? std::string("not at all") : "more than once") +
            ": `forward` must run the net once a batch, and dlib's bn_ records statistics only from a batch "
            "of two samples or more; nothing was changed");
      }
    }
  }
  if (count == 0) {
    throw InvalidArgument("polyak::dlib_dnn::update_bn: no batches; nothing was changed");
  }
  for (auto& layer : layers) {
    const unsigned long window = layer.before.window();
    layer.write(layer.read(), count < window ? count : window, window);
  }
  restore.done = true;
}

}  // namespace polyak::dlib_dnn
