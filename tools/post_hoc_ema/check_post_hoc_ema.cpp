// SPDX-License-Identifier: MIT
// Runs polyak-post-hoc-ema on snapshots of a trajectory whose power EMAs have closed forms, and checks it.
//
// The model has two tensors: "ramp", whose scalars are tau at step tau, and "flat", always 3. The
// discrete power EMA of tau at step t is sum_tau tau * ((tau/t)^(gamma+1) - ((tau-1)/t)^(gamma+1))
// = t - sum_{tau<t} (tau/t)^(gamma+1) (summing by parts); of a constant, that constant.
//   check_post_hoc_ema PATH_TO_post_hoc_ema WORK_FOLDER
#include <polyak/checkpoint/post_hoc_ema.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <sys/wait.h>  // WIFEXITED: std::system's status

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

  // Issue 12, item 5, and bad arguments: each refused with a message and a non-zero exit (2 for an
  // argument it cannot read, 1 for one it can but must refuse), nothing written. Before the fix, STEP
  // 1000 wrote the step-400 values labelled n_averaged 1000 (exit 0), STEP 1 and sigma_rel 1e-9 wrote
  // values the fit cannot stand behind, and OUT could overwrite a snapshot.
  std::filesystem::remove(out);
  const std::string snapshot = snapshots + "/power_ema_sigma0.1_step0000000400.safetensors";
  expect(std::filesystem::exists(snapshot), "the snapshot the next checks aim at exists");
  const auto snapshot_bytes = std::filesystem::file_size(snapshot);
  const auto snapshot_time = std::filesystem::last_write_time(snapshot);
  auto refused = [&](const std::string& args, int code, const std::string& why) {
    const int status = std::system((tool + " " + args + " 2>/dev/null >/dev/null").c_str());
    const int exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    expect(exit_code == code && !std::filesystem::exists(out), "refused, exit " + std::to_string(code) +
                                                                   ", nothing written: " + why + " (exit " +
                                                                   std::to_string(exit_code) + ")");
  };
  refused(snapshots + " 0.1 " + out + " 1000", 1, "STEP 1000, past the last snapshot (400)");
  refused(snapshots + " 0.1 " + out + " 1", 1, "STEP 1, before the first snapshot (50)");
  refused(snapshots + " 1e-9 " + out, 1, "sigma_rel 1e-9, which no fit of 0.05 and 0.10 represents");
  refused(snapshots + " 0.5 " + out, 2, "sigma_rel 0.5 (no power profile is that wide)");
  refused(snapshots + " nan " + out, 2, "sigma_rel nan");
  refused(snapshots + " -0 " + out, 2, "sigma_rel -0");
  refused(snapshots + " inf " + out, 2, "sigma_rel inf");
  refused(work + "/nothing_here 0.1 " + out, 1, "a missing folder");
  refused(snapshots + " 0.1 " + snapshot, 1, "OUT is one of the snapshots");
  expect(std::filesystem::file_size(snapshot) == snapshot_bytes &&
             std::filesystem::last_write_time(snapshot) == snapshot_time,
         "and that snapshot is untouched");
  refused(snapshots + " abc " + out, 2, "sigma_rel abc");
  refused(snapshots + " 0.1x " + out, 2, "sigma_rel 0.1x");
  refused(snapshots + " '' " + out, 2, "an empty sigma_rel");
  refused(snapshots + " 0.1 " + out + " 1.7", 2, "STEP 1.7");
  refused(snapshots + " 0.1 " + out + " 0", 2, "STEP 0");
  refused(snapshots + " 0.1 " + out + " -5", 2, "STEP -5");
  refused(snapshots + " 0.1 " + out + " 12x", 2, "STEP 12x");
  refused(snapshots + " 0.1 " + out + " 300 extra", 2, "one argument too many");
  refused(snapshots + " 0.1", 2, "no OUT");
  refused(snapshots + " 0.1 ''", 2, "an empty OUT, refused before any work");
  refused("--bogus " + snapshots + " 0.1 " + out, 2, "an unknown option");
  refused(snapshots + " 0.1 " + out + " --step=5", 2, "an unknown option after the arguments");
  expect(std::system((tool + " --help >/dev/null").c_str()) == 0 && !std::filesystem::exists(out),
         "--help prints the usage and writes nothing");
  std::filesystem::remove_all(work);
  return failures == 0 ? 0 : 1;
}
