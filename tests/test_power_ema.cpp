// SPDX-License-Identifier: MIT
// Power-function EMA and post-hoc EMA (EDM2), checked against the closed-form weights of the
// discrete power EMA, w_tau = (tau / t)^(gamma+1) - ((tau - 1) / t)^(gamma+1), applied directly to a
// stored synthetic trajectory.
#include "polyak/checkpoint.hpp"
#include "polyak/checkpoint/post_hoc_ema.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <vector>

#include "polyak/core/power_ema.hpp"
#include "test_types.hpp"

namespace {

constexpr int scalars = 24;

/// A noisy, drifting trajectory theta_1..theta_steps of `scalars` values, kept whole so that any
/// average of it can be computed directly.
struct Trajectory {
  std::vector<std::vector<double>> theta;  // theta[tau - 1][j]
  explicit Trajectory(int steps) {
    std::mt19937 rng(7);
    std::normal_distribution<double> noise(0.0, 0.3);
    for (int tau = 1; tau <= steps; ++tau) {
      std::vector<double> row(scalars);
      for (int j = 0; j < scalars; ++j) row[j] = std::sin(0.002 * tau * (j + 1)) + noise(rng);
      theta.push_back(row);
    }
  }
  /// The discrete power EMA weight of model tau at step t.
  static double weight(std::int64_t tau, std::int64_t t, double gamma) {
    const double td = static_cast<double>(t);
    return std::pow(static_cast<double>(tau) / td, gamma + 1) -
           std::pow(static_cast<double>(tau - 1) / td, gamma + 1);
  }
  /// sum_tau w_tau theta_tau for scalar j, computed directly.
  double power_ema(std::int64_t t, double gamma, int j) const {
    double sum = 0;
    for (std::int64_t tau = 1; tau <= t; ++tau)
      sum += weight(tau, t, gamma) * theta[static_cast<std::size_t>(tau - 1)][j];
    return sum;
  }
  /// Half the spread of scalar j over the first t models.
  double half_range(std::int64_t t, int j) const {
    double low = theta[0][j], high = theta[0][j];
    for (std::int64_t tau = 1; tau <= t; ++tau) {
      low = std::min(low, theta[static_cast<std::size_t>(tau - 1)][j]);
      high = std::max(high, theta[static_cast<std::size_t>(tau - 1)][j]);
    }
    return (high - low) / 2;
  }
};

/// A model of two tensors (a column-major matrix and a vector) holding `scalars` values.
struct Model {
  Eigen::MatrixXd weight = Eigen::MatrixXd::Zero(4, 5);
  Eigen::VectorXd bias = Eigen::VectorXd::Zero(scalars - 20);
  polyak::ParameterList<double> params;
  Model() {
    params.add("weight", weight);
    params.add("bias", bias);
  }
  void set(const std::vector<double>& values) {
    for (int j = 0; j < 20; ++j) weight.data()[j] = values[static_cast<std::size_t>(j)];
    for (int j = 20; j < scalars; ++j) bias[j - 20] = values[static_cast<std::size_t>(j)];
  }
  static double at(const polyak::ParameterList<double>& tensors, int j) {
    return j < 20 ? tensors[0].data()[j] : tensors[1].data()[j - 20];
  }
};

std::string fresh_folder(const std::string& name) {
  const auto folder = std::filesystem::temp_directory_path() / ("polyak_test_" + name);
  std::filesystem::remove_all(folder);
  return folder.string();
}

}  // namespace

TEST_CASE("sigma_rel and gamma convert both ways, as EDM2 tabulates", "[power_ema]") {
  // EDM2, section 3.1: sigma_rel 0.05 is gamma 16.97, 0.10 is gamma 6.94.
  CHECK(polyak::sigma_rel_to_gamma(0.05) == Approx(16.97).margin(0.005));
  CHECK(polyak::sigma_rel_to_gamma(0.10) == Approx(6.94).margin(0.005));
  for (const double sigma_rel : {0.01, 0.05, 0.08, 0.15, 0.25, 0.3}) {
    const double gamma = polyak::sigma_rel_to_gamma(sigma_rel);
    // A root of gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2), the cubic the relation is.
    const double c = 1 / (sigma_rel * sigma_rel);
    const double cubic = ((gamma + 7) * gamma + 16 - c) * gamma + 12 - c;
    CHECK(std::abs(cubic) < 1e-9 * c * std::max(1.0, gamma));
    CHECK(polyak::gamma_to_sigma_rel(gamma) == Approx(sigma_rel).epsilon(1e-13));
  }
  CHECK(polyak::max_sigma_rel() == Approx(0.3003).margin(1e-4));
  CHECK_THROWS_WITH(polyak::sigma_rel_to_gamma(0.31), Catch::Contains("sigma_rel 0.31"));
  CHECK_THROWS_AS(polyak::sigma_rel_to_gamma(0.0), std::invalid_argument);
  CHECK_THROWS_AS(polyak::sigma_rel_to_gamma(std::nan("")), std::invalid_argument);
  CHECK_THROWS_WITH(polyak::PowerEMA(-1.0), Catch::Contains("greater than -1"));
}

