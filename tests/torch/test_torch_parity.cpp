// SPDX-License-Identifier: MIT
// Parity with Python: the run of tests/reference/libtorch_swa.py (torch.optim.swa_utils' AveragedModel,
// SWALR and update_bn), repeated with libtorch + polyak from the same initial weights, data order
// and settings. Training is libtorch's on both sides; everything averaged or scheduled is polyak's.
#include "polyak/checkpoint.hpp"
#include "polyak/torch.hpp"
#include "polyak/torch/averaged_model.hpp"

#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>

#include "../../examples/common/digits_cnn.hpp"
#include "polyak/core/averaged_model.hpp"
#include "polyak/checkpoint/safetensors.hpp"

namespace {

torch::Tensor tensor_of(const polyak::StoredTensor& stored) {
  const auto dtype = stored.dtype == polyak::DType::I64   ? torch::kLong
                     : stored.dtype == polyak::DType::F64 ? torch::kDouble
                                                          : torch::kFloat;
  REQUIRE((stored.dtype == polyak::DType::F32 || stored.dtype == polyak::DType::F64 ||
           stored.dtype == polyak::DType::I64));
  return torch::from_blob(const_cast<std::byte*>(stored.bytes.data()), stored.shape, dtype).clone();
}

/// Copies "<prefix><name>" of `golden` into each of `module`'s state tensors.
void load(torch::nn::Module& module, const polyak::StateDict& golden, const std::string& prefix) {
  torch::NoGradGuard no_grad;
  for (auto& item : module.named_parameters()) item.value().copy_(tensor_of(golden.at(prefix + item.key())));
  for (auto& item : module.named_buffers()) item.value().copy_(tensor_of(golden.at(prefix + item.key())));
}

/// The largest |ours - theirs| / max(1, |theirs|) over `module`'s state against "<prefix><name>".
double largest_difference(torch::nn::Module& module, const polyak::StateDict& golden,
                          const std::string& prefix, std::size_t& compared) {
  double worst = 0;
  auto compare = [&](const std::string& name, const torch::Tensor& ours) {
    const torch::Tensor theirs = tensor_of(golden.at(prefix + name)).to(torch::kDouble);
    const torch::Tensor scale = theirs.abs().clamp_min(1.0);
    worst = std::max(worst, ((ours.to(torch::kDouble) - theirs).abs() / scale).max().item<double>());
    ++compared;
  };
  for (const auto& item : module.named_parameters()) compare(item.key(), item.value());
  for (const auto& item : module.named_buffers()) compare(item.key(), item.value());
  return worst;
}

}  // namespace

TEST_CASE("libtorch + polyak reproduce torch.optim.swa_utils' SWA, EMA, SWALR and update_bn",
          "[torch][reference]") {
  const polyak::StateDict golden = polyak::load_safetensors(POLYAK_REFERENCE_DIR "/libtorch_swa.safetensors");
  const int epochs = 6, swa_start = 3, batch = 32;
  const Digits data = load_digits(POLYAK_EXAMPLE_DATA "/digits.csv");
  const torch::Tensor images = images_of(data.train), labels = labels_of(data.train);
  const torch::Tensor order = tensor_of(golden.at("order"));
  REQUIRE(order.size(1) == images.size(0));

  torch::nn::Sequential model = make_digits_cnn();
  load(*model, golden, "initial.");
  torch::optim::SGD optimizer(model->parameters(),
                              torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(5e-4));

  const auto params = polyak::libtorch::tensors<float>(*model);
  polyak::AveragedModel<float> swa_model(params);
  polyak::AveragedModel<float, polyak::EMA> ema_model(params, polyak::EMA{0.95});
  // The same averages kept as torch tensors on the module's device, updated by torch's kernels.
  polyak::libtorch::AveragedModel<> device_swa(*model);
  polyak::libtorch::AveragedModel<polyak::EMA> device_ema(*model, polyak::EMA{0.95});
  polyak::SWALR swa_scheduler(optimizer, /*swa_lr=*/0.01, /*anneal_epochs=*/2, polyak::AnnealStrategy::Cos);
  const torch::Tensor expected_lr = tensor_of(golden.at("lr"));

  for (int epoch = 0; epoch < epochs; ++epoch) {
    model->train();
    for (std::int64_t start = 0; start + batch <= images.size(0); start += batch) {
      const torch::Tensor index = order[epoch].slice(0, start, start + batch);
      const torch::Tensor loss = torch::nn::functional::cross_entropy(
          model->forward(images.index_select(0, index)), labels.index_select(0, index));
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      ema_model.update_parameters(params);
      device_ema.update_parameters(*model);
    }
    if (epoch >= swa_start) {
      swa_model.update_parameters(params);
      device_swa.update_parameters(*model);
      swa_scheduler.step();
    }
    CHECK(optimizer.param_groups()[0].options().get_lr() == expected_lr[epoch].item<double>());
  }

  std::size_t compared = 0;
  const double training = largest_difference(*model, golden, "final.", compared);
  const auto bn_batches = batches_of(images, 64);
  double averaged[4];
  for (int which = 0; which < 4; ++which) {
    torch::nn::Sequential net = make_digits_cnn();
    const auto net_params = polyak::libtorch::tensors<float>(*net);
    if (which == 0) {
      swa_model.copy_to(net_params);
    } else if (which == 1) {
      ema_model.copy_to(net_params);
    } else if (which == 2) {
      device_swa.copy_to(*net);
    } else {
      device_ema.copy_to(*net);
    }
    polyak::libtorch::update_bn(
        bn_batches, [&](const torch::Tensor& x) { net->forward(x); }, *net);
    averaged[which] = largest_difference(*net, golden, which % 2 == 0 ? "swa." : "ema.", compared);
  }
  std::printf(
      "libtorch parity (%zu tensors): trained model %.2e, SWA + update_bn %.2e, EMA + update_bn %.2e; "
      "device average: SWA %.2e, EMA %.2e (largest |difference| / max(1, |Python's|))\n",
      compared, training, averaged[0], averaged[1], averaged[2], averaged[3]);
  CHECK(compared == 5 * 16);  // 10 parameters and 6 buffers a model
  CHECK(training < 1e-5);
  for (const double difference : averaged) CHECK(difference < 1e-5);
}
