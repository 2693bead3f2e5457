// SPDX-License-Identifier: MIT
// swa_digits: SWA and EMA of the weights of an MLP trained on real handwritten digits.
//
// The program a newcomer reads to see what polyak is for. It trains a small MLP with batch norm by
// minibatch SGD with momentum and a cosine schedule; from epoch `swa_start` on, SWALR holds the
// learning rate at swa_lr and an AveragedModel takes the SWA of one snapshot per epoch. An EMA of
// the weights follows every step. At the end update_bn recomputes the batch-norm statistics of the
// averaged weights, and the three are compared on the test set over several seeds.
//
// Post-hoc EMA (EDM2): two power-function EMA profiles (sigma_rel 0.10 and 0.25) are also kept and
// snapshotted to disk every epoch; after training, EMAs of other widths are reconstructed from the
// snapshots and scored too - the EMA length chosen after the run, at no extra training.
//
// SWAG (Maddox et al., 2019): from the same epochs as SWA, a SWA-Gaussian posterior (mean, diagonal
// variance, the last 10 deviations) is collected; after training, 30 weight draws from it, each with
// update_bn, are averaged in their predicted probabilities (Bayesian model averaging). The table
// gives every row's accuracy, negative log-likelihood and expected calibration error.
//
//   usage: swa_digits [data/digits.csv] [output folder]
// writes <output>/curves.csv (per-epoch curves), <output>/post_hoc/seed<N>/ (the power-EMA
// snapshots, for the polyak-post-hoc-ema tool) and, when gnuplot is installed, <output>/curves.png.
#include <polyak/checkpoint.hpp>
#include <polyak/polyak.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../common/digits.hpp"
#include "../common/mlp.hpp"