TEST_CASE("PowerEMA equals the direct weighted sum of the trajectory at every step", "[power_ema]") {
  const Trajectory path(300);
  for (const double gamma : {0.0, 6.94, 16.97}) {
    CAPTURE(gamma);
    Model model;
    model.set(path.theta[0]);
    polyak::AveragedModel<double, polyak::PowerEMA> ema(model.params, polyak::PowerEMA{gamma});
    double worst = 0;
    for (std::int64_t t = 1; t <= 300; ++t) {
      model.set(path.theta[static_cast<std::size_t>(t - 1)]);
      ema.update_parameters(model.params);
      for (int j = 0; j < scalars; j += 5) {
        const double expected = path.power_ema(t, gamma, j);
        worst = std::max(
            worst, std::abs(Model::at(ema.tensors(), j) - expected) / std::max(1.0, std::abs(expected)));
      }
    }
    CHECK(worst < 1e-12);
  }
  SECTION("gamma 0 is the running mean (SWA)") {
    const polyak::PowerEMA uniform(0.0);
    CHECK(uniform.decay(4) == Approx(0.75).epsilon(1e-15));
    CHECK(uniform.decay(1) == 0.0);
  }
}

TEST_CASE("post-hoc EMA reconstructs power EMAs from snapshots of two profiles", "[power_ema][post_hoc]") {
  const std::int64_t steps = 2000, every = 100;
  const Trajectory path(steps);
  const std::string folder = fresh_folder("post_hoc");
  Model model;
  model.set(path.theta[0]);
  polyak::PostHocEMA<double> recorder(model.params, folder, every);  // sigma_rel 0.05 and 0.10
  for (std::int64_t t = 1; t <= steps; ++t) {
    model.set(path.theta[static_cast<std::size_t>(t - 1)]);
    recorder.update_parameters(model.params);
  }
  const auto snapshots = polyak::find_power_ema_snapshots(folder);
  REQUIRE(snapshots.size() == 2 * steps / every);
  CHECK(snapshots.front().profile.step == every);
  CHECK(snapshots.back().profile.step == steps);

  std::vector<polyak::PowerEmaProfile> sources;
  for (const auto& s : snapshots) sources.push_back(s.profile);

  SECTION("a target equal to a stored profile gives back that profile's last snapshot") {
    const double gamma = polyak::sigma_rel_to_gamma(0.10);
    const auto weights = polyak::post_hoc_ema_weights(sources, {steps, gamma});
    const polyak::StateDict sd = polyak::reconstruct_power_ema(snapshots, gamma);
    double worst_weight = 0, worst = 0;
    for (std::size_t i = 0; i < sources.size(); ++i) {
      const bool same = sources[i].step == steps && sources[i].gamma == gamma;
      worst_weight = std::max(worst_weight, std::abs(weights[i] - (same ? 1.0 : 0.0)));
    }
    polyak::AveragedModel<double, polyak::PowerEMA> reconstructed(model.params, polyak::PowerEMA{gamma});
    reconstructed.load_state_dict(sd);
    CHECK(reconstructed.n_averaged() == steps);
    const auto& profile = recorder.profiles()[1];
    for (int j = 0; j < scalars; ++j)
      worst =
          std::max(worst, std::abs(Model::at(reconstructed.tensors(), j) - Model::at(profile.tensors(), j)));
    std::printf(
        "post-hoc, target = stored profile sigma_rel 0.10: largest weight error %.2e, value error %.2e\n",
        worst_weight, worst);
    // The solve is exact up to the Gram matrix's conditioning (40 profiles, some nearly parallel):
    // measured 1e-14 on the weights.
    CHECK(worst_weight < 1e-6);
    CHECK(worst < 1e-6);
  }

  SECTION("intermediate and outside targets match the direct power EMA within the profile-fit bound") {
    for (const double sigma_rel : {0.03, 0.07, 0.15}) {
      for (const std::int64_t t : {steps, std::int64_t{1500}}) {
        CAPTURE(sigma_rel, t);
        const double gamma = polyak::sigma_rel_to_gamma(sigma_rel);
        const auto weights = polyak::post_hoc_ema_weights(sources, {t, gamma});
        // The reconstruction's weight on each model tau, from the snapshots' exact discrete weights.
        double l1 = 0;
        for (std::int64_t tau = 1; tau <= t; ++tau) {
          double combined = 0;
          for (std::size_t i = 0; i < sources.size(); ++i) {
            if (tau <= sources[i].step)
              combined += weights[i] * Trajectory::weight(tau, sources[i].step, sources[i].gamma);
          }
          l1 += std::abs(combined - Trajectory::weight(tau, t, gamma));
        }
        for (std::size_t i = 0; i < sources.size(); ++i) {
          if (sources[i].step > t) CHECK(std::abs(weights[i]) < 1e-8);  // a later snapshot saw later models
        }
        const polyak::StateDict sd = polyak::reconstruct_power_ema(snapshots, gamma, t);
        polyak::AveragedModel<double, polyak::PowerEMA> reconstructed(model.params, polyak::PowerEMA{gamma});
        reconstructed.load_state_dict(sd);
        // Both weight vectors sum to 1, so their difference applied to theta is at most
        // ||dw||_1 * (half the spread of theta): a bound that holds for any trajectory.
        double worst = 0, worst_ratio = 0;
        for (int j = 0; j < scalars; ++j) {
          const double error = std::abs(Model::at(reconstructed.tensors(), j) - path.power_ema(t, gamma, j));
          const double bound = l1 * path.half_range(t, j) + 1e-12;
          CHECK(error <= bound);
          worst = std::max(worst, error);
          worst_ratio = std::max(worst_ratio, error / bound);
        }
        std::printf(
            "post-hoc, sigma_rel %.2f at step %lld: ||dw||_1 %.2e, largest error %.2e (%.0f%% of its "
            "bound)\n",
            sigma_rel, static_cast<long long>(t), l1, worst, 100 * worst_ratio);
        // Between and near the stored widths the profiles fit closely; 0.03, outside them, less so.
        CHECK(l1 < (sigma_rel < 0.05 ? 0.1 : 0.03));  // measured 0.044 and 0.011 at most
      }
    }
  }
  std::filesystem::remove_all(folder);
}

