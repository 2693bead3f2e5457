// SPDX-License-Identifier: MIT
// Post-hoc EMA (Karras et al., EDM2, CVPR 2024, section 3): choose the EMA length after training.
//
// During training, PostHocEMA keeps two power-function EMAs (power_ema.hpp) of different widths and
// every `snapshot_every` steps writes each to a safetensors file. Afterwards any power-function EMA,
// of any width sigma_rel and at any step up to the last snapshot, is approximated by a weighted sum
// of the snapshots: the weights minimise the L2 distance between the target's weight profile and the
// snapshots' combined profile,
//     min_x || sum_i x_i p_i - p_target ||^2,    p_(t, gamma)(tau) = (gamma + 1) tau^gamma / t^(gamma+1)
// on 0 <= tau <= t, a linear system in the profiles' inner products (closed form below), and are
// then scaled to sum to 1 (as EDM2 does). The discrete power EMA's weights are exactly these profiles
// integrated over unit steps, so the fit is close once steps number in the tens.
//
//     polyak::PostHocEMA<float> post_hoc(params, "snapshots", /*snapshot_every=*/1000);
//     for (...) { optimizer_step(); post_hoc.update_parameters(params); }
//     ...
//     const auto snapshots = polyak::find_power_ema_snapshots("snapshots");
//     polyak::StateDict sd = polyak::reconstruct_power_ema(snapshots, polyak::sigma_rel_to_gamma(0.08));
//     // sd is an AveragedModel<float, PowerEMA> state: load_state_dict, then copy_to the model.
#pragma once

#include <algorithm>  // std::sort, std::max
#include <cmath>      // std::pow
#include <cstdint>    // std::int64_t
#include <cstdio>     // std::snprintf
#include <cstring>    // std::memcpy
#include <filesystem>
#include <fstream>
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <utility>  // std::move
#include <vector>

#include <Eigen/QR>  // ColPivHouseholderQR

#include "polyak/core/error.hpp"
#include "polyak/core/averaged_model.hpp"
#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/detail/tensor_spec.hpp"
#include "polyak/core/power_ema.hpp"
#include "polyak/checkpoint/rule_settings.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/checkpoint/state_io.hpp"

