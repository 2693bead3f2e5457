// SPDX-License-Identifier: MIT
// libtorch_swa: SWA and EMA of a libtorch CNN trained on handwritten digits, written as PyTorch's
// torch.optim.swa_utils tutorial is, with polyak in place of swa_utils.
//
// A small CNN with batch norm (examples/common/digits_cnn.hpp) is trained by SGD with momentum and a
// cosine schedule; from epoch `swa_start` on, SWALR holds the learning rate at swa_lr and an
// AveragedModel takes one SWA snapshot per epoch. An EMA of the weights follows every step. At the
// end each average is copied into a fresh copy of the network, update_bn recomputes its batch-norm
// statistics, and last SGD, SWA and EMA are compared on the test set over several seeds.
//
// The averages are polyak::libtorch::AveragedModel: torch tensors kept on the model's device and
// updated there, so with --device cuda the whole run stays on the GPU.
//
//   usage: libtorch_swa [--device cpu|cuda] [data/digits.csv]
#include <polyak/core/swalr.hpp>
#include <polyak/torch.hpp>
#include <polyak/torch/averaged_model.hpp>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "../common/digits_cnn.hpp"
#include "../common/report.hpp"

namespace {

struct Settings {
  int epochs = 30;
  int swa_start = 20;  // first epoch whose end snapshot SWA averages
  std::int64_t batch_size = 32;
  double lr = 0.05, momentum = 0.9, weight_decay = 5e-4;
  double swa_lr = 0.02;
  int swa_anneal_epochs = 3;
  double ema_decay = 0.998;
  std::vector<std::uint64_t> seeds{1, 2, 3};
};

/// Scores averaged weights: copied into a fresh network, batch-norm statistics recomputed for them.
template <class Averaged>
Score evaluate_average(const Averaged& averaged, const std::vector<torch::Tensor>& train_batches,
                       const torch::Tensor& images, const torch::Tensor& labels) {
  torch::nn::Sequential net = make_digits_cnn();
  net->to(averaged.device());
  averaged.copy_to(*net);
  polyak::libtorch::update_bn(
      train_batches, [&](const torch::Tensor& x) { net->forward(x); }, *net);
  return evaluate(net, images, labels);
}

std::vector<Score> train(const Settings& s, std::uint64_t seed, const Digits& data, torch::Device device) {
  torch::manual_seed(seed);
  const torch::Tensor images = images_of(data.train).to(device), labels = labels_of(data.train).to(device);
  const torch::Tensor test_images = images_of(data.test).to(device);
  const torch::Tensor test_labels = labels_of(data.test).to(device);
  const std::vector<torch::Tensor> bn_batches = batches_of(images, 64);

  torch::nn::Sequential model = make_digits_cnn();  // initialized on the CPU: the same weights on any device
  model->to(device);
  torch::optim::SGD optimizer(
      model->parameters(), torch::optim::SGDOptions(s.lr).momentum(s.momentum).weight_decay(s.weight_decay));

  // polyak: the two averages, each a copy of the model's tensors on its device.
  polyak::libtorch::AveragedModel<> swa_model(*model);
  polyak::libtorch::AveragedModel<polyak::EMA> ema_model(*model, polyak::EMA{s.ema_decay});
  polyak::SWALR swa_scheduler(optimizer, s.swa_lr, s.swa_anneal_epochs, polyak::AnnealStrategy::Cos);

  for (int epoch = 0; epoch < s.epochs; ++epoch) {
    model->train();
    const torch::Tensor order = torch::randperm(images.size(0), torch::kLong).to(device);
    double train_loss = 0;
    int batches = 0;
    for (std::int64_t start = 0; start + s.batch_size <= images.size(0); start += s.batch_size) {
      const torch::Tensor index = order.slice(0, start, start + s.batch_size);
      const torch::Tensor loss = torch::nn::functional::cross_entropy(
          model->forward(images.index_select(0, index)), labels.index_select(0, index));
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      ema_model.update_parameters(*model);  // polyak: EMA after every optimizer step
      train_loss += loss.item<double>();
      ++batches;
    }
    const double epoch_lr = optimizer.param_groups()[0].options().get_lr();
    if (epoch >= s.swa_start) {
      swa_model.update_parameters(*model);  // polyak: one SWA snapshot per epoch
      swa_scheduler.step();                 // polyak: anneal to swa_lr, then hold it
    } else {
      // Cosine annealing over all epochs (PyTorch's CosineAnnealingLR, eta_min 0).
      optimizer.param_groups()[0].options().set_lr(s.lr * (1 + std::cos(M_PI * (epoch + 1) / s.epochs)) / 2);
    }
    if ((epoch + 1) % 5 == 0) {
      const Score sgd = evaluate(model, test_images, test_labels);
      std::printf("seed %llu epoch %2d/%d  lr %.4f  train loss %.4f  test accuracy %5.2f%%\n",
                  static_cast<unsigned long long>(seed), epoch + 1, s.epochs, epoch_lr, train_loss / batches,
                  100 * sgd.accuracy);
    }
  }
  return {evaluate(model, test_images, test_labels),
          evaluate_average(swa_model, bn_batches, test_images, test_labels),
          evaluate_average(ema_model, bn_batches, test_images, test_labels)};
}

}  // namespace

int main(int argc, char** argv) {
  std::string data_path = POLYAK_EXAMPLE_DATA "/digits.csv", device_name = "cpu";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--device" && i + 1 < argc) {
      device_name = argv[++i];
    } else if (arg.rfind("--", 0) == 0) {
      std::fprintf(stderr, "usage: libtorch_swa [--device cpu|cuda] [data/digits.csv]\n");
      return 2;
    } else {
      data_path = arg;
    }
  }
  if (device_name != "cpu" && device_name != "cuda") {
    std::fprintf(stderr, "libtorch_swa: --device takes cpu or cuda, not '%s'\n", device_name.c_str());
    return 2;
  }
  if (device_name == "cuda" && !torch::cuda::is_available()) {
    std::fprintf(stderr, "libtorch_swa: --device cuda, but this libtorch sees no CUDA device\n");
    return 2;
  }
  const torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
  const Digits data = load_digits(data_path);
  torch::set_num_threads(1);  // small batches: threads cost more than they give, and runs repeat exactly
  const Settings s;
  std::printf(
      "digits: %zu training and %zu test images; libtorch CNN conv8-BN-pool-fc32-BN-fc10; %d epochs, "
      "SWA from epoch %d; device %s (model and averages)\n",
      data.train.labels.size(), data.test.labels.size(), s.epochs, s.swa_start + 1, device.str().c_str());
  print_sgd_swa_ema(
      s.seeds, [&](std::uint64_t seed) { return train(s, seed, data, device); }, s.swa_start, s.epochs,
      s.ema_decay);
  return 0;
}
