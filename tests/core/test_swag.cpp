// SPDX-License-Identifier: MIT
// SWAG (swag.hpp): its moments and deviations against closed forms computed here, in double, by two
// passes over the stream (not by Welford's rule, which the code uses); its draws' mean and
// covariance against the analytic covariance of the paper's formula, within their sampling error;
// refusals that change nothing; states that round-trip and hostile states refused.
#include "polyak/core/swag.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "polyak/core/averaged_model.hpp"
#include "swag_model.hpp"

namespace {

using polyak_test::SwagModel;
const auto stream = polyak_test::swag_stream;

/// Mean and population variance of xs[0..n), two passes.
void moments(const std::vector<std::vector<double>>& xs, std::size_t n, std::vector<double>& mean,
             std::vector<double>& variance) {
  mean.assign(10, 0.0);
  variance.assign(10, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = 0; j < 10; ++j) mean[j] += xs[i][j] / static_cast<double>(n);
  }
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = 0; j < 10; ++j)
      variance[j] += std::pow(xs[i][j] - mean[j], 2) / static_cast<double>(n);
  }
}

/// The SWAG's parameter p, scalar j (storage order), of mean() or variance().
double at(const polyak::ParameterList<double>& list, std::size_t j) {
  return j < 6 ? list[0].data()[j] : list[1].data()[j - 6];
}

double deviation_at(const polyak::SWAG<double>& swag, std::int64_t k, std::size_t j) {
  return j < 6 ? swag.deviation(0, k)[j] : swag.deviation(1, k)[j - 6];
}

}  // namespace

TEST_CASE("SWAG's mean, variance and deviations are the stream's closed forms", "[swag]") {
  const auto xs = stream(6);
  SwagModel model;
  polyak::SWAG<double> swag(model.params, /*max_rank=*/3);
  for (std::size_t n = 1; n <= xs.size(); ++n) {
    model.set(xs[n - 1]);
    swag.update_parameters(model.params);
    std::vector<double> mean, variance;
    moments(xs, n, mean, variance);
    for (std::size_t j = 0; j < 10; ++j) {
      CHECK(at(swag.parameters(), j) == Approx(mean[j]).epsilon(1e-14));
      CHECK(at(swag.variance(), j) == Approx(variance[j]).epsilon(1e-9).margin(1e-12));
    }
    // The deviation of collection n, x_n - mean_n, sits in row (n - 1) mod 3.
    for (std::size_t j = 0; j < 10; ++j)
      CHECK(deviation_at(swag, static_cast<std::int64_t>((n - 1) % 3), j) ==
            Approx(xs[n - 1][j] - mean[j]).margin(1e-12));
  }
  CHECK(swag.n_collected() == 6);
  CHECK(swag.deviations_held() == 3);
  CHECK(swag.parameters().size() == 2);  // parameters only
  CHECK(model.running_mean[0] == 7.0);
}

TEST_CASE("SWAG's mean is the SWA average, bit for bit, collect_every skips steps", "[swag]") {
  Eigen::VectorXf w(5);
  polyak::ParameterList<float> list;
  list.add("w", w);
  polyak::SWAG<float> swag(list, 2);
  polyak::SWAG<float> every_other(list, 2, /*collect_every=*/2);
  polyak::AveragedModel<float> swa(list);
  polyak::AveragedModel<float> swa_every_other(list);
  for (int step = 1; step <= 9; ++step) {
    for (int j = 0; j < 5; ++j) w[j] = std::cos(0.37f * static_cast<float>(step * (j + 1)));
    swag.update_parameters(list);
    swa.update_parameters(list);
    every_other.update_parameters(list);
    if (step % 2 == 0) swa_every_other.update_parameters(list);
  }
  for (int j = 0; j < 5; ++j) {
    CHECK(swag.parameters()[0].data()[j] == swa.tensors()[0].data()[j]);
    CHECK(every_other.parameters()[0].data()[j] == swa_every_other.tensors()[0].data()[j]);
  }
  CHECK(every_other.n_updates() == 9);
  CHECK(every_other.n_collected() == 4);
}

TEST_CASE("SWAG's draws have the paper's covariance, within their sampling error", "[swag][sample]") {
  // Three scalars, four collections, K = 3: Sigma = (diag(variance) + D D^T / (K - 1)) / 2, scaled.
  Eigen::Vector3d theta;
  polyak::ParameterList<double> list;
  list.add("theta", theta);
  polyak::SWAG<double> swag(list, 3);
  const double stream_values[4][3] = {{1.0, 2.0, -1.0}, {1.5, 1.0, 0.0}, {0.5, 2.5, -0.5}, {2.0, 1.5, 1.0}};
  double mean[3] = {0, 0, 0};
  double deviations[3][3];  // rows: collections 2, 3, 4 (the ring of 3 holds the last three)
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 3; ++j) {
      theta[j] = stream_values[i][j];
      mean[j] += (stream_values[i][j] - mean[j]) / (i + 1);
    }
    swag.update_parameters(list);
    if (i >= 1) {
      for (int j = 0; j < 3; ++j) deviations[i - 1][j] = stream_values[i][j] - mean[j];
    }
  }
  double variance[3] = {0, 0, 0};
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 3; ++j) variance[j] += std::pow(stream_values[i][j] - mean[j], 2) / 4;
  }
  for (const bool diagonal_only : {false, true}) {
    CAPTURE(diagonal_only);
    const double scale = 0.7;
    double sigma[3][3];
    for (int a = 0; a < 3; ++a) {
      for (int b = 0; b < 3; ++b) {
        double low_rank = 0;
        for (int k = 0; k < 3; ++k) low_rank += deviations[k][a] * deviations[k][b];
        const double diagonal = a == b ? variance[a] : 0.0;
        sigma[a][b] = diagonal_only ? scale * diagonal : scale * (diagonal + low_rank / 2) / 2;
      }
    }
    std::mt19937_64 rng(12345);
    const int draws = 100000;
    double sum[3] = {0, 0, 0}, products[3][3] = {};
    for (int s = 0; s < draws; ++s) {
      swag.sample(list, rng, scale, diagonal_only);
      for (int a = 0; a < 3; ++a) {
        sum[a] += theta[a];
        for (int b = 0; b < 3; ++b) products[a][b] += (theta[a] - mean[a]) * (theta[b] - mean[b]);
      }
    }
    // The sample mean is within 5 standard errors, sqrt(Sigma_aa / N), of the mean; each sample
    // covariance (about the known mean) within 5 of its standard errors, sqrt((Sigma_aa Sigma_bb +
    // Sigma_ab^2) / N) for a Gaussian. Nine entries at 5 sigma: a false failure once in ~10^5 seeds
    // (and this seed is fixed).
    for (int a = 0; a < 3; ++a) {
      CHECK(std::abs(sum[a] / draws - mean[a]) <= 5 * std::sqrt(sigma[a][a] / draws));
      for (int b = 0; b < 3; ++b) {
        const double error = std::sqrt((sigma[a][a] * sigma[b][b] + sigma[a][b] * sigma[a][b]) / draws);
        CAPTURE(a, b, products[a][b] / draws, sigma[a][b]);
        CHECK(std::abs(products[a][b] / draws - sigma[a][b]) <= 5 * error + 1e-15);
      }
    }
  }
}