namespace polyak {

/// A power-function EMA at one moment: the step it has reached (its n_averaged) and its exponent.
struct PowerEmaProfile {
  std::int64_t step;  ///< the step it has reached (its n_averaged)
  double gamma;       ///< its exponent
};

namespace detail {

/// The inner product of two continuous power-function profiles, integral over tau of p_a * p_b:
///     (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * min(t_a, t_b)^(gamma_a + gamma_b + 1)
///       / (t_a^(gamma_a + 1) t_b^(gamma_b + 1)),
/// written with the ratio of the steps so that no power overflows.
inline double profile_inner_product(const PowerEmaProfile& a, const PowerEmaProfile& b) {
  const double ta = static_cast<double>(a.step), tb = static_cast<double>(b.step);
  const double scale = (a.gamma + 1) * (b.gamma + 1) / (a.gamma + b.gamma + 1);
  return ta <= tb ? scale * std::pow(ta / tb, b.gamma) / tb : scale * std::pow(tb / ta, a.gamma) / ta;
}

inline void check_profile(const PowerEmaProfile& p, const char* role) {
  if (p.step < 1 || !(p.gamma > -0.5) || !std::isfinite(p.gamma)) {
    throw InvalidArgument(std::string("polyak::post_hoc_ema_fit: ") + role + " step " +
                          std::to_string(p.step) + ", gamma " + detail::number_text(p.gamma) +
                          ": needs step >= 1 and a finite gamma > -1/2");
  }
}

/// The n_averaged a power EMA snapshot holds; FormatError when it holds none >= 1.
inline std::int64_t snapshot_step(SafetensorsReader& reader) {
  std::int64_t step = -1;
  for (const auto& entry : reader.header().entries) {
    if (entry.name == detail::AveragedModelKeys::n_averaged && entry.dtype == DType::I64 &&
        entry.shape.empty()) {
      const StoredTensor t = reader.read(entry);
      std::memcpy(&step, t.bytes.data(), sizeof step);
    }
  }
  if (step < 1)
    throw FormatError("polyak: power EMA snapshot '" + reader.path() + "' has no n_averaged >= 1");
  return step;
}

}  // namespace detail

/// A fit of one power-EMA profile by others: the weights (summing to 1) and how far the combined
/// profile is from the target, as the relative L2 distance ||sum_i x_i p_i - p_target|| / ||p_target||
/// (0: exact; 1: no better than nothing).
struct PostHocFit {
  std::vector<double> weights;  ///< one a source profile, summing to 1
  /// || sum_i x_i p_i - p_target || / || p_target ||: how far the weights the reconstruction gives
  /// the past iterates lie from those of the EMA asked for, relative to them (L2 over the steps).
  /// The reconstructed model is the iterates averaged with those weights, so it differs from the
  /// asked-for EMA by at most this fraction of the weight profile times the iterates' spread: under
  /// about 2% (a width between the stored ones, at a snapshot's step) it is that EMA for practical
  /// purposes; at 5-10% (a step between two snapshots, a width outside the stored ones) it is a
  /// different average, still a smooth one, whose effective width and end point differ from those
  /// asked for; past 25% reconstruct_power_ema refuses it by default.
  double relative_error = 0;
};

/// The weights x of the `sources` profiles whose combination best approximates `target` in L2: the
/// solution of A x = b, A_ij = (p_i . p_j), b_i = (p_i . p_target), by a column-pivoting QR, then scaled
/// to sum 1 (as EDM2 does), with the fit's relative error computed from the same inner products.
/// Every profile needs step >= 1 and gamma > -1/2 (where the inner products are finite).
/// (A template, of the argument type it names, so that its code is compiled only where it is called: a
/// unit that includes the checkpoint layer does not pay for Eigen's QR it never uses.)
template <class Sources = std::vector<PowerEmaProfile>>
PostHocFit post_hoc_ema_fit(const Sources& sources, const PowerEmaProfile& target) {
  if (sources.empty()) throw InvalidArgument("polyak::post_hoc_ema_fit: no source profiles");
  for (const auto& p : sources) detail::check_profile(p, "a source profile at");
  detail::check_profile(target, "the target at");
  const auto n = static_cast<Eigen::Index>(sources.size());
  Eigen::MatrixXd gram(n, n);
  Eigen::VectorXd toward(n);
  for (Eigen::Index i = 0; i < n; ++i) {
    const auto& pi = sources[static_cast<std::size_t>(i)];
    for (Eigen::Index j = 0; j < n; ++j) {
      gram(i, j) = detail::profile_inner_product(pi, sources[static_cast<std::size_t>(j)]);
    }
    toward(i) = detail::profile_inner_product(pi, target);
  }
  Eigen::VectorXd x = gram.colPivHouseholderQr().solve(toward);
  const double sum = x.sum();
  if (!(std::abs(sum) > 0) || !x.allFinite()) {
    throw InvalidArgument("polyak::post_hoc_ema_fit: the snapshots cannot represent the target");
  }
  x /= sum;
  // ||sum x_i p_i - p_t||^2 = x'Ax - 2 x'b + <p_t, p_t>
  const double norm2 = detail::profile_inner_product(target, target);
  const double distance2 = x.dot(gram * x) - 2 * x.dot(toward) + norm2;
  PostHocFit fit;
  fit.weights.assign(x.data(), x.data() + n);
  fit.relative_error = std::sqrt(std::max(0.0, distance2) / norm2);
  return fit;
}

/// post_hoc_ema_fit's weights alone.
/// (A template, of the argument type it names, so that its code is compiled only where it is called: a
/// unit that includes the checkpoint layer does not pay for Eigen's QR it never uses.)
template <class Sources = std::vector<PowerEmaProfile>>
std::vector<double> post_hoc_ema_weights(const Sources& sources, const PowerEmaProfile& target) {
  return post_hoc_ema_fit(sources, target).weights;
}

/// One snapshot file: where it is, its checked header, and the profile it holds.
struct PowerEmaSnapshot {
  std::string path;          ///< the file
  SafetensorsHeader header;  ///< its header, as read when it was found
  PowerEmaProfile profile;   ///< the profile it holds
};

/// Reads the header (and n_averaged) of every *.safetensors file in `folder` that holds a PowerEMA
/// AveragedModel state, sorted by step, then gamma. Files of other kinds, and reconstructions
/// (reconstruct_power_ema's output) are skipped; a snapshot that cannot be read is a FormatError.
/// (A template, of the argument type it names, so that its code is compiled only where it is called: a
/// unit that includes the checkpoint layer does not pay for Eigen's QR it never uses.)
template <class Folder = std::string>
std::vector<PowerEmaSnapshot> find_power_ema_snapshots(const Folder& folder) {
  std::vector<PowerEmaSnapshot> found;
  std::error_code error;
  std::filesystem::directory_iterator items(folder, error);
  if (error) {
    throw InvalidArgument("polyak::find_power_ema_snapshots: cannot read the folder '" + folder +
                          "': " + error.message());
  }
  for (const auto& item : items) {
    if (!item.is_regular_file() || item.path().extension() != ".safetensors") continue;
    const std::string path = item.path().string();
    SafetensorsReader reader(path);
    const auto fn = reader.header().metadata.find("avg_fn");
    if (fn == reader.header().metadata.end() || fn->second != "power_ema") continue;
    if (reader.header().metadata.count("post_hoc_snapshots") != 0)
      continue;  // a reconstruction written there
    const PowerEMA ema = load_settings(PowerEMA{0.0}, reader.header().metadata);
    const std::int64_t step = detail::snapshot_step(reader);
    SafetensorsHeader index = reader.header();
    found.push_back({path, std::move(index), {step, ema.gamma()}});
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) {
    return a.profile.step != b.profile.step ? a.profile.step < b.profile.step
                                            : a.profile.gamma < b.profile.gamma;
  });
  return found;
}

