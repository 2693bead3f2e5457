// SPDX-License-Identifier: MIT
// Checkpoints of sharded states (polyak/core/shard_view.hpp): every rank writes its byte ranges into one
// safetensors file of the whole model, and any number of ranks, cut any way, read it back.
//
//     polyak::save_distributed("ema.safetensors", ema.state_dict(), shard, comm);   // collective
//     polyak::load_distributed(ema, "ema.safetensors", shard, comm);               // collective
//
// The file is the one a single process holding the whole model writes with save_safetensors (the
// same bytes), so polyak's other tools (polyak-merge, polyak-post-hoc-ema, PyTorch's safetensors)
// read it as any other. Every rank must see the same file system path (a shared file system).
#pragma once

#include <algorithm>  // std::min
#include <cstddef>    // std::size_t
#include <cstdint>    // std::uint64_t
#include <exception>
#include <string>
#include <unordered_map>  // entry names to layout tensors
#include <utility>        // std::move
#include <vector>

#include <fcntl.h>   // open
#include <unistd.h>  // ftruncate, fsync, close, unlink

#include "polyak/core/detail/agreement.hpp"
#include "polyak/core/error.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/core/shard_view.hpp"
#include "polyak/checkpoint/state_io.hpp"  // load_distributed loads a state into an AveragedModel

namespace polyak {

namespace detail {

/// Which layout tensor an entry name stands for: prefix + the tensor's name. Built once a call, so
/// that naming the entries of a model of 100k tensors stays linear.
class PieceNames {
 public:
  PieceNames(const FlatLayout& layout, const std::vector<std::string>& prefixes) {
    for (const auto& prefix : prefixes) {
      for (std::size_t k = 0; k < layout.tensors().size(); ++k)
        tensor_of_.emplace(prefix + layout.tensors()[k].name, static_cast<long>(k));
    }
  }
  /// The layout tensor of entry `name`; -1 for none.
  long operator()(const std::string& name) const {
    const auto found = tensor_of_.find(name);
    return found == tensor_of_.end() ? -1 : found->second;
  }

