// SPDX-License-Identifier: MIT
// A merge planned tensor by tensor, as mergekit plans one from its YAML config: each output tensor
// named, typed and merged from named tensors of several checkpoints by its own method and settings
// (so that a setting can change per tensor name and per layer, and layers can be taken from several
// models and renumbered), written as a Hugging Face folder: shards of at most a given size, their
// model.safetensors.index.json, and the non-weight files (config.json, tokenizer files) the plan
// names. tools/mergekit turns a mergekit config into a MergePlan.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>  // std::snprintf: the shard names
#include <filesystem>
#include <fstream>  // the manifest of an earlier output
#include <future>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "polyak/checkpoint/detail/files.hpp"
#include "polyak/checkpoint/detail/merge_methods.hpp"
#include "polyak/checkpoint/merge_options.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/checkpoint/sharded_checkpoint.hpp"
#include "polyak/core/error.hpp"

namespace polyak {

/// A tensor of one of a plan's checkpoints.
struct TensorRef {
  std::size_t checkpoint = 0;  ///< index into MergePlan::checkpoints
  std::string name;            ///< the tensor's name there
};

/// One output tensor: what it is merged from, and how.
struct PlannedTensor {
  std::string name;               ///< its name in the output
  DType dtype = DType::F32;       ///< its dtype in the output (floating point; an I64 tensor is copied)
  std::vector<TensorRef> models;  ///< the models merged, in order (one for Passthrough)
  std::optional<TensorRef> base;  ///< the base model, for the methods that need one
  MergeOptions options;           ///< the method and its settings for this tensor
};

/// A whole merge: the checkpoints it reads and every output tensor, in output order.
struct MergePlan {
  std::vector<std::string> checkpoints;      ///< paths (safetensors files, sharded folders or indexes)
  std::vector<PlannedTensor> tensors;        ///< the output, in order
  std::map<std::string, std::string> files;  ///< other files written beside the weights: name, content
  std::map<std::string, std::string> index_metadata;  ///< added to the index's "metadata"
};

/// The shard file name transformers gives shard `shard` (from 0) of `count`.
inline std::string shard_file_name(std::size_t shard, std::size_t count) {
  char name[64];
  std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", shard + 1, count);
  return name;
}

/// Which shard each tensor of sizes `bytes` goes to, in order: a new shard where the next tensor
/// would take the current one past `max_shard_bytes` (a tensor larger than that alone in its own).
inline std::vector<std::size_t> shard_assignment(const std::vector<std::uint64_t>& bytes,
                                                 std::uint64_t max_shard_bytes) {
  std::vector<std::size_t> shard(bytes.size(), 0);
  std::uint64_t filled = 0;
  std::size_t current = 0;
  for (std::size_t t = 0; t < bytes.size(); ++t) {
    if (filled > 0 && filled + bytes[t] > max_shard_bytes) {
      ++current;
      filled = 0;
    }
    shard[t] = current;
    filled += bytes[t];
  }
  return shard;
}

namespace detail {

/// Refuses (InvalidArgument, naming it) a plan that cannot run against `readers`, before anything is
/// written: a tensor reference to a checkpoint or tensor that is not there, inputs of one output
/// tensor that differ in shape, an output name given twice, options its method refuses.
inline void check_plan(const MergePlan& plan, std::vector<CheckpointReader>& readers) {
  const std::string who = "polyak::run_merge_plan: ";
  std::map<std::string, int> names;
  for (const auto& t : plan.tensors) {
    if (!names.emplace(t.name, 0).second)
      throw InvalidArgument(who + "the output tensor '" + t.name + "' twice");
    t.options.check(t.models.size(), t.base.has_value());
    const CheckpointReader::Tensor* first = nullptr;
    std::vector<TensorRef> refs = t.models;
    if (t.base) refs.push_back(*t.base);
    for (const auto& ref : refs) {
      if (ref.checkpoint >= readers.size())
        throw InvalidArgument(who + "'" + t.name + "' reads no checkpoint");
      const CheckpointReader::Tensor* found = readers[ref.checkpoint].find(ref.name);
      if (found == nullptr) {
        throw InvalidArgument(who + "'" + readers[ref.checkpoint].path() + "' has no tensor '" + ref.name +
                              "' (for '" + t.name + "')");
      }
      if (first != nullptr && found->shape != first->shape) {
        throw InvalidArgument(who + "'" + t.name + "': '" + ref.name + "' is " + shape_string(found->shape) +
                              " in '" + readers[ref.checkpoint].path() + "', " + shape_string(first->shape) +
                              " in the first model");
      }
      if (first != nullptr && (found->dtype == DType::I64) != (first->dtype == DType::I64)) {
        throw InvalidArgument(who + "'" + t.name + "' is an integer tensor in one model and not another");
      }
      if (first == nullptr) first = found;
    }
  }
}

/// Writes planned tensor `t` to `fd` (write_merged_stream: each input read in its own dtype, the
/// result rounded once to t.dtype).
inline void write_planned_tensor(std::vector<CheckpointReader>& readers, const PlannedTensor& t, int fd,
                                 const std::string& file, MergeBuffers& buffers) {
  std::vector<StreamedInput> inputs;
  for (const auto& ref : t.models) inputs.push_back({ref.checkpoint, readers[ref.checkpoint].find(ref.name)});
  if (t.base) inputs.push_back({t.base->checkpoint, readers[t.base->checkpoint].find(t.base->name)});
  write_merged_stream(readers, inputs, t.models.size(), t.options, t.name, t.dtype, fd, file, buffers);
}

/// The file run_merge_plan writes into its output folder listing every file it wrote there: what
/// tells its own earlier output (which it may replace) from a folder of the user's.
inline constexpr const char* merge_plan_manifest = ".polyak-merge-files";

/// What an existing output folder of run_merge_plan holds that it would not replace ("" for
/// nothing): it is replaced whole only if it is empty, an earlier output of run_merge_plan holding
/// only the files its manifest lists (a file the user added, a model downloaded there, is not
/// replaced), or a sharded checkpoint and nothing else.
inline std::string foreign_in_merge_folder(const std::string& folder) {
  namespace fs = std::filesystem;
  std::ifstream manifest(fs::path(folder) / merge_plan_manifest);
  if (!manifest) return foreign_in_checkpoint_folder(folder);
  std::set<std::string> listed{merge_plan_manifest};
  for (std::string line; std::getline(manifest, line);) listed.insert(line);
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(folder, error)) {
    const std::string name = entry.path().filename().string();
    if (!listed.count(name) || !entry.is_regular_file(error) || entry.is_symlink(error)) {
      return "a file it did not write, '" + name + "'";
    }
  }
  if (error) return "a folder it cannot list (" + error.message() + ")";
  return {};
}

/// A plan checked against its checkpoints, opened, and where each tensor goes.
struct PreparedPlan {
  std::vector<CheckpointReader> readers;  ///< plan.checkpoints, open
  std::vector<std::uint64_t> bytes;       ///< each output tensor's size
  std::vector<std::size_t> shard_of;      ///< each output tensor's shard
  std::string folder;                     ///< the output folder, checked as a destination
};

/// Everything run_merge_plan checks before it writes: the plan (check_plan), the shard size, the
/// file names, `out` apart from every file read (by identity) and a destination it may replace.
inline PreparedPlan prepare_plan(const MergePlan& plan, const std::string& out,
                                 std::uint64_t max_shard_bytes) {
  if (plan.tensors.empty()) throw InvalidArgument("polyak::run_merge_plan: no tensors to write");
  if (max_shard_bytes == 0) throw InvalidArgument("polyak::run_merge_plan: a shard size of 0 bytes");
  PreparedPlan prepared;
  for (const auto& path : plan.checkpoints) prepared.readers.emplace_back(path);
  check_plan(plan, prepared.readers);
  std::vector<std::string> read;
  for (const auto& reader : prepared.readers) {
    for (auto& file : reader.files()) read.push_back(std::move(file));
  }
  check_output_apart("polyak::run_merge_plan", out, read);
  for (const auto& file : plan.files) {
    const std::string& name = file.first;
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == ".." ||
        name == sharded_index_name || name == merge_plan_manifest || name.rfind("model-", 0) == 0) {
      throw InvalidArgument("polyak::run_merge_plan: '" + name + "' is not a file name the folder may hold");
    }
  }
  for (const auto& t : plan.tensors) {
    const CheckpointReader::Tensor& in =
        *prepared.readers[t.models.front().checkpoint].find(t.models.front().name);
    prepared.bytes.push_back(in.numel() * dtype_size(in.dtype == DType::I64 ? DType::I64 : t.dtype));
  }
  prepared.shard_of = shard_assignment(prepared.bytes, max_shard_bytes);
  prepared.folder = folder_destination("polyak: writing '" + out + "'", out, foreign_in_merge_folder);
  return prepared;
}

}  // namespace detail

