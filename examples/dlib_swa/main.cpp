// SPDX-License-Identifier: MIT
// dlib_swa: SWA and EMA of a dlib network trained by dlib's own dnn_trainer on handwritten digits.
//
// A small fully connected net with batch norm is trained by dnn_trainer (SGD with momentum, weight
// decay); from epoch `swa_start` on, SWALR anneals the trainer's learning rate to swa_lr and an
// AveragedModel takes one SWA snapshot per epoch. An EMA of the weights follows every step. At the
// end each average is copied into a copy of the net, update_bn recomputes its batch-norm statistics,
// and last SGD, SWA and EMA are compared on the test set over several seeds.
//
//   usage: dlib_swa [data/digits.csv]
#include <polyak/dlib.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>  // std::srand: dlib's layers draw their initial weights from std::rand
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../common/digits.hpp"
#include "../common/report.hpp"

namespace {

using Sample = dlib::matrix<float, 0, 1>;
using Net =
    dlib::loss_multiclass_log<dlib::fc<10, dlib::relu<dlib::bn_fc<dlib::fc<64, dlib::input<Sample>>>>>>;

struct Settings {
  int epochs = 30;
  int swa_start = 20;  // first epoch whose end snapshot SWA averages
  std::size_t batch_size = 32;
  double lr = 0.05, momentum = 0.9, weight_decay = 5e-4;
  double swa_lr = 0.02;
  int swa_anneal_epochs = 3;
  double ema_decay = 0.998;
  std::vector<unsigned> seeds{1, 2, 3};
};

struct Samples {
  std::vector<Sample> images;
  std::vector<unsigned long> labels;
};

Samples samples_of(const Dataset& set) {
  Samples out;
  for (Eigen::Index r = 0; r < set.images.rows(); ++r) {
    Sample x(64);
    for (long c = 0; c < 64; ++c) x(c) = set.images(r, c);
    out.images.push_back(x);
    out.labels.push_back(static_cast<unsigned long>(set.labels[static_cast<std::size_t>(r)]));
  }
  return out;
}

/// Test accuracy and loss, one sample at a time: dlib's bn_ normalises with its running statistics
/// only on a batch of one (on larger ones it uses, and records, the batch's).
Score evaluate(Net& net, const Samples& test) {
  double correct = 0, loss = 0;
  for (std::size_t i = 0; i < test.images.size(); ++i) {
    const dlib::tensor& logits = net.subnet()(test.images[i]);
    const float* z = logits.host();
    const float top = *std::max_element(z, z + 10);
    double sum = 0;
    for (int k = 0; k < 10; ++k) sum += std::exp(static_cast<double>(z[k] - top));
    const auto label = test.labels[i];
    loss += std::log(sum) - static_cast<double>(z[label] - top);
    correct += static_cast<double>(std::max_element(z, z + 10) - z == static_cast<long>(label));
  }
  const double n = static_cast<double>(test.images.size());
  return {correct / n, loss / n};
}

/// Scores averaged weights: copied into a copy of the net, batch-norm statistics recomputed for them.
template <class Averaged>
Score evaluate_average(const Averaged& averaged, const Net& trained,
                       const std::vector<std::vector<Sample>>& batches, const Samples& test) {
  Net net = trained;
  averaged.copy_to(polyak::dlib_dnn::parameters(net));
  polyak::dlib_dnn::update_bn(
      batches, [&](const std::vector<Sample>& batch) { net.subnet()(batch.begin(), batch.end()); }, net);
  return evaluate(net, test);
}

std::vector<Score> train(const Settings& s, unsigned seed, const Samples& data, const Samples& test) {
  std::srand(seed);
  std::mt19937 shuffle(seed);
  Net net;
  dlib::dnn_trainer<Net, dlib::sgd> trainer(
      net, dlib::sgd(static_cast<float>(s.weight_decay), static_cast<float>(s.momentum)));
  trainer.set_learning_rate(s.lr);
  trainer.set_mini_batch_size(s.batch_size);
  trainer.set_iterations_without_progress_threshold(1000000);  // the schedule below, not dlib's shrinking

  std::vector<std::size_t> order(data.images.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  const auto batch_at = [&](std::size_t start, std::vector<Sample>& xs, std::vector<unsigned long>& ys) {
    xs.clear();
    ys.clear();
    for (std::size_t i = start; i < start + s.batch_size; ++i) {
      xs.push_back(data.images[order[i]]);
      ys.push_back(data.labels[order[i]]);
    }
  };
  std::vector<Sample> xs;
  std::vector<unsigned long> ys;
  batch_at(0, xs, ys);
  trainer.train_one_step(xs, ys);  // dlib makes the parameters in the first step

  // polyak: the parameters in step with the trainer's thread, and the two averages.
  polyak::dlib_dnn::TrainerParameters params(trainer);
  polyak::AveragedModel<float> swa_model(params.synced());
  polyak::AveragedModel<float, polyak::EMA> ema_model(params.synced(), polyak::EMA{s.ema_decay});
  polyak::SWALR swa_scheduler(trainer, s.swa_lr, s.swa_anneal_epochs, polyak::AnnealStrategy::Cos);

  for (int epoch = 0; epoch < s.epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), shuffle);
    for (std::size_t start = 0; start + s.batch_size <= order.size(); start += s.batch_size) {
      batch_at(start, xs, ys);
      trainer.train_one_step(xs, ys);
      ema_model.update_parameters(params.synced());  // polyak: EMA after every step
    }
    const double epoch_lr = trainer.get_learning_rate();
    if (epoch >= s.swa_start) {
      swa_model.update_parameters(params.synced());  // polyak: one SWA snapshot per epoch
      swa_scheduler.step();                          // polyak: anneal to swa_lr, then hold it
    } else {
      // Cosine annealing over all epochs (PyTorch's CosineAnnealingLR, eta_min 0).
      trainer.set_learning_rate(s.lr * (1 + std::cos(M_PI * (epoch + 1) / s.epochs)) / 2);
    }
    if ((epoch + 1) % 10 == 0) {
      Net copy = trainer.get_net(dlib::force_flush_to_disk::no);
      std::printf("seed %u epoch %2d/%d  lr %.4f  test accuracy %5.2f%%\n", seed, epoch + 1, s.epochs,
                  epoch_lr, 100 * evaluate(copy, test).accuracy);
    }
  }
  std::vector<std::vector<Sample>> bn_batches;
  for (std::size_t start = 0; start + 64 <= data.images.size(); start += 64) {
    bn_batches.emplace_back(data.images.begin() + static_cast<long>(start),
                            data.images.begin() + static_cast<long>(start + 64));
  }
  Net& trained = trainer.get_net(dlib::force_flush_to_disk::no);
  Net last = trained;
  return {evaluate(last, test), evaluate_average(swa_model, trained, bn_batches, test),
          evaluate_average(ema_model, trained, bn_batches, test)};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 2) {
    std::fprintf(stderr, "usage: dlib_swa [data/digits.csv]\n");
    return 2;
  }
  const std::string data_path = argc == 2 ? argv[1] : POLYAK_EXAMPLE_DATA "/digits.csv";
  const Settings s;
  const Digits digits = load_digits(data_path);
  const Samples train_set = samples_of(digits.train), test_set = samples_of(digits.test);
  std::printf("dlib_swa: %zu training and %zu test digits, %d epochs, SWA from epoch %d\n",
              train_set.images.size(), test_set.images.size(), s.epochs, s.swa_start + 1);
  print_sgd_swa_ema(
      s.seeds, [&](unsigned seed) { return train(s, seed, train_set, test_set); }, s.swa_start, s.epochs,
      s.ema_decay);
}