TEST_CASE("post-hoc EMA refuses what it cannot use", "[power_ema][post_hoc]") {
  CHECK_THROWS_WITH(polyak::post_hoc_ema_weights({}, {10, 1.0}), Catch::Contains("no source"));
  CHECK_THROWS_WITH(polyak::post_hoc_ema_weights({{10, 1.0}}, {0, 1.0}), Catch::Contains("step 0"));
  CHECK_THROWS_WITH(polyak::post_hoc_ema_weights({{10, -0.7}}, {10, 1.0}), Catch::Contains("gamma"));

  const std::string folder = fresh_folder("post_hoc_bad");
  Model model;
  polyak::PostHocEMA<double> recorder(model.params, folder, 2, {0.1});
  for (int i = 0; i < 4; ++i) recorder.update_parameters(model.params);
  // A snapshot of another model among them: refused, naming the tensor.
  Eigen::MatrixXd other = Eigen::MatrixXd::Zero(5, 4);
  Eigen::VectorXd bias = Eigen::VectorXd::Zero(scalars - 20);
  polyak::ParameterList<double> other_params;
  other_params.add("weight", other);
  other_params.add("bias", bias);
  polyak::PostHocEMA<double> stranger(other_params, folder + "/other", 1, {0.05});
  stranger.update_parameters(other_params);
  std::filesystem::copy_file(stranger.snapshot_path(0, 1), folder + "/zz.safetensors");
  auto snapshots = polyak::find_power_ema_snapshots(folder);
  REQUIRE(snapshots.size() == 3);
  CHECK_THROWS_WITH(polyak::reconstruct_power_ema(snapshots, 5.0),
                    Catch::Contains("'module.weight'") && Catch::Contains("[5, 4]"));
  // A truncated snapshot: FormatError naming the problem.
  std::filesystem::resize_file(folder + "/zz.safetensors", 20);
  CHECK_THROWS_AS(polyak::find_power_ema_snapshots(folder), polyak::FormatError);
  std::filesystem::remove_all(folder);
}

