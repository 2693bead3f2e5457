// SPDX-License-Identifier: MIT
// Model merging, streamed: weighted averages (model soups, fairseq's checkpoint averaging, LAWA),
// task arithmetic, TIES, DARE and SLERP over checkpoints (safetensors files or Hugging Face sharded
// checkpoints) or StateDicts, one piece of one tensor at a time; and greedy soups.
// The methods' formulas: polyak/checkpoint/merge_options.hpp.
#pragma once

#include <cstddef>
#include <cstring>  // std::memcpy
#include <string>
#include <utility>
#include <vector>

#include "polyak/checkpoint/detail/merge_methods.hpp"
#include "polyak/checkpoint/merge_options.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/checkpoint/sharded_checkpoint.hpp"
#include "polyak/checkpoint/state_dict.hpp"
#include "polyak/core/error.hpp"

namespace polyak {

/// Merges checkpoints (paths of safetensors files, sharded checkpoints' index files or folders) into
/// `out`, laid out as the first input (a file, or a folder of shards with an index), streaming.
/// `base` ("" for none) is the base model of the methods that need one. Every input and the base
/// must hold the same tensors (names, dtypes, shapes) as the first: otherwise, as for bad options,
/// nothing is written and InvalidArgument names the difference. Metadata: the first input's (each
/// shard's own, and the index's), less the training step it records ("step", "global_step": a
/// merge is at no one step of training), plus "merge_method". `out` is written atomically, a folder
/// whole (see detail::write_folder_atomically): a crash or a concurrent merge into the same `out`
/// never leaves a mix of two merges. Refused before anything is written: an `out` that is one of the
/// files the merge reads or a folder holding one (compared by identity, through links), an existing
/// `out` folder holding anything but checkpoint files.
inline void merge_checkpoints(const std::vector<std::string>& inputs, const std::string& base,
                              const MergeOptions& options, const std::string& out);

/// The same merge of checkpoints already open (order_checkpoints' readers, say): the files they
/// opened are the ones merged, whatever has been renamed over their paths since. `base`: nullptr
/// for none.
inline void merge_checkpoints(std::vector<CheckpointReader> inputs, CheckpointReader* base,
                              const MergeOptions& options, const std::string& out) {
  options.check(inputs.size(), base != nullptr);
  std::vector<CheckpointReader> readers = std::move(inputs);
  const std::size_t models = readers.size();
  if (base != nullptr) readers.push_back(std::move(*base));
  const detail::TensorTable first = detail::table_of(readers.front());
  for (std::size_t r = 1; r < readers.size(); ++r) {
    const std::string difference = detail::first_table_difference(
        first, readers.front().path(), detail::table_of(readers[r]), readers[r].path());
    if (!difference.empty()) throw InvalidArgument("polyak::merge_checkpoints: " + difference);
  }
  std::vector<std::string> read;  // every file the merge reads, kept apart from what it writes
  for (const auto& reader : readers) {
    for (auto& file : reader.files()) read.push_back(std::move(file));
  }
  detail::check_output_apart("polyak::merge_checkpoints", out, read);
  const std::string last = readers.front().tensors().empty()
                               ? std::string()
                               : readers.front().tensors().back().name;  // (written last)
  detail::MergeBuffers buffers;  // (the tensors are written one after another)
  detail::write_checkpoint_like(
      readers.front(), out, {{"merge_method", polyak::to_string(options.method)}}, {"step", "global_step"},
      [&](const CheckpointReader::Tensor& tensor) {
        const std::size_t size = tensor.numel() * dtype_size(tensor.dtype);
        return detail::TensorWriter{
            tensor.name, tensor.dtype, tensor.shape, size,
            [&readers, &options, &last, &buffers, models, tensor](int fd, const std::string& file) {
              detail::write_merged_tensor(readers, options, models, tensor, fd, file, buffers);
              if (tensor.name == last) detail::check_inputs_unchanged(readers);  // (before OUT is kept)
            }};
      });
}

inline void merge_checkpoints(const std::vector<std::string>& inputs, const std::string& base,
                              const MergeOptions& options, const std::string& out) {
  options.check(inputs.size(), !base.empty());
  std::vector<CheckpointReader> readers;
  for (const auto& path : inputs) readers.emplace_back(path);
  std::vector<CheckpointReader> base_reader;
  if (!base.empty()) base_reader.emplace_back(base);
  merge_checkpoints(std::move(readers), base_reader.empty() ? nullptr : &base_reader.front(), options, out);
}

/// The same merge over StateDicts in memory: a new StateDict, each entry in the first's dtype, its
/// metadata the first's less "step" and "global_step", plus "merge_method".
inline StateDict merge_state_dicts(const std::vector<const StateDict*>& inputs, const StateDict* base,
                                   const MergeOptions& options) {
  options.check(inputs.size(), base != nullptr);
  std::vector<const StateDict*> all = inputs;
  if (base) all.push_back(base);
  const detail::TensorTable first = detail::table_of(*all.front());
  for (std::size_t r = 1; r < all.size(); ++r) {
    const std::string difference =
        detail::first_table_difference(first, "model 0", detail::table_of(*all[r]),
                                       r < inputs.size() ? "model " + std::to_string(r) : "the base");
    if (!difference.empty()) throw InvalidArgument("polyak::merge_state_dicts: " + difference);
  }
  StateDict result;
  result.metadata = all.front()->metadata;
  result.metadata.erase("step");  // (as merge_checkpoints: a merge is at no one step of training)
  result.metadata.erase("global_step");
  result.metadata["merge_method"] = polyak::to_string(options.method);
  detail::MergeWorkspace work;  // (reused from one tensor to the next)
  for (const auto& entry : *all.front()) {
    const std::string& name = entry.first;  // (not a structured binding: the lambdas below capture it)
    const StoredTensor& tensor = entry.second;
    if (tensor.dtype == DType::I64) {
      result.insert(name, inputs.back()->at(name).owned());
      continue;
    }
    StoredTensor merged;
    merged.dtype = tensor.dtype;
    merged.shape = tensor.shape;
    merged.bytes.resize(tensor.byte_size());
    // Pieces read from each entry's row-major bytes (a borrowed column-major one reordered once).
    const std::size_t element = dtype_size(tensor.dtype);
    std::vector<StoredTensor> reordered(all.size());
    std::vector<const std::byte*> sources;
    for (std::size_t m = 0; m < all.size(); ++m) {
      const StoredTensor& t = all[m]->at(name);
      if (t.contiguous() == nullptr) reordered[m] = t.owned();
      sources.push_back(t.contiguous() != nullptr ? t.contiguous() : reordered[m].bytes.data());
    }
    detail::merge_tensor(
        options, inputs.size(), name, tensor.shape, tensor.numel(), tensor.dtype, base != nullptr,
        [&](std::size_t, std::size_t m, std::size_t begin, std::size_t count, double* out) {  // (any lane)
          detail::bytes_to_doubles(tensor.dtype, sources[m] + begin * element, count, out);
        },
        [&](const std::byte* out, std::size_t begin, std::size_t count) {  // (from any lane)
          std::memcpy(merged.bytes.data() + begin * element, out, count * element);
        },
        work);
    result.insert(name, std::move(merged));
  }
  return result;
}

/// What greedy_soup returns: the ingredients taken, their average and its score.
struct GreedySoup {
  std::vector<std::size_t> ingredients;  ///< indices into candidates, in the order taken
  StateDict soup;                        ///< their uniform average
  double score = 0;                      ///< evaluate(soup)
};

/// A greedy soup (Wortsman et al., 2022): `candidates` in order of their own held-out score, best
/// first; the soup starts as the first and takes each next one only if the uniform average with it
/// does not score worse under `evaluate(const StateDict&) -> double` (higher is better).
template <class Evaluate>
GreedySoup greedy_soup(const std::vector<std::string>& candidates, Evaluate&& evaluate) {
  if (candidates.empty()) throw InvalidArgument("polyak::greedy_soup: no candidates");
  GreedySoup result;
  result.soup = load_safetensors(candidates.front());
  result.ingredients.push_back(0);
  result.score = evaluate(static_cast<const StateDict&>(result.soup));
  for (std::size_t c = 1; c < candidates.size(); ++c) {
    const StateDict candidate = load_safetensors(candidates[c]);
    MergeOptions add;  // the soup of k, weighted k, with the candidate, weighted 1
    add.weights = {static_cast<double>(result.ingredients.size()), 1.0};
    StateDict tried = merge_state_dicts({&result.soup, &candidate}, nullptr, add);
    const double score = evaluate(static_cast<const StateDict&>(tried));
    if (score >= result.score) {
      result.soup = std::move(tried);
      result.score = score;
      result.ingredients.push_back(c);
    }
  }
  return result;
}

}  // namespace polyak