namespace {

struct Settings {
  int hidden = 128;
  int epochs = 40;
  int swa_start = 25;  // first epoch whose end snapshot SWA averages
  int batch_size = 32;
  double lr = 0.1, momentum = 0.9, weight_decay = 5e-4;
  double swa_lr = 0.05;
  int swa_anneal_epochs = 5;
  double ema_decay = 0.998;
  std::vector<double> post_hoc_profiles{0.10, 0.25};  // sigma_rel of the two power EMAs kept
  std::vector<double> post_hoc_targets{0.15, 0.20};   // sigma_rel reconstructed after training
  std::int64_t swag_rank = 10;                        // SWAG's deviation columns
  int swag_samples = 30;                              // draws averaged by the Bayesian model average
  std::vector<unsigned> seeds{1, 2, 3};
};

/// Evaluates an averaged model in place: swap its weights into `model`, recompute the batch-norm
/// statistics for them with one pass over the training data, score, swap back. No third copy.
template <class Averaged>
Score evaluate_average(Averaged& averaged, Mlp& model, const std::vector<RowMatrix>& train_batches,
                       const Dataset& test) {
  const auto tensors = model.tensors();
  averaged.swap(tensors);
  polyak::update_bn(train_batches, [&](const RowMatrix& batch) { model.forward(batch, /*training=*/true); },
                    {&model.bn});
  const Score score = evaluate(model, test);
  averaged.swap(tensors);  // the live weights and statistics are back
  return score;
}

struct Result {
  std::vector<Score> scores;  // last SGD, SWA, EMA, each post-hoc target, SWAG's model average
};

/// Bayesian model averaging over SWAG: `samples` draws of the weights, each with its batch-norm
/// statistics recomputed, their predicted probabilities averaged. Leaves the last draw in `model`.
Score evaluate_swag(const polyak::SWAG<float>& swag, int samples, unsigned seed, Mlp& model,
                    const std::vector<RowMatrix>& train_batches, const Dataset& test) {
  const auto tensors = model.tensors();
  std::mt19937_64 draws(seed);
  RowMatrix average = RowMatrix::Zero(test.images.rows(), 10);
  for (int k = 0; k < samples; ++k) {
    swag.sample(tensors, draws);  // polyak: one draw of the posterior into the model's weights
    polyak::update_bn(train_batches, [&](const RowMatrix& batch) { model.forward(batch, /*training=*/true); },
                      {&model.bn});
    average += model.forward(test.images, /*training=*/false);
  }
  return score_of(average / static_cast<float>(samples), test.labels);
}

/// Reconstructs the power EMA of width `sigma_rel` from the snapshots in `folder` and scores it.
Score evaluate_post_hoc(const std::string& folder, double sigma_rel, Mlp& model,
                        const std::vector<RowMatrix>& train_batches, const Dataset& test) {
  const auto snapshots = polyak::find_power_ema_snapshots(folder);
  polyak::AveragedModel<float, polyak::PowerEMA> reconstructed(model.tensors(),
                                                               polyak::PowerEMA::from_sigma_rel(sigma_rel));
  reconstructed.load_state_dict(
      polyak::reconstruct_power_ema(snapshots, polyak::sigma_rel_to_gamma(sigma_rel)));
  return evaluate_average(reconstructed, model, train_batches, test);
}

Result train(const Settings& s, unsigned seed, const Digits& data, const std::filesystem::path& out,
             std::ofstream& curves) {
  std::mt19937 rng(seed);
  Mlp model(s.hidden, rng);
  MlpGradients velocity(model);
  const auto tensors = model.tensors();

  // polyak: the two averages, each one owned copy of the model's tensors.
  polyak::AveragedModel<float> swa(tensors);
  polyak::AveragedModel<float, polyak::EMA> ema(tensors, polyak::EMA{s.ema_decay});
  // polyak: two power-EMA profiles, snapshotted to disk once an epoch, for post-hoc EMA.
  const std::string snapshots = (out / "post_hoc" / ("seed" + std::to_string(seed))).string();
  std::filesystem::remove_all(snapshots);
  const auto steps_per_epoch = static_cast<std::int64_t>(data.train.labels.size()) / s.batch_size;
  polyak::PostHocEMA<float> post_hoc(tensors, snapshots, steps_per_epoch, s.post_hoc_profiles);
  // polyak: the SWA-Gaussian posterior, collected with the SWA.
  polyak::SWAG<float> swag(tensors, s.swag_rank);

  // The optimizer's learning rate (one parameter group); the schedules write it.
  std::vector<double> lrs{s.lr};
  std::optional<polyak::SWALR<>> swa_scheduler;

  // The training data in fixed batches, for update_bn.
  std::vector<int> order(data.train.labels.size());
  std::iota(order.begin(), order.end(), 0);
  std::vector<RowMatrix> train_batches;
  for (std::size_t b = 0; b < order.size(); b += 64) {
    train_batches.push_back(rows_of(data.train, order, b, std::min(order.size(), b + 64), nullptr));
  }

  Score swa_score{};
  for (int epoch = 0; epoch < s.epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    double train_loss = 0;
    int batches = 0;
    std::vector<int> labels;
    for (std::size_t b = 0; b + s.batch_size <= order.size(); b += static_cast<std::size_t>(s.batch_size)) {
      const RowMatrix x = rows_of(data.train, order, b, b + static_cast<std::size_t>(s.batch_size), &labels);
      train_loss += sgd_step(model, velocity, x, labels, lrs[0], s.momentum, s.weight_decay);
      ++batches;
      ema.update_parameters(tensors);       // polyak: EMA after every optimizer step
      post_hoc.update_parameters(tensors);  // polyak: and the power-EMA profiles
    }
    const double epoch_lr = lrs[0];
    if (epoch >= s.swa_start) {
      swa.update_parameters(tensors);   // polyak: one SWA snapshot per epoch
      swag.update_parameters(tensors);  // polyak: and one SWAG collection
      if (!swa_scheduler) {
        swa_scheduler.emplace(lrs, s.swa_lr, s.swa_anneal_epochs, polyak::AnnealStrategy::Cos);
      }
      swa_scheduler->step();  // polyak: anneal to swa_lr, then hold it
    } else {
      // Cosine annealing over all epochs (PyTorch's CosineAnnealingLR, eta_min 0).
      lrs[0] = s.lr * (1 + std::cos(M_PI * (epoch + 1) / s.epochs)) / 2;
    }

    const Score sgd_score = evaluate(model, data.test);
    const Score ema_score = evaluate_average(ema, model, train_batches, data.test);
    if (swa.n_averaged() > 0) swa_score = evaluate_average(swa, model, train_batches, data.test);
    std::printf(
        "seed %u epoch %2d/%d  lr %.4f  train loss %.4f  test acc: SGD %5.2f%%  EMA %5.2f%%  SWA %s\n", seed,
        epoch + 1, s.epochs, epoch_lr, train_loss / batches, 100 * sgd_score.accuracy,
        100 * ema_score.accuracy,
        swa.n_averaged() > 0 ? (std::to_string(100 * swa_score.accuracy).substr(0, 5) + "%").c_str() : "-");
    curves << seed << ',' << epoch + 1 << ',' << epoch_lr << ',' << train_loss / batches << ','
           << sgd_score.accuracy << ',' << sgd_score.loss << ',' << ema_score.accuracy << ','
           << ema_score.loss << ',';
    if (swa.n_averaged() > 0) {
      curves << swa_score.accuracy << ',' << swa_score.loss << '\n';
    } else {
      curves << ",\n";
    }
  }
  Result result{
      {evaluate(model, data.test), swa_score, evaluate_average(ema, model, train_batches, data.test)}};
  for (const double sigma_rel : s.post_hoc_targets)
    result.scores.push_back(evaluate_post_hoc(snapshots, sigma_rel, model, train_batches, data.test));
  result.scores.push_back(evaluate_swag(swag, s.swag_samples, seed, model, train_batches, data.test));
  return result;
}

void plot(const std::filesystem::path& folder) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    std::printf("note: gnuplot is not installed (Debian: gnuplot-nox), so no plot; the curves are in %s\n",
                (folder / "curves.csv").c_str());
    return;
  }
  const auto script = folder / "curves.gp";
  std::ofstream gp(script);
  const std::string csv = "'" + (folder / "curves.csv").string() + "'";
  const std::string first_seed = " every ::1 using ($1==1?$2:1/0):";
  gp << "set terminal pngcairo size 1000,420\nset output '" << (folder / "curves.png").string() << "'\n"
     << "set datafile separator ','\nset xlabel 'epoch'\nset key top right\nset multiplot layout 1,2 "
     << "title 'swa\\_digits, first seed: SGD, and SWA and EMA after update\\_bn'\n"
     << "set ylabel 'test accuracy (%)'\nset yrange [95:100]\nset key bottom right\n"
     << "plot " << csv << first_seed << "($5*100) with lines lw 2 title 'SGD', " << csv << first_seed
     << "($7*100) with lines lw 2 title 'EMA', " << csv << first_seed
     << "($9*100) with lines lw 2 title 'SWA'\n"
     << "set ylabel 'test loss'\nset yrange [0:0.2]\nset key top right\n"
     << "plot " << csv << first_seed << "6 with lines lw 2 title 'SGD', " << csv << first_seed
     << "8 with lines lw 2 title 'EMA', " << csv << first_seed << "10 with lines lw 2 title 'SWA'\n"
     << "unset multiplot\n";
  gp.close();
  const std::string command = "gnuplot '" + script.string() + "'";
  if (std::system(command.c_str()) == 0) {
    std::printf("plot: %s\n", (folder / "curves.png").c_str());
  } else {
    std::printf("note: gnuplot failed; the curves are in %s\n", (folder / "curves.csv").c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string data_path = argc > 1 ? argv[1] : POLYAK_EXAMPLE_DATA "/digits.csv";
  const std::filesystem::path folder = argc > 2 ? argv[2] : "swa_digits_out";
  const Digits data = load_digits(data_path);
  std::filesystem::create_directories(folder);
  std::ofstream curves(folder / "curves.csv");
  curves << "seed,epoch,lr,train_loss,sgd_accuracy,sgd_loss,ema_accuracy,ema_loss,swa_accuracy,swa_loss\n";

  const Settings s;
  std::printf(
      "digits: %zu training and %zu test images; MLP 64-%d-BN-ReLU-10; %d epochs, SWA from epoch %d\n",
      data.train.labels.size(), data.test.labels.size(), s.hidden, s.epochs, s.swa_start + 1);
  std::vector<std::vector<Score>> scores(4 + s.post_hoc_targets.size());
  for (const unsigned seed : s.seeds) {
    const Result r = train(s, seed, data, folder, curves);
    for (std::size_t k = 0; k < scores.size(); ++k) scores[k].push_back(r.scores[k]);
  }
  curves.close();

  char name[64];
  std::vector<std::string> names{"last SGD"};
  std::snprintf(name, sizeof name, "SWA (epochs %d-%d) + update_bn", s.swa_start + 1, s.epochs);
  names.push_back(name);
  std::snprintf(name, sizeof name, "EMA (decay %g) + update_bn", s.ema_decay);
  names.push_back(name);
  for (const double sigma_rel : s.post_hoc_targets) {
    std::snprintf(name, sizeof name, "post-hoc EMA (sigma_rel %.2f) + update_bn", sigma_rel);
    names.push_back(name);
  }
  std::snprintf(name, sizeof name, "SWAG, %d draws (rank %lld) + update_bn", s.swag_samples,
                static_cast<long long>(s.swag_rank));
  names.push_back(name);
  print_scores(names, scores, s.seeds.size(), /*calibration=*/true);
  std::printf("curves: %s\n", (folder / "curves.csv").c_str());
  plot(folder);
  return 0;
}