TEST_CASE("PostHocEMA writes its profiles' states every snapshot_every updates", "[power_ema][post_hoc]") {
  const std::string folder = fresh_folder("post_hoc_recorder");
  const Trajectory path(30);
  Model model;
  model.set(path.theta[0]);
  polyak::PostHocEMA<double> recorder(model.params, folder, 10);
  polyak::AveragedModel<double, polyak::PowerEMA> alone(model.params, polyak::PowerEMA::from_sigma_rel(0.10));
  polyak::StateDict at_20;
  for (std::int64_t t = 1; t <= 30; ++t) {
    model.set(path.theta[static_cast<std::size_t>(t - 1)]);
    recorder.update_parameters(model.params);
    alone.update_parameters(model.params);
    if (t == 20) at_20 = alone.state_dict().owned();  // (state_dict() borrows: later steps show)
  }
  std::size_t files = 0;
  for (const auto& item : std::filesystem::directory_iterator(folder)) files += item.is_regular_file();
  CHECK(files == 6);
  // A snapshot is exactly the profile's AveragedModel state at that step, column-major matrix included.
  const polyak::StateDict loaded = polyak::load_safetensors(recorder.snapshot_path(1, 20));
  REQUIRE(loaded.size() == at_20.size());
  for (const auto& [name, tensor] : at_20) {
    CAPTURE(name);
    CHECK(loaded.at(name).shape == tensor.shape);
    CHECK(loaded.at(name).bytes == tensor.bytes);
  }
  CHECK(loaded.metadata.at("avg_fn") == "power_ema");
  // A reconstruction saved among the snapshots is not taken for one.
  polyak::save_safetensors(folder + "/reconstructed.safetensors",
                           polyak::reconstruct_power_ema(polyak::find_power_ema_snapshots(folder), 5.0));
  CHECK(polyak::find_power_ema_snapshots(folder).size() == 6);

  SECTION("its state round-trips, and a state of other widths changes nothing") {
    polyak::PostHocEMA<double> resumed(model.params, folder + "/resumed", 10);
    resumed.load_state_dict(recorder.state_dict());
    CHECK(resumed.profiles()[0].n_averaged() == 30);
    polyak::PostHocEMA<double> narrow(model.params, folder + "/narrow", 10, {0.02, 0.10});
    CHECK_THROWS_WITH(narrow.load_state_dict(recorder.state_dict()), Catch::Contains("profile 0"));
    CHECK(narrow.profiles()[0].n_averaged() == 0);

    // Profile 0 fits, profile 1 is refused (negative n_averaged): profile 0 is put back as it was.
    // (Its copy must own its bytes: state_dict() borrows, and a borrowed copy put back nothing.)
    const polyak::StateDict good = recorder.state_dict();
    polyak::StateDict bad;
    bad.metadata = good.metadata;
    for (const auto& [name, tensor] : good) {
      if (name != "profile1.n_averaged") bad.insert(name, tensor);
    }
    bad.insert_scalar<std::int64_t>("profile1.n_averaged", -1);
    polyak::PostHocEMA<double> target(model.params, folder + "/target", 10);
    model.set(path.theta[0]);
    target.update_parameters(model.params);
    const std::vector<double> before(target.profiles()[0].tensors()[0].data(),
                                     target.profiles()[0].tensors()[0].data() + 4);
    CHECK_THROWS_WITH(target.load_state_dict(bad), Catch::Contains("n_averaged -1 is out of range"));
    CHECK(target.profiles()[0].n_averaged() == 1);
    CHECK(std::equal(before.begin(), before.end(), target.profiles()[0].tensors()[0].data()));
  }
  std::filesystem::remove_all(folder);
}

TEMPLATE_TEST_CASE("PowerEMA in every scalar type: the direct weighted sum, and a constant stays constant",
                   "[power_ema]", POLYAK_SCALAR_TYPES) {
  using Acc = polyak::accumulator_t<TestType>;
  using Vector = Eigen::Matrix<TestType, Eigen::Dynamic, 1>;
  const double gamma = polyak::sigma_rel_to_gamma(0.1);
  Vector w = Vector::Zero(8), c = Vector::Constant(8, TestType(0.3f));
  polyak::ParameterList<TestType> list;
  list.add("w", w).add("c", c);
  polyak::AveragedModel<TestType, polyak::PowerEMA> ema(list, polyak::PowerEMA{gamma});
  std::vector<std::vector<double>> seen;  // the values as the model held them, after rounding to T
  const std::int64_t steps = 60;
  for (std::int64_t t = 1; t <= steps; ++t) {
    std::vector<double> row;
    for (Eigen::Index j = 0; j < 8; ++j) {
      w[j] = TestType(static_cast<float>(std::cos(0.1 * static_cast<double>(t) + static_cast<double>(j))));
      row.push_back(static_cast<double>(w[j]));
    }
    seen.push_back(row);
    ema.update_parameters(list);
  }
  for (Eigen::Index j = 0; j < 8; ++j) {
    double expected = 0;
    for (std::int64_t tau = 1; tau <= steps; ++tau)
      expected += Trajectory::weight(tau, steps, gamma) *
                  seen[static_cast<std::size_t>(tau - 1)][static_cast<std::size_t>(j)];
    CHECK(polyak_test::close(static_cast<double>(ema.tensors()[0].data()[j]), expected,
                             64 * polyak_test::tolerance_v<Acc>));
    CHECK(ema.tensors()[1].data()[j] ==
          static_cast<Acc>(c[j]));  // exactly: each step is a lerp between equals
  }
}

