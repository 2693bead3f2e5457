// SPDX-License-Identifier: MIT
// post_hoc_ema: chooses the EMA length after training (EDM2's post-hoc EMA).
//
//   post_hoc_ema SNAPSHOT_FOLDER SIGMA_REL OUT [STEP]
//
// Reads the power-EMA snapshots polyak::PostHocEMA wrote to SNAPSHOT_FOLDER, reconstructs the
// power-function EMA of relative width SIGMA_REL at STEP (by default the last snapshot's) by the
// least-squares fit of polyak/post_hoc_ema.hpp, and writes it to OUT as the state of an
// AveragedModel<T, PowerEMA>: load it with load_state_dict, then copy_to the model. It streams, one
// tensor of every snapshot at a time. Snapshots that disagree, a width outside (0, 0.30], or a
// folder with no snapshots are refused, and nothing is written.
#include <polyak/post_hoc_ema.hpp>

#include <cstdio>
#include <exception>
#include <string>

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::fprintf(stderr, "usage: post_hoc_ema SNAPSHOT_FOLDER SIGMA_REL OUT [STEP]\n");
    return 2;
  }
  try {
    const std::string folder = argv[1], out = argv[3];
    std::size_t used = 0;
    const double sigma_rel = std::stod(argv[2], &used);
    if (used != std::string(argv[2]).size()) throw std::invalid_argument("SIGMA_REL is not a number");
    const long long step = argc == 5 ? std::stoll(argv[4]) : 0;
    if (argc == 5 && step < 1) throw std::invalid_argument("STEP must be at least 1");
    const double gamma = polyak::sigma_rel_to_gamma(sigma_rel);

    const auto snapshots = polyak::find_power_ema_snapshots(folder);
    if (snapshots.empty()) throw std::invalid_argument("no power EMA snapshots in '" + folder + "'");
    const polyak::StateDict sd = polyak::reconstruct_power_ema(snapshots, gamma, step);
    polyak::save_safetensors(out, sd);
    std::printf("post_hoc_ema: sigma_rel %g (gamma %.3f) at step %lld from %zu snapshots into %s\n",
                sigma_rel, gamma, static_cast<long long>(sd.scalar<std::int64_t>("n_averaged")),
                snapshots.size(), out.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "post_hoc_ema: %s; no output written\n", e.what());
    return 1;
  }
}
