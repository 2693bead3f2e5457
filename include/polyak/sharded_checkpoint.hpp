// SPDX-License-Identifier: MIT
// Checkpoints as the Hugging Face hub lays them out: one safetensors file, or shards named by a
// "model.safetensors.index.json" ({"metadata": {...}, "weight_map": {"tensor": "shard file"}}), read
// a tensor, or a piece of one, at a time; and written the same way, a folder of shards written
// whole beside its destination and put in its place in one step (detail/atomic_file.hpp). What
// polyak/merge.hpp streams through.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "polyak/detail/atomic_file.hpp"
#include "polyak/error.hpp"
#include "polyak/serialization.hpp"

namespace polyak {

/// The index file name of a sharded checkpoint, as transformers writes it.
inline constexpr const char* sharded_index_name = "model.safetensors.index.json";

/// One checkpoint, opened once: a safetensors file, or a sharded checkpoint given by its index file
/// or by the folder that holds it (a folder with model.safetensors alone is read as that file).
/// Everything is checked at construction, and a problem is a FormatError naming it: an index that
/// is not a JSON object with a "weight_map" of strings, a shard name that is not a plain file name
/// in the index's folder, a tensor the index names that its shard lacks, a shard tensor the index
/// does not name, a tensor in two shards.
class CheckpointReader {
 public:
  struct Tensor {
    std::string name;
    DType dtype;
    std::vector<std::int64_t> shape;
    std::size_t shard;  ///< index into shards()
    SafetensorsIndex::Entry entry;

    std::size_t numel() const {
      std::size_t n = 1;
      for (const auto extent : shape) n *= static_cast<std::size_t>(extent);
      return n;
    }
  };

  explicit CheckpointReader(const std::string& path) {
    namespace fs = std::filesystem;
    std::string index_path = path;
    if (fs::is_directory(path)) {
      const fs::path folder(path);
      if (fs::exists(folder / sharded_index_name)) {
        index_path = (folder / sharded_index_name).string();
      } else if (fs::exists(folder / "model.safetensors")) {
        open_file((folder / "model.safetensors").string());
        return;
      } else {
        throw FormatError("polyak: '" + path + "' holds neither " + sharded_index_name +
                          " nor model.safetensors");
      }
    }
    if (index_path.size() < 5 || index_path.compare(index_path.size() - 5, 5, ".json") != 0) {
      open_file(index_path);
      return;
    }
    open_index(index_path);
  }

  bool sharded() const noexcept { return sharded_; }
  /// The shard file names (for one file: its own name), sorted.
  const std::vector<std::string>& shards() const noexcept { return shard_names_; }
  /// Every tensor: shard after shard, each in its data order.
  const std::vector<Tensor>& tensors() const noexcept { return tensors_; }
  /// The index's "metadata" object (as strings) or the file's __metadata__.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// The __metadata__ of shard `shard` (for one file: metadata()).
  const std::map<std::string, std::string>& shard_metadata(std::size_t shard) const {
    return readers_.at(shard)->index().metadata;
  }
  const std::string& path() const noexcept { return path_; }
  /// Every file this checkpoint reads: the index (if sharded), then the shards.
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    if (sharded_) out.push_back(path_);
    for (const auto& reader : readers_) out.push_back(reader->path());
    return out;
  }

  const Tensor* find(const std::string& name) const {
    const auto found = by_name_.find(name);
    return found == by_name_.end() ? nullptr : &tensors_[found->second];
  }

  void read_bytes(const Tensor& tensor, std::uint64_t offset, std::size_t length, std::byte* out) {
    readers_[tensor.shard]->read_bytes(tensor.entry, offset, length, out);
  }
  StoredTensor read(const Tensor& tensor) { return readers_[tensor.shard]->read(tensor.entry); }

 private:
  void open_file(const std::string& file) {
    path_ = file;
    const std::size_t slash = file.find_last_of('/');
    shard_names_.push_back(slash == std::string::npos ? file : file.substr(slash + 1));
    add_shard(file);
    metadata_ = readers_.front()->index().metadata;
  }