 private:
  std::unordered_map<std::string, long> tensor_of_;
};

/// How many windows of the data every member reads and compares, and how long each is.
inline constexpr std::uint64_t sampled_windows = 64, sampled_window_bytes = 256;

}  // namespace detail

namespace detail {

/// The prefixes whose entries save_distributed and load_distributed treat as pieces of the layout's
/// tensors by default: AveragedModel's ("module.").
inline std::vector<std::string> averaged_model_prefixes() {
  return {detail::AveragedModelKeys::module_prefix};
}

}  // namespace detail

/// Collective: writes, as one safetensors file at `path`, the whole model's state whose shards the
/// members hold. In `local` (an AveragedModel's state_dict over shard.parameters(), say), an entry
/// named prefix + the name of a layout tensor (prefix from `prefixes`) is this member's piece of that
/// tensor, saved at its place in the whole tensor; every other entry (n_averaged, the settings) and
/// the metadata must be the same on every member, and are written once.
///
/// Crash-safe as save_safetensors: rank 0 creates a temporary file beside `path`, every member
/// writes its byte ranges into it (pwrite) and fsyncs, and rank 0 renames it over `path` only when
/// all have succeeded; a failure anywhere removes it, leaves `path` as it was and throws on every
/// member, naming the ranks that failed. Members whose states disagree (other entries, dtypes,
/// another piece shape than the shard's) are refused before anything is written.
template <class T, class Comm>
void save_distributed(const std::string& path, const StateDict& local, const ShardView<T>& shard, Comm& comm,
                      const std::vector<std::string>& prefixes = detail::averaged_model_prefixes()) {
  const std::string who = "polyak::save_distributed('" + path + "')";
  const FlatLayout& layout = shard.layout();

  // What the file holds, the same on every member: the header's entries, whole.
  std::vector<detail::TensorWriter> entries;
  std::vector<long> tensor_of;  // per entry: its layout tensor, or -1
  const detail::PieceNames piece_tensor(layout, prefixes);
  detail::LayoutHash shared;  // what must agree: entries' names, dtypes, shapes; the others' bytes
  std::string problem;
  for (const auto& [name, tensor] : local) {
    const long k = piece_tensor(name);
    std::vector<std::int64_t> shape = tensor.shape;
    if (k >= 0) {
      const auto& piece = shard.pieces()[static_cast<std::size_t>(k)];
      if (shape != std::vector<std::int64_t>{static_cast<std::int64_t>(piece.length)} && problem.empty()) {
        problem = "entry '" + name + "' has shape " + detail::shape_string(shape) +
                  ", not this shard's piece [" + std::to_string(piece.length) + "]";
      }
      shape = layout.tensors()[static_cast<std::size_t>(k)].shape;
    } else {
      tensor.for_each_chunk([&](const std::byte* data, std::size_t length) { shared.put(data, length); });
    }
    shared.put(name.data(), name.size() + 1);
    shared.put(dtype_name(tensor.dtype), std::char_traits<char>::length(dtype_name(tensor.dtype)) + 1);
    for (const std::int64_t extent : shape) shared.put(&extent, sizeof extent);
    std::size_t numel = 1;
    for (const std::int64_t extent : shape) numel *= static_cast<std::size_t>(extent);
    entries.push_back({name, tensor.dtype, shape, numel * dtype_size(tensor.dtype), {}});
    tensor_of.push_back(k);
  }
  for (const auto& [key, value] : local.metadata) {
    shared.put(key.data(), key.size() + 1);
    shared.put(value.data(), value.size() + 1);
  }
  {
    double sums[detail::agreement_doubles] = {};
    detail::put_agreement(shared.value, sums);
    comm.allreduce_sum(sums, detail::agreement_doubles);
    const std::string failed = detail::problems_of_all(comm, problem);
    if (!failed.empty()) throw InvalidArgument(who + ": the state does not fit the shard: " + failed);
    if (!detail::agreed(sums, comm.size())) {
      throw InvalidArgument(who +
                            ": the members' states differ (entries, dtypes, or the values of n_averaged, the "
                            "settings or the metadata), so nothing was written");
    }
  }

  // Rank 0 makes the temporary file: header, and its full size.
  const std::string header = detail::safetensors_prefix(local.metadata, entries);
  std::string temporary, failure;
  int fd = -1;
  if (comm.rank() == 0) {
    temporary = detail::temporary_name(path);
    try {
      detail::check_file_destination(who, path);  // (a folder or a device is refused, not replaced)
      fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (fd < 0) detail::fail_io("cannot create", temporary);
      detail::write_all(fd, header.data(), header.size(), temporary);
      std::uint64_t size = header.size();
      for (const auto& entry : entries) size += entry.size;
      if (::ftruncate(fd, static_cast<off_t>(size)) != 0) detail::fail_io("cannot size", temporary);
    } catch (const std::exception& e) {
      failure = e.what();
    }
  }
  std::string failed = detail::problems_of_all(comm, failure);
  if (!failed.empty()) {
    if (fd >= 0) ::close(fd);
    if (comm.rank() == 0) ::unlink(temporary.c_str());
    throw RuntimeError(who + ": " + failed);
  }
  temporary = detail::text_of_rank0(comm, temporary);

  // Every member writes its pieces; rank 0 also the shared entries.
  try {
    if (fd < 0) fd = ::open(temporary.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) detail::fail_io("cannot open", temporary);
    std::uint64_t offset = header.size();
    std::size_t e = 0;
    for (const auto& [name, tensor] : local) {
      const long k = tensor_of[e];
      if (k >= 0 || comm.rank() == 0) {
        std::uint64_t at =
            offset +
            (k >= 0 ? shard.pieces()[static_cast<std::size_t>(k)].offset * dtype_size(tensor.dtype) : 0);
        tensor.for_each_chunk([&](const std::byte* data, std::size_t length) {
          detail::pwrite_all(fd, data, length, at, temporary);
          at += length;
        });
      }
      offset += entries[e++].size;
    }
    if (::fsync(fd) != 0) detail::fail_io("cannot fsync", temporary);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (fd >= 0 && ::close(fd) != 0 && failure.empty()) failure = "cannot close '" + temporary + "'";
  failed = detail::problems_of_all(comm, failure);
  if (!failed.empty()) {
    if (comm.rank() == 0) ::unlink(temporary.c_str());
    throw RuntimeError(who + ": " + failed + "; '" + path + "' is as it was");
  }

  // All bytes are on disk: rank 0 puts the file in place.
  if (comm.rank() == 0) {
    try {
      detail::commit_file(temporary, path);
    } catch (const std::exception& e) {
      failure = e.what();
    }
  }
  failed = detail::problems_of_all(comm, failure);
  if (!failed.empty()) throw RuntimeError(who + ": " + failed);
}

/// Collective: reads this member's part of a whole model's state from the safetensors file at
/// `path` (written by save_distributed on any number of ranks, or by save_safetensors in one
/// process): an entry named prefix + the name of a layout tensor comes as this shard's piece of it
/// (1-D), every other entry whole. Refused on every member, naming the ranks that failed, when any
/// member cannot read it (a missing, truncated or malformed file, a tensor of another shape than
/// the layout's) or when the members see different files: they compare the file's size, its header,
/// every entry that is not a piece (n_averaged, the settings) byte for byte, and 64 windows of 256
/// bytes spread over the data, so that a stale copy of another save on one node's disk is refused
/// (its n_averaged or its values differ) rather than loaded beside the new one.
template <class T, class Comm>
StateDict load_distributed_state(
    const std::string& path, const ShardView<T>& shard, Comm& comm,
    const std::vector<std::string>& prefixes = detail::averaged_model_prefixes()) {
  const std::string who = "polyak::load_distributed('" + path + "')";
  StateDict sd;
  std::string problem;
  detail::LayoutHash seen;  // what this member read that every member must read alike
  try {
    SafetensorsReader reader(path);
    const detail::PieceNames piece_tensor(shard.layout(), prefixes);
    const auto& entries = reader.header().entries;
    for (const auto& entry : entries) {
      const std::string dtype = dtype_name(entry.dtype);
      seen.put(entry.name.data(), entry.name.size() + 1);
      seen.put(dtype.data(), dtype.size() + 1);
      for (const std::int64_t extent : entry.shape) seen.put(&extent, sizeof extent);
      seen.put(&entry.begin, sizeof entry.begin);
      seen.put(&entry.end, sizeof entry.end);
      const long k = piece_tensor(entry.name);
      if (k < 0) {
        StoredTensor whole = reader.read(entry);
        seen.put(whole.bytes.data(), whole.bytes.size());
        sd.insert(entry.name, std::move(whole));
        continue;
      }
      const auto& tensor = shard.layout().tensors()[static_cast<std::size_t>(k)];
      if (entry.shape != tensor.shape) {
        throw FormatError("tensor '" + entry.name + "' has shape " + detail::shape_string(entry.shape) +
                          " in the file where the layout has " + detail::shape_string(tensor.shape));
      }
      const auto& piece = shard.pieces()[static_cast<std::size_t>(k)];
      StoredTensor part;
      part.dtype = entry.dtype;
      part.shape = {static_cast<std::int64_t>(piece.length)};
      part.bytes.resize(piece.length * dtype_size(entry.dtype));
      reader.read_bytes(entry, piece.offset * dtype_size(entry.dtype), part.bytes.size(), part.bytes.data());
      sd.insert(entry.name, std::move(part));
    }
    // The windows: at data offsets size * w / 64, up to 256 bytes each, within one tensor.
    const std::uint64_t data_size = entries.empty() ? 0 : entries.back().end;
    seen.put(&data_size, sizeof data_size);
    std::size_t e = 0;
    std::vector<std::byte> window(detail::sampled_window_bytes);
    for (std::uint64_t w = 0; w < detail::sampled_windows && data_size > 0; ++w) {
      const std::uint64_t at = data_size / detail::sampled_windows * w +
                               data_size % detail::sampled_windows * w / detail::sampled_windows;
      while (entries[e].end <= at) ++e;  // (entries cover the data in order; at < data_size)
      const auto length = static_cast<std::size_t>(
          std::min<std::uint64_t>(detail::sampled_window_bytes, entries[e].end - at));
      reader.read_bytes(entries[e], at - entries[e].begin, length, window.data());
      seen.put(window.data(), length);
    }
    sd.metadata = reader.header().metadata;
    for (const auto& [key, value] : sd.metadata) {
      seen.put(key.data(), key.size() + 1);
      seen.put(value.data(), value.size() + 1);
    }
  } catch (const std::exception& e) {
    problem = e.what();
  }
  double sums[detail::agreement_doubles] = {};
  detail::put_agreement(seen.value, sums);
  comm.allreduce_sum(sums, detail::agreement_doubles);
  const std::string failed = detail::problems_of_all(comm, problem);
  if (!failed.empty()) throw FormatError(who + ": " + failed + "; nothing was loaded");
  if (!detail::agreed(sums, comm.size())) {
    throw FormatError(who +
                      ": the members read different files (another save's copy on one node's disk? the path "
                      "must be on a file system they share); nothing was loaded");
  }
  return sd;
}

/// Collective: load_distributed_state, then model.load_state_dict on every member; if any member's
/// model refuses the state (another decay, say), every member throws, naming the ranks, and those
/// that had loaded it are put back as they were: no member is left changed.
template <class Model, class T, class Comm>
void load_distributed(Model& model, const std::string& path, const ShardView<T>& shard, Comm& comm,
                      const std::vector<std::string>& prefixes = detail::averaged_model_prefixes()) {
  const StateDict sd = load_distributed_state(path, shard, comm, prefixes);
  const StateDict before = model.state_dict().owned();
  std::string problem;
  try {
    model.load_state_dict(sd);
  } catch (const std::exception& e) {
    problem = e.what();
  }
  const std::string failed = detail::problems_of_all(comm, problem);
  if (failed.empty()) return;
  if (problem.empty()) model.load_state_dict(before);
  throw FormatError("polyak::load_distributed('" + path + "'): " + failed + "; no member's model changed");
}

}  // namespace polyak