/// The power EMA with exponent `gamma` at `step` (by default the last snapshot's), reconstructed as
/// post_hoc_ema_fit's combination of `snapshots`, computed in double and rounded once to each
/// tensor's dtype. Returned as the state of an AveragedModel<T, PowerEMA{gamma}> at that step, for
/// load_state_dict, with the fit's relative error in the metadata ("post_hoc_fit_error"). It streams:
/// one tensor of every snapshot at a time, each snapshot read from the file it opened (one open file
/// a snapshot; a snapshot that changed since find_power_ema_snapshots read it is refused).
///
/// Refused (std::invalid_argument), since the snapshots cannot stand behind the result: a step past
/// the last snapshot (what came after it is unknown) or before the first, and a fit whose relative
/// error exceeds `max_fit_error` (a width far outside the stored ones, or a step between snapshots
/// too far apart for the width). With snapshots every 100 steps of widths 0.05 and 0.10, widths 0.03
/// to 0.28 at a snapshot's step fit within 0.2; a width of 0.01, or a step half-way between two
/// snapshots, does not. Snapshots that differ in tensor names, dtypes or shapes are a FormatError
/// naming the first difference.
/// (A template, of the argument type it names, so that its code is compiled only where it is called: a
/// unit that includes the checkpoint layer does not pay for Eigen's QR it never uses.)
template <class Snapshots = std::vector<PowerEmaSnapshot>>
StateDict reconstruct_power_ema(const Snapshots& snapshots, double gamma, std::int64_t step = 0,
                                double max_fit_error = 0.25) {
  if (snapshots.empty()) throw InvalidArgument("polyak::reconstruct_power_ema: no snapshots");
  std::int64_t first_step = snapshots.front().profile.step, last_step = first_step;
  for (const auto& s : snapshots) {
    first_step = std::min(first_step, s.profile.step);
    last_step = std::max(last_step, s.profile.step);
  }
  if (step == 0) step = last_step;
  if (step > last_step) {
    throw InvalidArgument("polyak::reconstruct_power_ema: step " + std::to_string(step) +
                          " is past the last snapshot, at step " + std::to_string(last_step) +
                          ": the models after it were never seen");
  }
  if (step < first_step) {
    throw InvalidArgument("polyak::reconstruct_power_ema: step " + std::to_string(step) +
                          " is before the first snapshot, at step " + std::to_string(first_step));
  }
  std::vector<PowerEmaProfile> sources;
  for (const auto& s : snapshots) sources.push_back(s.profile);
  const PostHocFit fit = post_hoc_ema_fit(sources, {step, gamma});
  if (!(fit.relative_error <= max_fit_error)) {
    char percents[64];
    std::snprintf(percents, sizeof percents, "%.0f%% (L2), above the %.0f%% allowed",
                  100 * fit.relative_error, 100 * max_fit_error);
    throw InvalidArgument(
        "polyak::reconstruct_power_ema: the snapshots cannot represent the power EMA of sigma_rel " +
        detail::number_text(gamma_to_sigma_rel(gamma)) + " (gamma " + detail::number_text(gamma) +
        ") at step " + std::to_string(step) + ": the fitted weight profile has a relative error " + percents +
        "; ask for a width near the stored ones, or a step at a snapshot");
  }
  const std::vector<double>& weights = fit.weights;

  const auto& first = snapshots.front();
  const auto spec = [](const SafetensorsHeader& index) {
    return [&index](std::size_t i) {
      const auto& e = index.entries[i];
      return detail::TensorSpec{
          e.name, e.shape.data(), e.shape.size(), StorageOrder::RowMajor, dtype_name(e.dtype), {}};
    };
  };
  for (const auto& s : snapshots) {
    const std::string problem =
        detail::first_mismatch(s.header.entries.size(), spec(s.header), "'" + s.path + "'",
                               first.header.entries.size(), spec(first.header), "'" + first.path + "'");
    if (!problem.empty()) throw FormatError("polyak::reconstruct_power_ema: " + problem);
  }

  // Every snapshot stays open while it streams: each is read from the file found above, never from
  // one a later save put in its place (refused: it changed since it was found).
  std::vector<SafetensorsReader> readers;
  for (const auto& s : snapshots) {
    readers.emplace_back(s.path);
    if (readers.back().header() != s.header || detail::snapshot_step(readers.back()) != s.profile.step) {
      throw FormatError("polyak::reconstruct_power_ema: '" + s.path + "' changed since it was found");
    }
  }

  StateDict result;
  result.metadata = first.header.metadata;
  save_settings(PowerEMA{gamma}, result.metadata);
  result.metadata["post_hoc_snapshots"] = std::to_string(snapshots.size());
  result.metadata["post_hoc_fit_error"] = detail::number_text(fit.relative_error);
  // Tensors in the order the files name them (data order is the order they were written in).
  for (std::size_t k = 0; k < first.header.entries.size(); ++k) {
    const auto& entry = first.header.entries[k];
    if (entry.name == detail::AveragedModelKeys::n_averaged) continue;
    StoredTensor combined{entry.dtype, entry.shape, {}};
    std::vector<double> sum(combined.numel(), 0.0);
    for (std::size_t i = 0; i < snapshots.size(); ++i) {
      detail::for_each_double(readers[i].read(readers[i].header().entries[k]),
                              [&](std::size_t e, double value) { sum[e] += weights[i] * value; });
    }
    detail::assign_doubles(combined, sum);
    result.insert(entry.name, std::move(combined));
  }
  result.insert_scalar<std::int64_t>(detail::AveragedModelKeys::n_averaged, step);
  return result;
}

