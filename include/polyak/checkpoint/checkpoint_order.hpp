// SPDX-License-Identifier: MIT
// The order of a run's checkpoints, for the merges that depend on it (LAWA's last k, an EMA over
// the files): by the training step each records in its metadata ("step" or "global_step") where
// every one records one, else by the natural order of their paths ("ep2" before "ep10"), never by
// the order a shell's glob happened to list them in.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
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

namespace detail {

/// `text` with every byte outside printable ASCII (and the backslash) written as backslash, x, two
/// hex digits, for messages and listings: a NUL
/// or a newline in a name or a value cannot cut a message short or split a listing.
inline std::string visible(const std::string& text) {
  std::string out;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte >= 0x20 && byte < 0x7f && c != '\\') {
      out += c;
    } else {
      static const char digits[] = "0123456789abcdef";
      out += "\\x";
      out += digits[byte >> 4];
      out += digits[byte & 15];
    }
  }
  return out;
}

/// What natural order compares for a checkpoint's path: absolute and normalized (so that "./ep10",
/// "/runs/ep10" and "ep10" compare alike), a folder's trailing "/", an index's
/// "/model.safetensors.index.json" and a file's ".safetensors" removed (so that "ep2" comes before
/// "ep2.5", and a folder and its index are one position).
inline std::string order_key(const std::string& path) {
  namespace fs = std::filesystem;
  std::string key = fs::absolute(fs::path(path)).lexically_normal().string();
  const auto strip = [&key](const std::string& end) {
    if (key.size() > end.size() && key.compare(key.size() - end.size(), end.size(), end) == 0) {
      key.erase(key.size() - end.size());
      return true;
    }
    return false;
  };
  while (key.size() > 1 && key.back() == '/') key.pop_back();
  if (!strip(std::string("/") + sharded_index_name)) strip(".safetensors");
  return key;
}

}  // namespace detail

/// The training step a checkpoint records in its metadata ("step" or "global_step", a whole decimal
/// number): a safetensors file's __metadata__, or a sharded checkpoint's index "metadata" and its
/// shards' __metadata__; none if it records neither anywhere. Refused (InvalidArgument naming the
/// file): a value that is not a whole number in [0, 2^64) (a negative, a fraction, null, an object),
/// and two records that disagree (step and global_step, the index and a shard, two shards). A step
/// that cannot be read never falls back to another order.
inline std::optional<std::uint64_t> recorded_step(const CheckpointReader& checkpoint) {
  std::optional<std::uint64_t> step;
  std::string first_where;
  const auto take = [&](const std::map<std::string, std::string>& metadata, const std::string& where) {
    for (const char* key : {"step", "global_step"}) {
      const auto found = metadata.find(key);
      if (found == metadata.end()) continue;
      const std::string& text = found->second;
      std::uint64_t value = 0;
      bool whole = !text.empty() && text.size() <= 20;
      for (const char c : text) {
        const auto d = static_cast<std::uint64_t>(c - '0');
        whole =
            whole && c >= '0' && c <= '9' && value <= (std::numeric_limits<std::uint64_t>::max() - d) / 10;
        if (!whole) break;
        value = value * 10 + d;
      }
      const std::string here = where + " " + key;
      if (!whole) {
        throw InvalidArgument("polyak: checkpoint '" + detail::visible(checkpoint.path()) + "': " + here +
                              " '" + detail::visible(text) + "' is not a whole number");
      }
      if (step && *step != value) {
        throw InvalidArgument("polyak: checkpoint '" + detail::visible(checkpoint.path()) + "' records " +
                              first_where + " " + std::to_string(*step) + " and " + here + " " +
                              std::to_string(value));
      }
      if (!step) first_where = here;
      step = value;
    }
  };
  take(checkpoint.metadata(), checkpoint.sharded() ? "its index's" : "its");
  if (checkpoint.sharded()) {
    for (std::size_t shard = 0; shard < checkpoint.shards().size(); ++shard)
      take(checkpoint.shard_metadata(shard),
           "its shard " + detail::visible(checkpoint.shards()[shard]) + "'s");
  }
  return step;
}

