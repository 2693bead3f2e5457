// SPDX-License-Identifier: MIT
// Runs post_hoc_ema on snapshots of a trajectory whose power EMAs have closed forms, and checks it.
//
// The model has two tensors: "ramp", whose scalars are tau at step tau, and "flat", always 3. The
// discrete power EMA of tau at step t is sum_tau tau * ((tau/t)^(gamma+1) - ((tau-1)/t)^(gamma+1))
// = t - sum_{tau<t} (tau/t)^(gamma+1) (summing by parts); of a constant, that constant.
//   check_post_hoc_ema PATH_TO_post_hoc_ema WORK_FOLDER
#include <polyak/post_hoc_ema.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace {

int failures = 0;
void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  failures += !ok;
}

double ramp_power_ema(std::int64_t t, double gamma) {
  double sum = 0;
  for (std::int64_t tau = 1; tau < t; ++tau) sum += std::pow(static_cast<double>(tau) / t, gamma + 1);
  return static_cast<double>(t) - sum;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  const std::string tool = argv[1], work = argv[2];
  std::filesystem::remove_all(work);
  const std::string snapshots = work + "/snapshots", out = work + "/out.safetensors";

  Eigen::VectorXf ramp(3), flat = Eigen::VectorXf::Constant(2, 3.0f);
  polyak::ParameterList<float> params;
  params.add("ramp", ramp);
  params.add("flat", flat);
  const std::int64_t steps = 400;
  {
    polyak::PostHocEMA<float> recorder(params, snapshots, 50);  // sigma_rel 0.05 and 0.10
    for (std::int64_t t = 1; t <= steps; ++t) {
      ramp.setConstant(static_cast<float>(t));
      recorder.update_parameters(params);
    }
  }
  auto run = [&](const std::string& args) { return std::system((tool + " " + args).c_str()); };
  auto first = [&](const char* name) {
    const auto sd = polyak::load_safetensors(out);
    return static_cast<double>(polyak::to_doubles(sd.at(std::string("module.") + name))[0]);
  };

  expect(run(snapshots + " 0.10 " + out) == 0, "sigma_rel 0.10 (a stored profile) runs");
  double expected = ramp_power_ema(steps, polyak::sigma_rel_to_gamma(0.10));
  std::printf("  ramp: %.4f, closed form %.4f\n", first("ramp"), expected);
  expect(std::abs(first("ramp") - expected) < 1e-5 * expected,
         "a stored profile: its closed form, to float rounding");
  expect(std::abs(first("flat") - 3.0) < 1e-5, "a constant stays that constant");
  expect(polyak::load_safetensors(out).scalar<std::int64_t>("n_averaged") == steps, "at the last step");

  // Between the stored widths, the fit's weights differ from the target's by ||dw||_1 of a few 1e-3
  // (tests/test_power_ema.cpp measures it), which moves a ramp's average by at most ||dw||_1 * t / 2.
  expect(run(snapshots + " 0.07 " + out + " 300") == 0, "sigma_rel 0.07 at step 300 runs");
  expected = ramp_power_ema(300, polyak::sigma_rel_to_gamma(0.07));
  std::printf("  ramp: %.4f, closed form %.4f\n", first("ramp"), expected);
  expect(std::abs(first("ramp") - expected) < 0.005 * 300 / 2,
         "an intermediate width, within the fit's bound");
  expect(std::abs(first("flat") - 3.0) < 1e-5, "a constant stays that constant");

  std::filesystem::remove(out);
  expect(run(snapshots + " 0.5 " + out + " 2>/dev/null") != 0,
         "sigma_rel 0.5 (no power profile is that wide) is refused");
  expect(run(work + "/nothing_here 0.1 " + out + " 2>/dev/null") != 0, "a missing folder is refused");
  expect(!std::filesystem::exists(out), "and no output is written");
  std::filesystem::remove_all(work);
  return failures == 0 ? 0 : 1;
}