/// What both PostHocEMAs are (polyak::PostHocEMA over views, libtorch::PostHocEMA over a module):
/// `Profile` is an averaged model of PowerEMA that
/// update_parameters(const Model&) folds in (polyak::AveragedModel over views, or
/// libtorch::AveragedModel over a module), with state_dict() / load_state_dict().
template <class Profile, class Model>
class PowerEmaRecorder {
 public:
  /// Folds `model` into every profile; after every snapshot_every-th update, writes the snapshots.
  void update_parameters(const Model& model) {
    for (auto& profile : profiles_) profile.update_parameters(model);
    if (profiles_.front().n_averaged() % snapshot_every_ == 0) save_snapshots();
  }

  /// Writes every profile's snapshot now (at the end of training, say).
  void save_snapshots() const {
    for (std::size_t i = 0; i < profiles_.size(); ++i) {
      const Profile& profile = profiles_[i];
      save_safetensors(snapshot_path(i, profile.n_averaged()), profile.state_dict());  // streamed: it borrows
    }
  }

  /// Where profile `profile`'s snapshot at `step` is written (see PostHocEMA).
  std::string snapshot_path(std::size_t profile, std::int64_t step) const {
    char number[24];
    std::snprintf(number, sizeof number, "%010lld", static_cast<long long>(step));
    return folder_ + "/power_ema_sigma" + detail::number_text(sigma_rels_.at(profile)) + "_step" + number +
           ".safetensors";
  }

  /// The profiles, one a width, in the order given.
  const std::vector<Profile>& profiles() const noexcept { return profiles_; }
  /// The folder the snapshots go to.
  const std::string& folder() const noexcept { return folder_; }

