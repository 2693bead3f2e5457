// SPDX-License-Identifier: MIT
// The order of a run's checkpoints, for the merges that depend on it (LAWA's last k, an EMA over
// the files): by the training step each records in its metadata ("step" or "global_step") where
// every one records one, else by the natural order of their paths ("ep2" before "ep10"), never by
// the order a shell's glob happened to list them in.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "polyak/checkpoint/detail/files.hpp"
#include "polyak/checkpoint/sharded_checkpoint.hpp"
#include "polyak/core/error.hpp"

namespace polyak {

/// Compares two paths in natural order: runs of digits as the numbers they write ("ep2" before
/// "ep10", "ep007" equal to "ep7"), everything else byte by byte. Returns < 0, 0 or > 0; 0 also for
/// two different spellings of the same numbers ("ep07", "ep7"), which order_checkpoints refuses.
inline int natural_compare(const std::string& a, const std::string& b) {
  const auto digit = [](char c) { return c >= '0' && c <= '9'; };
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (digit(a[i]) && digit(b[j])) {
      std::size_t ei = i, ej = j;
      while (ei < a.size() && digit(a[ei])) ++ei;
      while (ej < b.size() && digit(b[ej])) ++ej;
      while (i + 1 < ei && a[i] == '0') ++i;  // leading zeros do not count (a run of zeros is 0)
      while (j + 1 < ej && b[j] == '0') ++j;
      if (ei - i != ej - j) return ei - i < ej - j ? -1 : 1;  // more digits: a larger number
      for (; i < ei; ++i, ++j) {
        if (a[i] != b[j]) return a[i] < b[j] ? -1 : 1;
      }
      continue;
    }
    if (a[i] != b[j]) return static_cast<unsigned char>(a[i]) < static_cast<unsigned char>(b[j]) ? -1 : 1;
    ++i;
    ++j;
  }
  if (i < a.size()) return 1;
  if (j < b.size()) return -1;
  return 0;
}

/// The training step a checkpoint records in its metadata (a safetensors file's __metadata__, a
/// sharded checkpoint's index "metadata"): "step" or "global_step", a whole decimal number; none if
/// it records neither. A value that is not a whole number in [0, 2^64), or "step" and "global_step"
/// that disagree, is refused (InvalidArgument naming the file): a step that cannot be read never
/// falls back to another order.
inline std::optional<std::uint64_t> recorded_step(const CheckpointReader& checkpoint) {
  std::optional<std::uint64_t> step;
  for (const char* key : {"step", "global_step"}) {
    const auto found = checkpoint.metadata().find(key);
    if (found == checkpoint.metadata().end()) continue;
    const std::string& text = found->second;
    std::uint64_t value = 0;
    bool whole = !text.empty() && text.size() <= 20;
    for (const char c : text) {
      const auto d = static_cast<std::uint64_t>(c - '0');
      whole = whole && c >= '0' && c <= '9' && value <= (std::numeric_limits<std::uint64_t>::max() - d) / 10;
      if (!whole) break;
      value = value * 10 + d;
    }
    if (!whole) {
      throw InvalidArgument("polyak: checkpoint '" + checkpoint.path() + "' records " + key + " '" + text +
                            "', not a whole number");
    }
    if (step && *step != value) {
      throw InvalidArgument("polyak: checkpoint '" + checkpoint.path() + "' records step " +
                            std::to_string(*step) + " and global_step " + std::to_string(value));
    }
    step = value;
  }
  return step;
}

/// A run's checkpoints in training order, and what the order was taken from.
struct CheckpointOrder {
  std::vector<std::string> paths;    ///< the checkpoints, earliest first
  std::vector<std::uint64_t> steps;  ///< each one's recorded step (by_step), else empty
  bool by_step = false;              ///< ordered by recorded steps (true) or by natural name order
};

/// Orders checkpoints (safetensors files, sharded checkpoints' index files or folders) earliest
/// first: by their recorded_step where every one records one, else in natural_compare order of
/// their paths. Refused (InvalidArgument, naming them): no checkpoints; some recording a step and
/// others not; two recording the same step; two paths of the same natural position ("ep07" and
/// "ep7"); one checkpoint given twice (compared by identity, through links).
inline CheckpointOrder order_checkpoints(const std::vector<std::string>& paths) {
  if (paths.empty()) throw InvalidArgument("polyak::order_checkpoints: no checkpoints");
  const std::string who = "polyak::order_checkpoints: ";
  std::vector<std::pair<detail::FileId, std::string>> ids;
  std::vector<std::optional<std::uint64_t>> steps;
  for (const auto& path : paths) {
    const CheckpointReader checkpoint(path);
    steps.push_back(recorded_step(checkpoint));
    detail::FileId id;
    if (!detail::file_id(checkpoint.path(), id)) throw InvalidArgument(who + "cannot stat '" + path + "'");
    for (const auto& [other, other_path] : ids) {
      if (other == id)
        throw InvalidArgument(who + "'" + path + "' and '" + other_path + "' are one checkpoint");
    }
    ids.emplace_back(id, path);
  }
  const auto with = std::find_if(steps.begin(), steps.end(), [](const auto& s) { return s.has_value(); });
  const auto without = std::find_if(steps.begin(), steps.end(), [](const auto& s) { return !s.has_value(); });
  if (with != steps.end() && without != steps.end()) {
    throw InvalidArgument(
        who + "'" + paths[static_cast<std::size_t>(with - steps.begin())] + "' records its step and '" +
        paths[static_cast<std::size_t>(without - steps.begin())] + "' does not: their order is unknown");
  }
  std::vector<std::size_t> order(paths.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  CheckpointOrder result;
  result.by_step = with != steps.end();
  const auto compare = [&](std::size_t a, std::size_t b) {
    if (result.by_step) return *steps[a] < *steps[b] ? -1 : *steps[a] > *steps[b] ? 1 : 0;
    return natural_compare(paths[a], paths[b]);
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return compare(a, b) < 0; });
  for (std::size_t i = 0; i < order.size(); ++i) {
    if (i > 0 && compare(order[i - 1], order[i]) == 0) {
      throw InvalidArgument(who + "'" + paths[order[i - 1]] + "' and '" + paths[order[i]] + "' " +
                            (result.by_step ? "record the same step " + std::to_string(*steps[order[i]])
                                            : std::string("name the same position in natural order")) +
                            ": their order is unknown");
    }
    result.paths.push_back(paths[order[i]]);
    if (result.by_step) result.steps.push_back(*steps[order[i]]);
  }
  return result;
}

}  // namespace polyak