/// A run's checkpoints in training order, opened, and what the order was taken from.
struct CheckpointOrder {
  std::vector<std::string> paths;             ///< the checkpoints' paths, earliest first
  std::vector<CheckpointReader> checkpoints;  ///< each one, open (what merge_checkpoints takes)
  std::vector<std::uint64_t> steps;           ///< each one's recorded step (by_step), else empty
  bool by_step = false;                       ///< ordered by recorded steps (true) or by natural name order
};

/// Orders checkpoints (safetensors files, sharded checkpoints' index files or folders) earliest
/// first, each opened once (the readers returned are what was ordered: a file renamed over one of
/// the paths afterwards is not read): by their recorded_step where every one records one, else in
/// natural_compare order of their paths (absolute, without ".safetensors" or an index's name: see
/// detail::order_key). Refused (InvalidArgument, naming them): no checkpoints; some recording a step
/// and others not; two recording the same step; two paths of the same natural position ("ep07" and
/// "ep7"); one checkpoint given twice (the same data files, compared by identity through links).
inline CheckpointOrder order_checkpoints(const std::vector<std::string>& paths) {
  if (paths.empty()) throw InvalidArgument("polyak::order_checkpoints: no checkpoints");
  const std::string who = "polyak::order_checkpoints: ";
  std::vector<CheckpointReader> opened;
  std::vector<std::vector<detail::FileId>> data_files;  // each checkpoint's shards (or file), sorted
  std::vector<std::optional<std::uint64_t>> steps;
  for (const auto& path : paths) {
    opened.emplace_back(path);
    const CheckpointReader& checkpoint = opened.back();
    steps.push_back(recorded_step(checkpoint));
    std::vector<detail::FileId> ids = detail::data_file_ids(checkpoint);
    for (std::size_t other = 0; other < data_files.size(); ++other) {
      if (data_files[other] == ids) {
        throw InvalidArgument(who + "'" + detail::visible(path) + "' and '" + detail::visible(paths[other]) +
                              "' are one checkpoint (the same files)");
      }
    }
    data_files.push_back(std::move(ids));
  }
  const auto with = std::find_if(steps.begin(), steps.end(), [](const auto& s) { return s.has_value(); });
  const auto without = std::find_if(steps.begin(), steps.end(), [](const auto& s) { return !s.has_value(); });
  if (with != steps.end() && without != steps.end()) {
    throw InvalidArgument(who + "'" + detail::visible(paths[static_cast<std::size_t>(with - steps.begin())]) +
                          "' records its step and '" +
                          detail::visible(paths[static_cast<std::size_t>(without - steps.begin())]) +
                          "' does not: their order is unknown");
  }
  std::vector<std::string> keys;
  for (const auto& path : paths) keys.push_back(detail::order_key(path));
  std::vector<std::size_t> order(paths.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  CheckpointOrder result;
  result.by_step = with != steps.end();
  const auto compare = [&](std::size_t a, std::size_t b) {
    if (result.by_step) return *steps[a] < *steps[b] ? -1 : *steps[a] > *steps[b] ? 1 : 0;
    return natural_compare(keys[a], keys[b]);
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return compare(a, b) < 0; });
  for (std::size_t i = 0; i < order.size(); ++i) {
    if (i > 0 && compare(order[i - 1], order[i]) == 0) {
      throw InvalidArgument(who + "'" + detail::visible(paths[order[i - 1]]) + "' and '" +
                            detail::visible(paths[order[i]]) + "' " +
                            (result.by_step ? "record the same step " + std::to_string(*steps[order[i]])
                                            : std::string("name the same position in natural order")) +
                            ": their order is unknown");
    }
    result.paths.push_back(paths[order[i]]);
    result.checkpoints.push_back(std::move(opened[order[i]]));
    if (result.by_step) result.steps.push_back(*steps[order[i]]);
  }
  return result;
}

}  // namespace polyak
