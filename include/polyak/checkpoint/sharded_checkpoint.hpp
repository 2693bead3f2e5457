// SPDX-License-Identifier: MIT
// Checkpoints as the Hugging Face hub lays them out: one safetensors file, or shards named by a
// "model.safetensors.index.json" ({"metadata": {...}, "weight_map": {"tensor": "shard file"}}), read
// a tensor, or a piece of one, at a time; and written the same way, a folder of shards written
// whole beside its destination and put in its place in one step (detail/files.hpp). What
// polyak/checkpoint/merge.hpp streams through.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>  // std::strerror
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <fcntl.h>     // open, openat: a folder's files opened relative to the folder
#include <sys/stat.h>  // fstat

#include "polyak/checkpoint/detail/files.hpp"
#include "polyak/checkpoint/detail/json_headers.hpp"
#include "polyak/core/error.hpp"
#include "polyak/checkpoint/safetensors.hpp"

namespace polyak {

namespace detail {

/// The index file name of a sharded checkpoint, as transformers writes it.
inline constexpr const char* sharded_index_name = "model.safetensors.index.json";

}  // namespace detail

/// One checkpoint, opened once: a safetensors file, or a sharded checkpoint given by its index file
/// or by the folder that holds it (a folder with model.safetensors alone is read as that file).
/// Everything is checked at construction, and a problem is a FormatError naming it: an index that
/// is not a JSON object with a "weight_map" of strings, a shard name that is not a plain file name
/// in the index's folder, a tensor the index names that its shard lacks, a shard tensor the index
/// does not name, a tensor in two shards.
class CheckpointReader {
 public:
  /// One tensor of the checkpoint: where it is and what it holds.
  struct Tensor {
    std::string name;                 ///< the tensor's name
    DType dtype;                      ///< its scalar type
    std::vector<std::int64_t> shape;  ///< its shape
    std::size_t shard;                ///< index into shards()
    SafetensorsHeader::Entry entry;   ///< its entry in its shard's header

    /// The element count: the product of the shape.
    std::size_t numel() const {
      std::size_t n = 1;
      for (const auto extent : shape) n *= static_cast<std::size_t>(extent);
      return n;
    }
  };

  /// Opens `path`. The files of a folder (the index and its shards) are all opened relative to the
  /// folder opened once, so that a folder replaced meanwhile (an output written again, see
  /// detail::write_folder_atomically) is read whole, the old one or the new one, never a mix: where a
  /// shard has vanished because the folder was replaced, the open starts again on the new folder.
  explicit CheckpointReader(const std::string& path) {
    for (int attempt = 1;; ++attempt) {
      try {
        open(path);
        return;
      } catch (const FolderReplaced&) {
        if (attempt == 8) {
          throw FormatError("polyak: '" + path + "' was replaced each of the 8 times it was opened");
        }
        *this = CheckpointReader();
      }
    }
  }
  /// Movable (the open files move with it).
  CheckpointReader(CheckpointReader&&) = default;
  /// Movable.
  CheckpointReader& operator=(CheckpointReader&&) = default;

  /// Whether it is a sharded checkpoint (an index and its shards) rather than one file.
  bool sharded() const noexcept { return sharded_; }
  /// The shard file names (for one file: its own name), sorted.
  const std::vector<std::string>& shards() const noexcept { return shard_names_; }
  /// Every tensor: shard after shard, each in its data order.
  const std::vector<Tensor>& tensors() const noexcept { return tensors_; }
  /// The index's "metadata" object (as strings) or the file's __metadata__.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// The __metadata__ of shard `shard` (for one file: metadata()).
  const std::map<std::string, std::string>& shard_metadata(std::size_t shard) const {
    return shard_metadata_.at(shard);
  }
  /// The path it was opened from: the file, or the index.
  const std::string& path() const noexcept { return path_; }
  /// Every file this checkpoint reads: the index (if sharded), then the shards.
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    if (sharded_) out.push_back(path_);
    out.insert(out.end(), shard_paths_.begin(), shard_paths_.end());
    return out;
  }

