// SPDX-License-Identifier: MIT
// The settings codec of the checkpoint layer: how an averaging rule's settings (EMA's decay, a
// schedule's parameters, a cadence) are written into a checkpoint's metadata and read back. Every
// number is written as the shortest text that reads back to the same double and read back with
// std::from_chars on the whole text; anything else (a missing key, "0.5abc", "1e999", a value the
// rule's constructor refuses) is a FormatError.
//
// RuleSettings<Fn> is specialized for polyak's rules. A user's rule gets the primary template,
// which uses the rule's own members where it has them,
//     void save_settings(std::map<std::string, std::string>&) const;
//     Fn load_settings(const std::map<std::string, std::string>&) const;   // or static
// and otherwise saves nothing and keeps the rule as constructed when a state is loaded.
#pragma once

#include <map>
#include <string>
#include <type_traits>
#include <utility>  // std::declval

#include "polyak/core/averaging_functions.hpp"
#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/ema_schedules.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/power_ema.hpp"

namespace polyak {

/// A checkpoint's string metadata.
using Metadata = std::map<std::string, std::string>;

namespace detail {

/// A setting written so that it reads back to the same double (its shortest such text).
inline std::string setting_text(double value) { return number_text(value); }

/// Whether two saved settings say the same: equal numbers (however written: "0.75" and
/// "0.75000000000000000" are one double), or else equal texts.
inline bool same_setting(const std::string& a, const std::string& b) {
  double x = 0, y = 0;
  if (parse_number(a, x) && parse_number(b, y)) return exactly_equal(x, y);
  return a == b;
}

/// The number saved under `key`; FormatError when it is missing or not a number written whole.
inline double setting_number(const Metadata& metadata, const std::string& key, const char* who) {
  const auto it = metadata.find(key);
  if (it == metadata.end()) throw FormatError(std::string(who) + ": the state has no setting '" + key + "'");
  double value = 0;
  if (!parse_number(it->second, value)) {
    throw FormatError(std::string(who) + ": setting '" + key + "' is not a number: '" + it->second + "'");
  }
  return value;
}

/// Refuses a state whose setting `key` is missing or other than `value` (saved by another averaging
/// function, or with another schedule).
inline void expect_setting(const Metadata& metadata, const std::string& key, const std::string& value,
                           const char* who) {
  const auto it = metadata.find(key);
  if (it == metadata.end() || it->second != value) {
    throw FormatError(std::string(who) + ": the state's " + key + " is '" +
                      (it == metadata.end() ? std::string("(none)") : it->second) + "', not '" + value + "'");
  }
}

/// Builds a rule from saved settings; one its constructor refuses is a FormatError.
template <class Make>
auto make_from_settings(const char* who, Make&& make) {
  try {
    return make();
  } catch (const std::invalid_argument& e) {
    throw FormatError(std::string(who) + ": bad settings in the state: " + e.what());
  }
}

template <class Fn, class = void>
struct has_settings_members : std::false_type {};
template <class Fn>
struct has_settings_members<
    Fn, std::void_t<decltype(std::declval<const Fn&>().save_settings(std::declval<Metadata&>()))>>
    : std::true_type {};

}  // namespace detail

/// A user's rule: its own save_settings / load_settings if it has them, else nothing is saved and
/// the rule is kept as constructed on load.
template <class Fn, class = void>
struct RuleSettings {
  /// Writes the rule's settings into `metadata`.
  static void save(const Fn& fn, Metadata& metadata) {
    if constexpr (detail::has_settings_members<Fn>::value) fn.save_settings(metadata);
  }
  /// The rule the settings describe; FormatError where they are missing or refused.
  static Fn load(const Fn& current, const Metadata& metadata) {
    if constexpr (detail::has_settings_members<Fn>::value) {
      return current.load_settings(metadata);
    } else {
      static_cast<void>(metadata);
      return current;
    }
  }
};

/// Writes `fn`'s settings into `metadata`.
template <class Fn>
void save_settings(const Fn& fn, Metadata& metadata) {
  RuleSettings<Fn>::save(fn, metadata);
}

/// The rule `metadata` describes; `current` supplies what the settings do not hold (a user's
/// schedule in a ScheduledEMA). FormatError when the settings are missing, malformed or refused.
template <class Fn>
Fn load_settings(const Fn& current, const Metadata& metadata) {
  return RuleSettings<Fn>::load(current, metadata);
}

/// How SWA's settings are saved and read back.
template <>
struct RuleSettings<SWA> {
  /// Writes the rule's settings into `metadata`.
  static void save(const SWA&, Metadata& metadata) { metadata["avg_fn"] = "swa"; }
  /// The rule the settings describe; FormatError where they are missing or refused.
  static SWA load(const SWA&, const Metadata& metadata) {
    const auto fn = metadata.find("avg_fn");
    if (fn != metadata.end() && fn->second != "swa") {
      throw FormatError("polyak::SWA: the state was saved by the averaging function '" + fn->second + "'");
    }
    return {};
  }
};

/// How EMA's settings are saved and read back.
template <>
struct RuleSettings<EMA> {
  /// Writes the rule's settings into `metadata`.
  static void save(const EMA& fn, Metadata& metadata) {
    metadata["avg_fn"] = "ema";
    metadata["decay"] = detail::setting_text(fn.decay());
  }
  /// The rule the settings describe; FormatError where they are missing or refused.
  static EMA load(const EMA&, const Metadata& metadata) {
    detail::expect_setting(metadata, "avg_fn", "ema", "polyak::EMA");
    return detail::make_from_settings(
        "polyak::EMA", [&] { return EMA{detail::setting_number(metadata, "decay", "polyak::EMA")}; });
  }
};

/// How ForEachTensor<Fn>'s settings are saved and read back.
template <class Fn>
struct RuleSettings<ForEachTensor<Fn>> {
  /// Writes the rule's settings into `metadata`.
  static void save(const ForEachTensor<Fn>& multi, Metadata& metadata) { save_settings(multi.fn, metadata); }
  /// The rule the settings describe; FormatError where they are missing or refused.
  static ForEachTensor<Fn> load(const ForEachTensor<Fn>& current, const Metadata& metadata) {
    return {load_settings(current.fn, metadata)};
  }
};

/// How WarmupDecay's settings are saved and read back.
template <>
struct RuleSettings<WarmupDecay> {
  /// Writes the rule's settings into `metadata`.
  static void save(const WarmupDecay& schedule, Metadata& metadata) {
    metadata["schedule"] = "warmup";
    metadata["decay"] = detail::setting_text(schedule.decay());
  }
  /// The rule the settings describe; FormatError where they are missing or refused.
  static WarmupDecay load(const WarmupDecay&, const Metadata& metadata) {
    const char* who = "polyak::WarmupDecay";
    detail::expect_setting(metadata, "schedule", "warmup", who);
    return detail::make_from_settings(
        who, [&] { return WarmupDecay{detail::setting_number(metadata, "decay", who)}; });
  }
};

/// How InverseGammaDecay's settings are saved and read back.
template <>
struct RuleSettings<InverseGammaDecay> {
  /// Writes the rule's settings into `metadata`.
  static void save(const InverseGammaDecay& schedule, Metadata& metadata) {
    metadata["schedule"] = "inverse_gamma";
    metadata["decay"] = detail::setting_text(schedule.decay());
    metadata["inv_gamma"] = detail::setting_text(schedule.inv_gamma());
    metadata["power"] = detail::setting_text(schedule.power());
    metadata["min_decay"] = detail::setting_text(schedule.min_decay());
  }
  /// The rule the settings describe; FormatError where they are missing or refused.
  static InverseGammaDecay load(const InverseGammaDecay&, const Metadata& metadata) {
    const char* who = "polyak::InverseGammaDecay";
    detail::expect_setting(metadata, "schedule", "inverse_gamma", who);
    return detail::make_from_settings(who, [&] {
      return InverseGammaDecay{
          detail::setting_number(metadata, "decay", who), detail::setting_number(metadata, "inv_gamma", who),
          detail::setting_number(metadata, "power", who), detail::setting_number(metadata, "min_decay", who)};
    });
  }
};

/// How ScheduledEMA<Schedule>'s settings are saved and read back.
template <class Schedule>
struct RuleSettings<ScheduledEMA<Schedule>> {
  /// Writes the rule's settings into `metadata`.
  static void save(const ScheduledEMA<Schedule>& fn, Metadata& metadata) {
    metadata["avg_fn"] = "scheduled_ema";
    metadata["update_after_step"] = std::to_string(fn.cadence().update_after_step);
    metadata["update_every"] = std::to_string(fn.cadence().update_every);
    metadata["compound"] = fn.cadence().compound ? "true" : "false";
    save_settings(fn.schedule(), metadata);
  }
  /// The rule the settings describe; FormatError where they are missing or refused.
  static ScheduledEMA<Schedule> load(const ScheduledEMA<Schedule>& current, const Metadata& metadata) {
    const char* who = "polyak::ScheduledEMA";
    detail::expect_setting(metadata, "avg_fn", "scheduled_ema", who);
    EmaCadence cadence;
    std::int64_t after = 0, every = 0;
    const auto compound = metadata.find("compound");
    const auto integer = [&](const char* key, std::int64_t& out) {
      const auto it = metadata.find(key);
      return it != metadata.end() && detail::parse_number(it->second, out);
    };
    if (!integer("update_after_step", after) || !integer("update_every", every) ||
        compound == metadata.end() || (compound->second != "true" && compound->second != "false")) {
      throw FormatError("polyak::ScheduledEMA: bad cadence settings in the state");
    }
    cadence.update_after_step = after;
    cadence.update_every = every;
    cadence.compound = compound->second == "true";
    return detail::make_from_settings(who, [&] {
      return ScheduledEMA<Schedule>{load_settings(current.schedule(), metadata), cadence};
    });
  }
};

/// How PowerEMA's settings are saved and read back.
template <>
struct RuleSettings<PowerEMA> {
  /// Writes the rule's settings into `metadata`.
  static void save(const PowerEMA& fn, Metadata& metadata) {
    metadata["avg_fn"] = "power_ema";
    metadata["gamma"] = detail::setting_text(fn.gamma());
    metadata["sigma_rel"] = detail::setting_text(fn.sigma_rel());  // for people reading the file
  }
  /// The rule the settings describe; FormatError where they are missing or refused.
  static PowerEMA load(const PowerEMA&, const Metadata& metadata) {
    detail::expect_setting(metadata, "avg_fn", "power_ema", "polyak::PowerEMA");
    return detail::make_from_settings("polyak::PowerEMA", [&] {
      return PowerEMA{detail::setting_number(metadata, "gamma", "polyak::PowerEMA")};
    });
  }
};

}  // namespace polyak