TEST_CASE("SWAG draws are reproducible from the seed", "[swag][sample]") {
  const auto xs = stream(4);
  SwagModel model;
  polyak::SWAG<double> swag(model.params, 3);
  for (const auto& x : xs) {
    model.set(x);
    swag.update_parameters(model.params);
  }
  std::mt19937_64 a(9), b(9), c(10);
  swag.sample(model.params, a);
  const Eigen::MatrixXd first = model.weight;
  swag.sample(model.params, b);
  CHECK(model.weight == first);
  swag.sample(model.params, c);
  CHECK(model.weight != first);
  CHECK(model.running_mean[0] == 7.0);  // buffers are update_bn's
}

TEST_CASE("SWAG refuses bad settings, calls and models, and changes nothing", "[swag][adversarial]") {
  SwagModel model;
  CHECK_THROWS_AS(polyak::SWAG<double>(model.params, -1), polyak::InvalidArgument);
  CHECK_THROWS_AS(polyak::SWAG<double>(model.params, 5000), polyak::InvalidArgument);
  CHECK_THROWS_AS(polyak::SWAG<double>(model.params, 3, 0), polyak::InvalidArgument);
  polyak::SWAG<double> swag(model.params, 3);
  std::mt19937_64 rng(1);
  const Eigen::MatrixXd before = model.weight;
  CHECK_THROWS_WITH(swag.sample(model.params, rng), Catch::Contains("nothing collected yet"));
  model.set(stream(1)[0]);
  swag.update_parameters(model.params);
  const Eigen::MatrixXd collected = model.weight;
  CHECK_THROWS_WITH(swag.sample(model.params, rng), Catch::Contains("a full draw needs two deviations, 1"));
  CHECK_THROWS_WITH(swag.sample(model.params, rng, -1.0), Catch::Contains("scale"));
  CHECK_THROWS_WITH(swag.sample(model.params, rng, std::nan("")), Catch::Contains("scale"));
  CHECK(model.weight == collected);                             // nothing written by a refused draw
  swag.sample(model.params, rng, 1.0, /*diagonal_only=*/true);  // one collection: variance 0
  CHECK(model.weight == collected);

  Eigen::MatrixXd wide = Eigen::MatrixXd::Zero(2, 4);
  Eigen::VectorXd bias(4), running(2);
  polyak::ParameterList<double> other;
  other.add("weight", wide).add("bias", bias).add_buffer("running_mean", running);
  CHECK_THROWS_WITH(swag.update_parameters(other), Catch::Contains("'weight' has shape [2, 4]"));
  CHECK_THROWS_AS(swag.sample(other, rng, 1.0, true), polyak::InvalidArgument);
  CHECK(wide.isZero());
  CHECK(swag.n_collected() == 1);
  CHECK(swag.n_updates() == 1);
  (void)before;
}

TEST_CASE("SWAG::copy_to writes the mean into the parameters, as AveragedModel::copy_to does", "[swag]") {
  const auto xs = stream(4);
  SwagModel model;
  polyak::SWAG<double> swag(model.params, 2);
  polyak::AveragedModel<double> swa(model.params);
  for (const auto& x : xs) {
    model.set(x);
    swag.update_parameters(model.params);
    swa.update_parameters(model.params);
  }
  std::vector<double> mean, variance;
  moments(xs, xs.size(), mean, variance);
  SwagModel written;
  swag.copy_to(written.params);
  for (std::size_t j = 0; j < 10; ++j) CHECK(at(written.params, j) == Approx(mean[j]).epsilon(1e-14));
  CHECK(written.running_mean == Eigen::VectorXd::Constant(2, 7.0));  // buffers are not SWAG's
  SwagModel through_swa;
  swa.copy_to(through_swa.params);
  CHECK(written.weight == through_swa.weight);  // the same bits: the mean is the SWA average
  CHECK(written.bias == through_swa.bias);
  // Another model is refused, and nothing is written.
  Eigen::VectorXd other = Eigen::VectorXd::Zero(3);
  polyak::ParameterList<double> wrong;
  wrong.add("weight", other);
  CHECK_THROWS_AS(swag.copy_to(wrong), polyak::InvalidArgument);
  CHECK(other.isZero());
}