  /// Whether every file it has open is as it was when opened (SafetensorsReader::unchanged; a
  /// shard opened again is checked as it opens). A merge checks this before it keeps what it wrote:
  /// a checkpoint written over in place while it was read is refused, not merged mixed.
  bool unchanged() const {
    return std::all_of(readers_.begin(), readers_.end(), [](const auto& r) { return r->unchanged(); });
  }

  /// The tensor named `name`; nullptr when there is none.
  const Tensor* find(const std::string& name) const {
    const auto found = by_name_.find(name);
    return found == by_name_.end() ? nullptr : &tensors_[found->second];
  }

  /// Reads `length` bytes of `tensor` from byte `offset` of its data on into `out`: a piece of a large
  /// tensor, for readers that stream.
  void read_bytes(const Tensor& tensor, std::uint64_t offset, std::size_t length, std::byte* out) {
    reader(tensor.shard).read_bytes(tensor.entry, offset, length, out);
  }
  /// Reads `tensor` whole.
  StoredTensor read(const Tensor& tensor) { return reader(tensor.shard).read(tensor.entry); }

  /// How many shard files a reader keeps open at once: the least recently read is closed past it, and
  /// opened again (in the folder opened first, and checked to be the same version of the same file)
  /// when read again, so that a merge of many inputs of hundreds of shards stays within the system's
  /// open-file limit. A checkpoint of more shards than this that is written again while it is read
  /// is refused at the first closed shard (FormatError), never read mixed.
  static constexpr std::size_t max_open_shards = 16;

 private:
  CheckpointReader() = default;

  /// A shard vanished because its folder was replaced while it was being opened.
  struct FolderReplaced {};

  static bool ends_with(const std::string& text, const std::string& end) {
    return text.size() >= end.size() && text.compare(text.size() - end.size(), end.size(), end) == 0;
  }