  /// Every profile's state, as "profile<i>.<name>", to resume training.
  StateDict state_dict() const {
    StateDict sd;
    for (std::size_t i = 0; i < profiles_.size(); ++i)
      sd.merge("profile" + std::to_string(i) + ".", profiles_[i].state_dict());
    return sd;
  }
  /// Restores a state_dict(). A state any profile refuses (see AveragedModel::load_state_dict), or
  /// whose profiles have other widths, changes nothing: profiles loaded before the refusal are put
  /// back from a copy taken first.
  void load_state_dict(const StateDict& sd) {
    std::vector<StateDict> parts, before;
    for (std::size_t i = 0; i < profiles_.size(); ++i) {
      parts.push_back(sd.extract("profile" + std::to_string(i) + "."));
      if (load_settings(PowerEMA{0.0}, parts.back().metadata).gamma() != profiles_[i].avg_fn().gamma()) {
        throw FormatError("polyak::PostHocEMA::load_state_dict: profile " + std::to_string(i) +
                          " was saved with another sigma_rel");
      }
    }
    if (sd.size() != [&] {
          std::size_t n = 0;
          for (const auto& part : parts) n += part.size();
          return n;
        }()) {
      throw FormatError("polyak::PostHocEMA::load_state_dict: the state holds entries of no profile");
    }
    for (const auto& profile : profiles_) before.push_back(profile.state_dict().owned());  // (it borrows)
    std::size_t loaded = 0;
    try {
      for (; loaded < profiles_.size(); ++loaded) profiles_[loaded].load_state_dict(parts[loaded]);
    } catch (...) {
      for (std::size_t i = 0; i < loaded; ++i) profiles_[i].load_state_dict(before[i]);
      throw;
    }
  }

 protected:
  /// Checks the settings and makes one profile a width with make(PowerEMA).
  template <class MakeProfile>
  PowerEmaRecorder(std::string folder, std::int64_t snapshot_every, const std::vector<double>& sigma_rels,
                   MakeProfile&& make)
      : folder_(std::move(folder)), snapshot_every_(snapshot_every), sigma_rels_(sigma_rels) {
    if (snapshot_every < 1) throw InvalidArgument("polyak::PostHocEMA: snapshot_every < 1");
    if (sigma_rels.empty()) throw InvalidArgument("polyak::PostHocEMA: no profiles");
    profiles_.reserve(sigma_rels.size());
    for (std::size_t i = 0; i < sigma_rels.size(); ++i) {
      const PowerEMA profile = PowerEMA::from_sigma_rel(sigma_rels[i]);
      for (std::size_t j = 0; j < i; ++j) {
        if (detail::exactly_equal(profiles_[j].avg_fn().gamma(), profile.gamma())) {
          throw InvalidArgument("polyak::PostHocEMA: sigma_rel " + detail::number_text(sigma_rels[i]) +
                                (detail::exactly_equal(sigma_rels[j], sigma_rels[i])
                                     ? std::string(" is given twice")
                                     : " gives the same profile as " + detail::number_text(sigma_rels[j])));
        }
      }
      profiles_.push_back(make(profile));
    }
    std::filesystem::create_directories(folder_);
  }

  std::string folder_;              ///< where the snapshots go
  std::int64_t snapshot_every_;     ///< updates between snapshots
  std::vector<double> sigma_rels_;  ///< as given: the snapshots' names
  std::vector<Profile> profiles_;   ///< one a width
};

/// Keeps power-function EMA profiles of a model during training (by default EDM2's two, sigma_rel
/// 0.05 and 0.10) and writes each to `folder` every `snapshot_every` updates, as
/// "FOLDER/power_ema_sigmaSIGMA_stepN.safetensors" holding that profile's AveragedModel state
/// (N zero-padded to 10 digits), SIGMA written as the shortest text that reads back to the width given (so
/// distinct widths never share a name). A width given twice, or two that give the same profile, are refused.
/// Memory: one averaged copy a profile; snapshots stream from it to disk. (For a libtorch module on
/// its device: polyak::libtorch::PostHocEMA, in polyak/torch/checkpoint.hpp.)
template <class T>
class PostHocEMA : public PowerEmaRecorder<AveragedModel<T, PowerEMA>, ParameterList<T>> {
  using Base = PowerEmaRecorder<AveragedModel<T, PowerEMA>, ParameterList<T>>;

 public:
  /// One profile: an averaged model of the power EMA.
  using Profile = AveragedModel<T, PowerEMA>;

  /// Keeps a profile of `model` for each of `sigma_rels`, and snapshots them into `folder` every
  /// `snapshot_every` updates.
  PostHocEMA(const ParameterList<T>& model, std::string folder, std::int64_t snapshot_every,
             const std::vector<double>& sigma_rels = {0.05, 0.10})
      : Base(std::move(folder), snapshot_every, sigma_rels,
             [&](const PowerEMA& profile) { return Profile(model, profile); }) {}

  /// Spreads the profiles' updates over `pool` (see AveragedModel::set_thread_pool).
  void set_thread_pool(ThreadPool* pool) noexcept {
    for (auto& profile : this->profiles_) profile.set_thread_pool(pool);
  }
};

}  // namespace polyak