// Issue 12, item 5: a STEP past the last snapshot gave the last snapshot's values labelled with that
// step; a STEP before the first, or a sigma_rel far outside the stored widths, gave values the fit
// cannot stand behind (8.48 where the truth is about 1; 102.9, above every value seen).
TEST_CASE("reconstruct_power_ema refuses a step outside the snapshots and a fit it cannot make",
          "[power_ema][post_hoc]") {
  const std::string folder = fresh_folder("post_hoc_refusals");
  const Trajectory path(200);
  Model model;
  polyak::PostHocEMA<double> recorder(model.params, folder, 20);  // sigma_rel 0.05, 0.10; steps 20..200
  for (std::int64_t t = 1; t <= 200; ++t) {
    model.set(path.theta[static_cast<std::size_t>(t - 1)]);
    recorder.update_parameters(model.params);
  }
  const auto snapshots = polyak::find_power_ema_snapshots(folder);
  REQUIRE(snapshots.size() == 20);
  const double gamma = polyak::sigma_rel_to_gamma(0.10);
  CHECK_THROWS_WITH(polyak::reconstruct_power_ema(snapshots, gamma, 1000),
                    Catch::Contains("step 1000 is past the last snapshot, at step 200"));
  CHECK_THROWS_WITH(polyak::reconstruct_power_ema(snapshots, gamma, 1),
                    Catch::Contains("step 1 is before the first snapshot, at step 20"));
  CHECK_THROWS_WITH(polyak::reconstruct_power_ema(snapshots, polyak::sigma_rel_to_gamma(1e-9)),
                    Catch::Contains("cannot represent") && Catch::Contains("relative error 100"));
  CHECK_THROWS_WITH(polyak::reconstruct_power_ema(snapshots, gamma, 150),  // between snapshots 140 and 160
                    Catch::Contains("cannot represent"));

  // What it accepts, it reports with the fit's error (the relative L2 distance of the profiles).
  const polyak::StateDict inside = polyak::reconstruct_power_ema(snapshots, polyak::sigma_rel_to_gamma(0.07));
  double error = -1;
  REQUIRE(polyak::detail::parse_number(inside.metadata.at("post_hoc_fit_error"), error));
  CHECK(error > 0);
  CHECK(error < 0.01);  // measured 2.5e-3 with snapshots every 100 steps to 2,000
  const auto stored =
      polyak::post_hoc_ema_fit({{200, polyak::sigma_rel_to_gamma(0.05)}, {200, gamma}}, {200, gamma});
  CHECK(stored.relative_error < 1e-6);  // a target that is a stored profile is represented exactly
  CHECK(std::abs(stored.weights[1] - 1.0) < 1e-6);
  std::filesystem::remove_all(folder);
}

// Issue 12, item 6: snapshot names were written with %.4f, so sigma_rels 0.10001 and 0.10002 shared
// one name and one profile overwrote the other.
TEST_CASE("PostHocEMA names each width's snapshots apart and refuses the same width twice",
          "[power_ema][post_hoc]") {
  const std::string folder = fresh_folder("post_hoc_names");
  Model model;
  polyak::PostHocEMA<double> recorder(model.params, folder, 5, {0.10001, 0.10002});
  for (int t = 0; t < 10; ++t) recorder.update_parameters(model.params);
  CHECK(recorder.snapshot_path(0, 5) != recorder.snapshot_path(1, 5));
  CHECK(polyak::find_power_ema_snapshots(folder).size() == 4);
  CHECK_THROWS_WITH(polyak::PostHocEMA<double>(model.params, folder + "/twice", 5, {0.1, 0.05, 0.1}),
                    Catch::Contains("sigma_rel 0.1 is given twice"));
  std::filesystem::remove_all(folder);
}
