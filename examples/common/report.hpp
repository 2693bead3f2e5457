// SPDX-License-Identifier: MIT
// The examples' result tables: test scores over several seeds, as mean ± standard deviation.
#pragma once

#include <algorithm>  // std::sort
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

/// Test-set accuracy (a fraction), mean cross-entropy loss (the negative log-likelihood) and
/// expected calibration error.
struct Score {
  double accuracy = 0, loss = 0, ece = 0;
};

/// "97.11 ± 0.21": mean and sample standard deviation of `values` times `scale`.
inline std::string mean_spread(const std::vector<double>& values, double scale, int decimals) {
  const double mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
  double squares = 0;
  for (const double v : values) squares += (v - mean) * (v - mean);
  const double spread = values.size() > 1 ? std::sqrt(squares / static_cast<double>(values.size() - 1)) : 0.0;
  char text[64];
  std::snprintf(text, sizeof text, "%.*f ± %.*f", decimals, scale * mean, decimals, scale * spread);
  return text;
}

/// Prints the table: one row a kind of weights, its scores over the seeds; with `calibration`, the
/// expected calibration error too.
inline void print_scores(const std::vector<std::string>& names, const std::vector<std::vector<Score>>& scores,
                         std::size_t seeds, bool calibration = false) {
  std::printf("\ntest set, %zu seeds (mean ± standard deviation)\n", seeds);
  if (calibration) {
    std::printf("%-42s %-18s %-18s %s\n", "weights", "accuracy (%)", "NLL", "ECE (%)");
  } else {
    std::printf("%-42s %-18s %s\n", "weights", "accuracy (%)", "loss");
  }
  for (std::size_t k = 0; k < names.size(); ++k) {
    std::vector<double> accuracy, loss, ece;
    for (const Score& s : scores[k]) {
      accuracy.push_back(s.accuracy);
      loss.push_back(s.loss);
      ece.push_back(s.ece);
    }
    const std::string first = mean_spread(accuracy, 100, 2), second = mean_spread(loss, 1, 4);
    if (calibration) {
      std::printf("%-42s %-18s %-18s %s\n", names[k].c_str(), first.c_str(), second.c_str(),
                  mean_spread(ece, 100, 2).c_str());
    } else {
      std::printf("%-42s %-18s %s\n", names[k].c_str(), first.c_str(), second.c_str());
    }
  }
}

/// The SWA-and-EMA examples' table: each seed's {last SGD, SWA, EMA} scores, run by `train(seed)`,
/// the SWA rows from epoch `swa_start` (counting from 0) of `epochs`, the EMA of decay `ema_decay`.
template <class Seeds, class Train>
void print_sgd_swa_ema(const Seeds& seeds, Train&& train, int swa_start, int epochs, double ema_decay) {
  std::vector<std::vector<Score>> scores(3);
  for (const auto seed : seeds) {
    const std::vector<Score> run = train(seed);
    for (std::size_t k = 0; k < 3; ++k) scores[k].push_back(run[k]);
  }
  char swa_name[64], ema_name[64];
  std::snprintf(swa_name, sizeof swa_name, "SWA (epochs %d-%d) + update_bn", swa_start + 1, epochs);
  std::snprintf(ema_name, sizeof ema_name, "EMA (decay %g) + update_bn", ema_decay);
  print_scores({"last SGD", swa_name, ema_name}, scores, seeds.size());
}

/// Of several runs of the same training, the one of median time (their seconds_per_epoch).
template <class Run>
Run median_time(std::vector<Run> runs) {
  std::sort(runs.begin(), runs.end(),
            [](const Run& a, const Run& b) { return a.seconds_per_epoch < b.seconds_per_epoch; });
  return runs[runs.size() / 2];
}