  void open(const std::string& path) {
    namespace fs = std::filesystem;
    detail::FileDescriptor folder(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (folder) {  // a folder: its index, else its model.safetensors
      const std::string index_path = (fs::path(path) / detail::sharded_index_name).string();
      detail::FileDescriptor index(
          ::openat(folder.get(), detail::sharded_index_name, O_RDONLY | O_CLOEXEC | O_NONBLOCK));
      if (index) {
        open_index(std::move(folder), std::move(index), path, index_path);
        return;
      }
      const std::string file = (fs::path(path) / "model.safetensors").string();
      detail::FileDescriptor single(
          ::openat(folder.get(), "model.safetensors", O_RDONLY | O_CLOEXEC | O_NONBLOCK));
      if (!single && replaced(folder.get(), path)) throw FolderReplaced{};  // (emptied while replaced)
      if (!single) {
        throw FormatError("polyak: '" + path + "' holds neither " + detail::sharded_index_name +
                          " nor model.safetensors");
      }
      open_file(single.release(), file);
      return;
    }
    if (!ends_with(path, ".json")) {
      open_file(-1, path);
      return;
    }
    const fs::path parent = fs::path(path).parent_path();
    const std::string folder_path = parent.empty() ? "." : parent.string();
    folder = detail::FileDescriptor(::open(folder_path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!folder)
      throw FormatError("polyak: cannot open the folder of '" + path + "': " + std::strerror(errno));
    const std::string name = fs::path(path).filename().string();
    detail::FileDescriptor index(::openat(folder.get(), name.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    if (!index) throw FormatError("polyak: cannot open '" + path + "': " + std::strerror(errno));
    open_index(std::move(folder), std::move(index), folder_path, path);
  }

  /// One file (`fd` open, or -1 to open `file`).
  void open_file(int fd, const std::string& file) {
    path_ = file;
    const std::size_t slash = file.find_last_of('/');
    shard_names_.push_back(slash == std::string::npos ? file : file.substr(slash + 1));
    add_shard(fd >= 0 ? std::make_unique<SafetensorsReader>(fd, file)
                      : std::make_unique<SafetensorsReader>(file));
    metadata_ = readers_.front()->header().metadata;
  }

  /// An index open as `index` in the folder open as `folder` (named `folder_path`), and its shards.
  void open_index(detail::FileDescriptor folder, detail::FileDescriptor index, const std::string& folder_path,
                  const std::string& index_path) {
    folder_ = std::move(folder);
    path_ = index_path;
    sharded_ = true;
    std::string content;
    {
      struct stat info {};
      if (::fstat(index.get(), &info) != 0) detail::fail_io("cannot stat", index_path);
      if (!S_ISREG(info.st_mode)) throw FormatError("polyak: '" + index_path + "' is not a regular file");
      if (static_cast<std::uint64_t>(info.st_size) > detail::max_header_bytes) {
        throw FormatError("polyak: '" + index_path + "': the index holds " + std::to_string(info.st_size) +
                          " bytes, over the 100 MB limit of a header");
      }
      content.resize(static_cast<std::size_t>(info.st_size));
      if (!detail::pread_all(index.get(), content.data(), content.size(), 0, index_path))
        throw FormatError("polyak: '" + index_path +
                          "': the file ends early (truncated while it was opened?)");
    }
    const auto bad = [&](const std::string& why) {
      throw FormatError("polyak: '" + index_path + "': " + why);
    };
    detail::ShardIndexEvents parsed;
    detail::parse_json(content.data(), content.size(), "polyak: '" + index_path + "': ", "index", parsed,
                       /*leading_space=*/true);
    if (!parsed.has_weight_map) bad("not a JSON object with a \"weight_map\" object");
    metadata_ = std::move(parsed.metadata);
    std::unordered_map<std::string, std::string> shard_of;  // tensor -> shard file
    std::set<std::string> shards;                           // sorted: model-00001-of-00002... in order
    for (auto& [name, file] : parsed.weight_map) {          // (moved from: parsed is not used again)
      if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
          file.find('\\') != std::string::npos || file.find('\0') != std::string::npos) {
        bad("shard " + detail::json_quoted(file) + " is not a plain file name in the index's folder");
      }
      shards.insert(file);
      shard_of.emplace(std::move(name), std::move(file));
    }
    if (shards.empty()) bad("the weight_map names no tensor");
    shard_names_.assign(shards.begin(), shards.end());
    for (const auto& file : shard_names_) {
      const std::string shard_path = (std::filesystem::path(folder_path) / file).string();
      detail::FileDescriptor fd(::openat(folder_.get(), file.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
      if (!fd && errno == ENOENT && replaced(folder_.get(), folder_path)) throw FolderReplaced{};
      detail::FileVersion version;
      if (fd) detail::file_version(fd.get(), version);
      versions_.push_back(version);
      add_shard(std::make_unique<SafetensorsReader>(fd.release(), shard_path));
      close_least_recent(readers_.size() - 1);
    }
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
    if (shard_of.size() != tensors_.size()) {  // (every tensor is in the weight_map: checked above)
      for (const auto& [name, file] : shard_of) {
        if (!by_name_.count(name)) bad("'" + name + "' is not in its shard '" + file + "'");
      }
    }
  }

  /// Whether the folder open as `folder` is no longer the one at `folder_path`.
  static bool replaced(int folder, const std::string& folder_path) {
    struct stat open_one {
    }, now{};
    if (::fstat(folder, &open_one) != 0) return false;
    if (::stat(folder_path.c_str(), &now) != 0) return true;
    return open_one.st_dev != now.st_dev || open_one.st_ino != now.st_ino;
  }

  void add_shard(std::unique_ptr<SafetensorsReader> reader) {
    shard_paths_.push_back(reader->path());
    shard_metadata_.push_back(reader->header().metadata);
    last_read_.push_back(++clock_);
    readers_.push_back(std::move(reader));
    const std::size_t shard = readers_.size() - 1;
    for (const auto& entry : readers_.back()->header().entries) {
      if (by_name_.count(entry.name)) {
        throw FormatError("polyak: tensor '" + entry.name + "' is in two shards of '" + path_ + "'");
      }
      by_name_[entry.name] = tensors_.size();
      tensors_.push_back({entry.name, entry.dtype, entry.shape, shard, entry});
    }
  }

  /// Shard `shard`'s reader, opened again if it was closed.
  SafetensorsReader& reader(std::size_t shard) {
    if (!readers_[shard]->file_open()) {
      detail::FileDescriptor fd(
          ::openat(folder_.get(), shard_names_[shard].c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
      detail::FileVersion version;
      if (!fd || !detail::file_version(fd.get(), version) || version != versions_[shard]) {
        throw FormatError("polyak: '" + shard_paths_[shard] +
                          "' changed or went since its checkpoint was opened (the checkpoint was written "
                          "again meanwhile?): open it again");
      }
      readers_[shard]->reopen(fd.release());
    }
    last_read_[shard] = ++clock_;
    close_least_recent(shard);
    return *readers_[shard];
  }

  /// Closes the least recently read shards (but `keep`) while more than max_open_shards are open.
  void close_least_recent(std::size_t keep) {
    for (;;) {
      std::size_t open = 0, oldest = readers_.size();
      for (std::size_t s = 0; s < readers_.size(); ++s) {
        if (!readers_[s]->file_open()) continue;
        ++open;
        if (s != keep && (oldest == readers_.size() || last_read_[s] < last_read_[oldest])) oldest = s;
      }
      if (open <= max_open_shards || oldest == readers_.size()) return;
      readers_[oldest]->close_file();
    }
  }

  std::string path_;
  bool sharded_ = false;
  detail::FileDescriptor folder_;  // a sharded checkpoint's folder, open: its shards are opened in it
  std::vector<std::string> shard_names_, shard_paths_;
  std::vector<std::map<std::string, std::string>> shard_metadata_;
  std::vector<detail::FileVersion> versions_;                // each shard file as it was opened
  std::vector<std::unique_ptr<SafetensorsReader>> readers_;  // a shard (its file open or closed)
  std::vector<std::uint64_t> last_read_;
  std::uint64_t clock_ = 0;
  std::vector<Tensor> tensors_;
  std::unordered_map<std::string, std::size_t> by_name_;
  std::map<std::string, std::string> metadata_;
};

namespace detail {

/// The identities of `checkpoint`'s data files (its shards, or its one file; not an index), sorted:
/// two paths name one checkpoint (through links; a folder, its index, its model.safetensors) where
/// these are equal. InvalidArgument where one cannot be reached.
inline std::vector<FileId> data_file_ids(const CheckpointReader& checkpoint) {
  std::vector<FileId> ids;
  const std::vector<std::string> files = checkpoint.files();
  for (std::size_t f = checkpoint.sharded() ? 1 : 0; f < files.size(); ++f) {
    FileId id;
    if (!file_id(files[f], id)) throw InvalidArgument("polyak: cannot stat '" + files[f] + "'");
    ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

/// A sharded checkpoint's index text, built as its shards are written: add() each tensor in order,
/// then text(metadata): {"metadata": {"total_size": the bytes added, metadata's other keys},
/// "weight_map": {tensor: shard file}} (the one writer of that text).
class IndexText {
 public:
  /// Tensor `name`, of `bytes` bytes, is in the shard file `shard`.
  void add(const std::string& name, const std::string& shard, std::uint64_t bytes) {
    weight_map_ +=
        (weight_map_.empty() ? "\n    " : ",\n    ") + json_quoted(name) + ": " + json_quoted(shard);
    total_ += bytes;
  }
  /// The index's text, `metadata` ("total_size" in it ignored: the bytes added) in its "metadata".
  std::string text(const std::map<std::string, std::string>& metadata) const {
    std::string text = "{\n  \"metadata\": {\n    \"total_size\": " + std::to_string(total_);
    for (const auto& [key, value] : metadata) {
      if (key != "total_size") text += ",\n    " + json_quoted(key) + ": " + json_quoted(value);
    }
    return text + "\n  },\n  \"weight_map\": {" + weight_map_ + "\n  }\n}\n";
  }

 private:
  std::string weight_map_;  // (text built in one pass: see json_quoted)
  std::uint64_t total_ = 0;
};

/// What an existing folder holds that a sharded checkpoint writer would not have written ("" for
/// nothing): the folder may be replaced whole only if it is empty, or holds an index that parses and
/// the shards it names, and nothing else (a file of the user's, a subfolder, a shard the index does
/// not name).
inline std::string foreign_in_checkpoint_folder(const std::string& folder) {
  namespace fs = std::filesystem;
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(folder)) {
    if (!entry.is_regular_file() || entry.is_symlink())
      return "holds '" + entry.path().filename().string() +
             "', which is not a file a checkpoint writer makes";
    names.push_back(entry.path().filename().string());
  }
  if (names.empty()) return {};
  std::set<std::string> ours{sharded_index_name};
  try {
    const std::string index_path = (fs::path(folder) / sharded_index_name).string();
    FileDescriptor index(::open(index_path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    struct stat info {};
    if (!index) return "holds '" + names.front() + "' and no " + sharded_index_name + " naming it";
    if (::fstat(index.get(), &info) != 0 || !S_ISREG(info.st_mode) ||
        static_cast<std::uint64_t>(info.st_size) > max_header_bytes) {
      return "holds no readable " + std::string(sharded_index_name);
    }
    std::string text(static_cast<std::size_t>(info.st_size), '\0');
    if (!pread_all(index.get(), text.data(), text.size(), 0, index_path))
      return "holds no readable " + std::string(sharded_index_name);
    ShardIndexEvents parsed;
    parse_json(text.data(), text.size(), "", "index", parsed, /*leading_space=*/true);
    for (const auto& [tensor, shard] : parsed.weight_map) {
      if (shard.size() > 12 && shard.compare(shard.size() - 12, 12, ".safetensors") == 0) ours.insert(shard);
    }
  } catch (const std::exception&) {
    return "holds an " + std::string(sharded_index_name) + " that does not parse";
  }
  for (const auto& name : names) {
    if (!ours.count(name)) return "holds '" + name + "', which its " + sharded_index_name + " does not name";
  }
  return {};
}

/// Writes tensors as `layout` is laid out: one safetensors file at `out` (layout not sharded), or,
/// for a sharded layout, a folder `out` of shards with the same file names and tensors and its
/// model.safetensors.index.json. `writer_of(tensor)` gives each tensor's TensorWriter. Metadata: a
/// file's or shard's own (from the same file of `layout`: {"format": "pt"}, which transformers'
/// loader needs), the index's "metadata" with "total_size" of the new tensors; `extra` is added to
/// each, and the keys `dropped` are left out of each. Written atomically, the folder whole
/// (write_folder_atomically): an existing `out` is replaced only at the end, and only if it is a sharded
/// checkpoint and nothing else (foreign_in_checkpoint_folder; else refused).
template <class WriterOf>
void write_checkpoint_like(const CheckpointReader& layout, const std::string& out,
                           const std::map<std::string, std::string>& extra,
                           const std::vector<std::string>& dropped, WriterOf&& writer_of) {
  const auto with_extra = [&](std::map<std::string, std::string> metadata) {
    for (const auto& key : dropped) metadata.erase(key);
    for (const auto& [key, value] : extra) metadata[key] = value;
    return metadata;
  };
  if (!layout.sharded()) {
    check_file_destination("polyak: writing '" + out + "'", out);  // (before the merge, not after)
    std::vector<TensorWriter> writers;
    for (const auto& tensor : layout.tensors()) writers.push_back(writer_of(tensor));
    write_safetensors(out, with_extra(layout.metadata()), writers);
    return;
  }
  const std::string folder =
      folder_destination("polyak: writing '" + out + "'", out, foreign_in_checkpoint_folder);
  write_folder_atomically(
      folder,
      [&](const std::string& temporary) {
        IndexText index;
        for (std::size_t shard = 0; shard < layout.shards().size(); ++shard) {
          std::vector<TensorWriter> writers;
          for (const auto& tensor : layout.tensors()) {
            if (tensor.shard != shard) continue;
            writers.push_back(writer_of(tensor));
            index.add(tensor.name, layout.shards()[shard], writers.back().size);
          }
          write_safetensors((std::filesystem::path(temporary) / layout.shards()[shard]).string(),
                            with_extra(layout.shard_metadata(shard)), writers);
        }
        const std::string text = index.text(with_extra(layout.metadata()));
        write_atomically(
            (std::filesystem::path(temporary) / sharded_index_name).string(),
            [&](int fd, const std::string& file) { write_all(fd, text.data(), text.size(), file); });
      },
      foreign_in_checkpoint_folder);
}

}  // namespace detail

}  // namespace polyak
