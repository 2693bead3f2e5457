// SPDX-License-Identifier: MIT
// polyak-post-hoc-ema: chooses the EMA length after training (EDM2's post-hoc EMA).
//
//   polyak-post-hoc-ema SNAPSHOT_FOLDER SIGMA_REL OUT [STEP]
//
// Reads the power-EMA snapshots polyak::PostHocEMA wrote to SNAPSHOT_FOLDER, reconstructs the
// power-function EMA of relative width SIGMA_REL at STEP (by default the last snapshot's) by the
// least-squares fit of polyak/checkpoint/post_hoc_ema.hpp, and writes it to OUT as the state of an
// AveragedModel<T, PowerEMA>: load it with load_state_dict, then copy_to the model. It streams, one
// tensor of every snapshot at a time, and prints the fit's relative error, warning above 5% (see
// polyak::PostHocFit::relative_error for what it means). Refused, with nothing
// written: an argument it cannot read, a width outside (0, 0.30], a STEP outside the snapshots'
// steps, a fit worse than 25% (a width far from the stored ones, or a step between snapshots too far
// apart), OUT naming one of the snapshots, snapshots that disagree, a folder with none.
#include "../common/number.hpp"
#include <polyak/checkpoint/post_hoc_ema.hpp>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

namespace {

const char* const usage_text =
    "usage: polyak-post-hoc-ema SNAPSHOT_FOLDER SIGMA_REL OUT [STEP]\n"
    "  reconstructs the power EMA of width SIGMA_REL (0 < SIGMA_REL <= 0.30) at STEP (default: the\n"
    "  last snapshot's) from the snapshots polyak::PostHocEMA wrote, into OUT\n";

/// Above this fit error the result is written, with a warning that it is another average than the one
/// asked for (see polyak::PostHocFit::relative_error).
constexpr double warn_above = 0.05;

int usage(const std::string& problem) {
  std::fprintf(stderr, "polyak-post-hoc-ema: %s; no output written\n%s", problem.c_str(), usage_text);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(usage_text, stdout);
      return 0;
    }
  }
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] == '-' && argv[i][1] != 0 && !(argv[i][1] >= '0' && argv[i][1] <= '9') &&
        argv[i][1] != '.')
      return usage(std::string("unknown option '") + argv[i] + "'");
  }
  if (argc < 4 || argc > 5) return usage("needs 3 or 4 arguments");
  const std::string folder = argv[1], out = argv[3];
  if (out.empty()) return usage("OUT is the empty path");
  double sigma_rel = 0;
  if (!polyak_tools::parse_number(argv[2], sigma_rel) || !(sigma_rel > 0 && sigma_rel <= 0.30))
    return usage(std::string("SIGMA_REL '") + argv[2] + "' is not a number in (0, 0.30]");
  std::int64_t step = 0;
  if (argc == 5 && (!polyak_tools::parse_number(argv[4], step) || step < 1)) {
    return usage(std::string("STEP '") + argv[4] + "' is not a whole number >= 1");
  }
  try {
    const double gamma = polyak::sigma_rel_to_gamma(sigma_rel);
    const auto snapshots = polyak::find_power_ema_snapshots(folder);
    if (snapshots.empty()) throw std::invalid_argument("no power EMA snapshots in '" + folder + "'");
    std::vector<std::string> read;
    for (const auto& snapshot : snapshots) read.push_back(snapshot.path);
    polyak::check_output_apart(out, read);
    const polyak::StateDict sd = polyak::reconstruct_power_ema(snapshots, gamma, step);
    polyak::save_safetensors(out, sd);
    double fit_error = 0;
    polyak_tools::parse_number(sd.metadata.at("post_hoc_fit_error"), fit_error);
    std::printf(
        "polyak-post-hoc-ema: sigma_rel %s (gamma %.3f) at step %lld from %zu snapshots into %s (fit error "
        "%.2g%%)\n",
        argv[2], gamma, static_cast<long long>(sd.scalar<std::int64_t>("n_averaged")), snapshots.size(),
        out.c_str(), 100 * fit_error);
    if (fit_error > warn_above) {
      std::fprintf(
          stderr,
          "polyak-post-hoc-ema: warning: fit error %.2g%%: the weights this average gives the past steps "
          "lie %.2g%% (L2) from those of the EMA asked for, so it is a different average (under "
          "2%% it would be that EMA); ask for a step at a snapshot, or a width between the stored "
          "ones\n",
          100 * fit_error, 100 * fit_error);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "polyak-post-hoc-ema: %s; no output written\n", e.what());
    return 1;
  }
}