  void open_index(const std::string& index_path) {
    path_ = index_path;
    sharded_ = true;
    std::ifstream in(index_path, std::ios::binary);
    if (!in) throw FormatError("polyak: cannot open '" + index_path + "'");
    std::stringstream text;
    text << in.rdbuf();
    const std::string content = text.str();
    const auto bad = [&](const std::string& why) {
      throw FormatError("polyak: '" + index_path + "': " + why);
    };
    if (content.size() > detail::max_header_bytes) {
      bad("the index holds " + std::to_string(content.size()) + " bytes, over the 100 MB limit of a header");
    }
    const nlohmann::json index =
        detail::parse_json_object(content.data(), content.size(), index_path, "index",
                                  /*leading_space=*/true);
    const auto weight_map = index.find("weight_map");
    if (weight_map == index.end() || !weight_map->is_object())
      bad("not a JSON object with a \"weight_map\" object");
    const auto metadata = index.find("metadata");
    if (metadata != index.end()) {
      if (!metadata->is_object()) bad("\"metadata\" is not an object");
      for (const auto& [key, value] : metadata->items())
        metadata_[key] = value.is_string() ? value.get<std::string>() : value.dump();
    }
    const std::filesystem::path folder = std::filesystem::path(index_path).parent_path();
    std::map<std::string, std::string> shard_of;  // tensor -> shard file
    std::set<std::string> shards;                 // sorted: model-00001-of-00002... in order
    for (const auto& [name, shard] : weight_map->items()) {
      if (!shard.is_string()) bad("the shard of '" + name + "' is not a string");
      const std::string file = shard.get<std::string>();
      if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
          file.find('\\') != std::string::npos) {
        bad("shard '" + file + "' is not a plain file name in the index's folder");
      }
      shard_of[name] = file;
      shards.insert(file);
    }
    if (shards.empty()) bad("the weight_map names no tensor");
    shard_names_.assign(shards.begin(), shards.end());
    for (const auto& file : shard_names_) add_shard((folder / file).string());
    for (const auto& tensor : tensors_) {
      const auto listed = shard_of.find(tensor.name);
      if (listed == shard_of.end())
        bad("shard '" + shard_names_[tensor.shard] + "' holds '" + tensor.name +
            "', which the weight_map does not name");
      if (listed->second != shard_names_[tensor.shard]) {
        bad("'" + tensor.name + "' is in shard '" + shard_names_[tensor.shard] + "', the weight_map says '" +
            listed->second + "'");
      }
    }
    for (const auto& [name, file] : shard_of) {
      if (!by_name_.count(name)) bad("'" + name + "' is not in its shard '" + file + "'");
    }
  }

  void add_shard(const std::string& file) {
    readers_.push_back(std::make_unique<SafetensorsReader>(file));
    const std::size_t shard = readers_.size() - 1;
    for (const auto& entry : readers_.back()->index().entries) {
      if (by_name_.count(entry.name)) {
        throw FormatError("polyak: tensor '" + entry.name + "' is in two shards of '" + path_ + "'");
      }
      by_name_[entry.name] = tensors_.size();
      tensors_.push_back({entry.name, entry.dtype, entry.shape, shard, entry});
    }
  }

  std::string path_;
  bool sharded_ = false;
  std::vector<std::string> shard_names_;
  std::vector<std::unique_ptr<SafetensorsReader>> readers_;  // one open file a shard
  std::vector<Tensor> tensors_;
  std::unordered_map<std::string, std::size_t> by_name_;
  std::map<std::string, std::string> metadata_;
};

namespace detail {

/// Whether a file of an existing output folder is one a sharded checkpoint writer makes (so the
/// folder may be replaced whole): the index, shards, and the temporaries of interrupted writes.
inline bool checkpoint_folder_file(const std::string& name) {
  const auto ends_with = [&](const std::string& end) {
    return name.size() >= end.size() && name.compare(name.size() - end.size(), end.size(), end) == 0;
  };
  return name == sharded_index_name || ends_with(".safetensors") || name.find(".tmp.") != std::string::npos;
}

/// Writes tensors as `layout` is laid out: one safetensors file at `out` (layout not sharded), or,
/// for a sharded layout, a folder `out` of shards with the same file names and tensors and its
/// model.safetensors.index.json. `writer_of(tensor)` gives each tensor's TensorWriter. Metadata: a
/// file's or shard's own (from the same file of `layout`: {"format": "pt"}, which transformers'
/// loader needs), the index's "metadata" with "total_size" of the new tensors; `extra` is added to
/// each. Written atomically, the folder whole (write_folder_atomically): an existing `out` is
/// replaced only at the end, and only if it is a folder of checkpoint files (else refused).
template <class WriterOf>
void write_checkpoint_like(const CheckpointReader& layout, const std::string& out,
                           const std::map<std::string, std::string>& extra, WriterOf&& writer_of) {
  const auto with_extra = [&](std::map<std::string, std::string> metadata) {
    for (const auto& [key, value] : extra) metadata[key] = value;
    return metadata;
  };
  if (!layout.sharded()) {
    std::error_code error;
    if (std::filesystem::is_directory(out, error)) {
      throw InvalidArgument("polyak: writing '" + out + "': it is a folder, and this output is one file");
    }
    std::vector<TensorWriter> writers;
    for (const auto& tensor : layout.tensors()) writers.push_back(writer_of(tensor));
    write_safetensors(out, with_extra(layout.metadata()), writers);
    return;
  }
  const std::string folder = folder_destination("polyak: writing '" + out + "'", out, checkpoint_folder_file);
  write_folder_atomically(folder, [&](const std::string& temporary) {
    nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
    std::uint64_t total = 0;
    for (std::size_t shard = 0; shard < layout.shards().size(); ++shard) {
      std::vector<TensorWriter> writers;
      for (const auto& tensor : layout.tensors()) {
        if (tensor.shard != shard) continue;
        writers.push_back(writer_of(tensor));
        weight_map[tensor.name] = layout.shards()[shard];
        total += writers.back().size;
      }
      write_safetensors((std::filesystem::path(temporary) / layout.shards()[shard]).string(),
                        with_extra(layout.shard_metadata(shard)), writers);
    }
    nlohmann::ordered_json metadata = nlohmann::ordered_json::object();
    for (const auto& [key, value] : with_extra(layout.metadata())) metadata[key] = value;
    metadata["total_size"] = total;
    const nlohmann::ordered_json index = {{"metadata", metadata}, {"weight_map", weight_map}};
    const std::string text = index.dump(2) + "\n";
    write_atomically((std::filesystem::path(temporary) / sharded_index_name).string(),
                     [&](int fd, const std::string& file) { write_all(fd, text.data(), text.size(), file); });
  });
}

}  // namespace detail

}  // namespace polyak