/// Checks `plan` and `out` as run_merge_plan does before it writes anything (the checkpoints opened
/// and every tensor found, the options, the destination), and writes nothing: a dry run.
inline void check_merge_plan(const MergePlan& plan, const std::string& out, std::uint64_t max_shard_bytes) {
  (void)detail::prepare_plan(plan, out, max_shard_bytes);
}

/// Runs `plan`: reads its checkpoints, merges each output tensor by its own options, and writes the
/// folder `out`: shards of at most `max_shard_bytes` (a larger tensor alone in one) named as
/// transformers names them, each with {"format": "pt"}; model.safetensors.index.json (its
/// "metadata": "total_size" and plan.index_metadata); plan.files; and a manifest of them all
/// (detail::merge_plan_manifest). Everything is checked before anything is written
/// (check_merge_plan); the folder is written whole beside `out` and put in its place in one step,
/// replacing an existing `out` only if it is empty or this function's earlier output with nothing
/// added (detail::foreign_in_merge_folder); an input written over in place while it was read is
/// refused (FormatError) and nothing is written.
inline void run_merge_plan(const MergePlan& plan, const std::string& out, std::uint64_t max_shard_bytes) {
  detail::PreparedPlan prepared = detail::prepare_plan(plan, out, max_shard_bytes);
  std::vector<CheckpointReader>& readers = prepared.readers;
  const std::size_t shards = prepared.shard_of.back() + 1;
  detail::write_folder_atomically(
      prepared.folder,
      [&](const std::string& temporary) {
        std::string manifest = std::string(detail::sharded_index_name) + "\n";
        detail::IndexText index;
        detail::MergeBuffers buffers;  // (the tensors are written one after another)
        for (std::size_t shard = 0; shard < shards; ++shard) {
          std::vector<detail::TensorWriter> writers;
          const std::string file = shard_file_name(shard, shards);
          manifest += file + "\n";
          for (std::size_t i = 0; i < plan.tensors.size(); ++i) {
            if (prepared.shard_of[i] != shard) continue;
            const PlannedTensor& t = plan.tensors[i];
            const CheckpointReader::Tensor& in =
                *readers[t.models.front().checkpoint].find(t.models.front().name);
            writers.push_back(detail::TensorWriter{
                t.name, in.dtype == DType::I64 ? DType::I64 : t.dtype, in.shape, prepared.bytes[i],
                [&readers, &t, &buffers](int fd, const std::string& path) {
                  detail::write_planned_tensor(readers, t, fd, path, buffers);
                }});
            index.add(t.name, file, prepared.bytes[i]);
          }
          detail::write_safetensors((std::filesystem::path(temporary) / file).string(), {{"format", "pt"}},
                                    writers);
        }
        const std::string text = index.text(plan.index_metadata);
        const auto write_file = [&temporary](const std::string& name, const std::string& content) {
          detail::write_atomically((std::filesystem::path(temporary) / name).string(),
                                   [&content](int fd, const std::string& path) {
                                     detail::write_all(fd, content.data(), content.size(), path);
                                   });
        };
        write_file(detail::sharded_index_name, text);
        for (const auto& file : plan.files) {
          write_file(file.first, file.second);
          manifest += file.first + "\n";
        }
        write_file(detail::merge_plan_manifest, manifest);
        detail::check_inputs_unchanged(readers);  // (before the folder is kept)
      },
      detail::foreign_in_merge_folder);
}

}  // namespace polyak
