// SPDX-License-Identifier: MIT
// Post-hoc EMA (polyak/checkpoint/post_hoc_ema.hpp): snapshots of power-function EMA profiles, and
// the EMA of another width reconstructed from them after training (EDM2, Karras et al. 2024).
#include "polyak/checkpoint/post_hoc_ema.hpp"

#include "support.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "polyak/checkpoint.hpp"
#include "polyak/core/averaged_model.hpp"
#include "power_ema_trajectory.hpp"

using polyak_test::Model;
using polyak_test::scalars;
using polyak_test::Trajectory;

TEST_CASE("post-hoc EMA reconstructs power EMAs from snapshots of two profiles", "[power_ema][post_hoc]") {
  const std::int64_t steps = 2000, every = 100;
  const Trajectory path(steps);
  const polyak_test::TemporaryFolder temporary("post_hoc");
  const std::string folder = temporary.path();
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

  const polyak_test::TemporaryFolder temporary("post_hoc_bad");
  const std::string folder = temporary.path();
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
  const polyak_test::TemporaryFolder temporary("post_hoc_recorder");
  const std::string folder = temporary.path();
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

// Issue 12, item 5: a STEP past the last snapshot gave the last snapshot's values labelled with that
// step; a STEP before the first, or a sigma_rel far outside the stored widths, gave values the fit
// cannot stand behind (8.48 where the truth is about 1; 102.9, above every value seen).
TEST_CASE("reconstruct_power_ema refuses a step outside the snapshots and a fit it cannot make",
          "[power_ema][post_hoc]") {
  const polyak_test::TemporaryFolder temporary("post_hoc_refusals");
  const std::string folder = temporary.path();
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
  const polyak_test::TemporaryFolder temporary("post_hoc_names");
  const std::string folder = temporary.path();
  Model model;
  polyak::PostHocEMA<double> recorder(model.params, folder, 5, {0.10001, 0.10002});
  for (int t = 0; t < 10; ++t) recorder.update_parameters(model.params);
  CHECK(recorder.snapshot_path(0, 5) != recorder.snapshot_path(1, 5));
  CHECK(polyak::find_power_ema_snapshots(folder).size() == 4);
  CHECK_THROWS_WITH(polyak::PostHocEMA<double>(model.params, folder + "/twice", 5, {0.1, 0.05, 0.1}),
                    Catch::Contains("sigma_rel 0.1 is given twice"));
  std::filesystem::remove_all(folder);
}
