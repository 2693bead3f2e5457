// SPDX-License-Identifier: MIT
// Checkpoints on disk: StateDict (polyak/checkpoint/state_dict.hpp) in the safetensors format.
//
// safetensors (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
// N, N bytes of JSON ({"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
// ..., "__metadata__": {"key": "value"}}), then the tensors' bytes, little-endian and row-major,
// offsets counted from the end of the header. Python's safetensors and a plain json + numpy reader
// both read what save_safetensors writes.
#pragma once

#include <algorithm>  // std::sort
#include <cstddef>
#include <cerrno>
#include <cstdint>
#include <cstring>     // std::memchr: a NUL in a header; std::strerror
#include <functional>  // std::function
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <fcntl.h>     // open, openat
#include <sys/stat.h>  // fstat

#include "polyak/checkpoint/detail/files.hpp"
#include "polyak/checkpoint/detail/json_headers.hpp"
#include "polyak/core/error.hpp"
#include "polyak/checkpoint/state_dict.hpp"

namespace polyak {

namespace detail {

/// One tensor of a file being written: its header entry, and how to write its bytes.
struct TensorWriter {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t size;                                          // bytes
  std::function<void(int fd, const std::string& path)> write;  // writes exactly `size` bytes
};

/// The bytes a safetensors file of `tensors` (in this order, their data back to back) begins with:
/// the 8-byte little-endian header length, then the JSON header padded with spaces so that the
/// data starts 8-byte aligned. Every writer of the format builds its header here.
inline std::string safetensors_prefix(const std::map<std::string, std::string>& metadata,
                                      const std::vector<TensorWriter>& tensors) {
  if (!little_endian()) throw RuntimeError("polyak::save_safetensors: big-endian hosts are not supported");
  // The text nlohmann::ordered_json's dump() gives, built in one pass (linear in the tensor count).
  std::string text = "{";
  if (!metadata.empty()) {
    text += "\"__metadata__\":{";
    for (const auto& [key, value] : metadata) {
      if (text.back() != '{') text += ',';
      text += json_quoted(key) + ':' + json_quoted(value);
    }
    text += '}';
  }
  std::uint64_t offset = 0;
  for (const auto& tensor : tensors) {
    if (text.size() > 1) text += ',';
    text += json_quoted(tensor.name) + ":{\"dtype\":\"" + dtype_name(tensor.dtype) + "\",\"shape\":[";
    for (std::size_t d = 0; d < tensor.shape.size(); ++d)
      text += (d == 0 ? "" : ",") + std::to_string(tensor.shape[d]);
    text +=
        "],\"data_offsets\":[" + std::to_string(offset) + ',' + std::to_string(offset + tensor.size) + "]}";
    offset += tensor.size;
  }
  text += '}';
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string prefix(8, '\0');
  for (int b = 0; b < 8; ++b) prefix[static_cast<std::size_t>(b)] = static_cast<char>(text.size() >> (8 * b));
  return prefix + text;
}

/// Writes a safetensors file atomically (write_atomically): the header of `tensors`, then each
/// one's bytes from its writer.
inline void write_safetensors(const std::string& path, const std::map<std::string, std::string>& metadata,
                              const std::vector<TensorWriter>& tensors) {
  const std::string prefix = safetensors_prefix(metadata, tensors);
  write_atomically(path, [&](int fd, const std::string& temporary) {
    write_all(fd, prefix.data(), prefix.size(), temporary);
    for (const auto& tensor : tensors) tensor.write(fd, temporary);
  });
}

/// A writer for each entry of `sd`, owned or borrowed: a borrowed column-major tensor is reordered
/// in pieces as it is written, so a save holds no second copy of any tensor.
inline std::vector<TensorWriter> writers_of(const StateDict& sd) {
  std::vector<TensorWriter> writers;
  for (const auto& [name, tensor] : sd) {
    const StoredTensor* t = &tensor;
    writers.push_back({name, t->dtype, t->shape, t->byte_size(), [t](int fd, const std::string& path) {
                         t->for_each_chunk([&](const std::byte* data, std::size_t length) {
                           write_all(fd, data, length, path);
                         });
                       }});
  }
  return writers;
}

}  // namespace detail

/// Writes `sd` to `path` in the safetensors format, atomically: into a temporary file in the same
/// folder, flushed and fsynced, renamed over `path`, the folder fsynced. A crash at any moment
/// leaves either the previous file or the new one, whole; a reader that opened the file before the
/// rename keeps reading the old one whole (SafetensorsReader, load_safetensors).
///
/// Temporaries are named "<path>.tmp.<pid>.<n>", unique to each call, so threads and processes
/// saving the same path at once all succeed (the last rename wins). A save that fails removes its
/// temporary; a process killed mid-save cannot, and leaves it behind: nothing ever reads these
/// files, and they may be deleted whenever no save to `path` is running (`rm <path>.tmp.*`).
///
/// A `path` that is a symbolic link is replaced by a regular file (rename replaces the link, not
/// the file it points to); save to the link's target to keep the link.
///
/// Entries borrowed from a live object (state_dict() of an AveragedModel) are streamed from its
/// memory: the save's memory beyond the object's own is the header and, for a column-major
/// tensor, a 64 KiB buffer. The object must not change during the save.
inline void save_safetensors(const std::string& path, const StateDict& sd) {
  detail::write_safetensors(path, sd.metadata, detail::writers_of(sd));
}

/// Refuses (InvalidArgument, naming both) an output path `out` that is one of `inputs` or a folder
/// holding one, compared by identity (device and inode, through links): call it with every file a
/// tool reads before it writes anything. polyak's own writers of derived checkpoints (the merges,
/// post-hoc EMA) do.
inline void check_output_apart(const std::string& out, const std::vector<std::string>& inputs) {
  detail::check_output_apart("polyak", out, inputs);
}

/// A safetensors file's header, checked, without its data: what the streaming readers use.
struct SafetensorsHeader {
  /// One tensor's entry.
  struct Entry {
    std::string name;                 ///< its name
    DType dtype;                      ///< its scalar type
    std::vector<std::int64_t> shape;  ///< its shape
    std::uint64_t begin;              ///< where its bytes begin in the data
    std::uint64_t end;                ///< where they end

    /// Every field equal.
    bool operator==(const Entry& other) const {
      return name == other.name && dtype == other.dtype && shape == other.shape && begin == other.begin &&
             end == other.end;
    }
  };
  std::vector<Entry> entries;                   ///< in data order
  std::map<std::string, std::string> metadata;  ///< the __metadata__ object
  std::uint64_t data_start = 0;                 ///< where the data begins in the file

  /// Every entry, the metadata and the data's start equal.
  bool operator==(const SafetensorsHeader& other) const {
    return entries == other.entries && metadata == other.metadata && data_start == other.data_start;
  }
  /// Not ==.
  bool operator!=(const SafetensorsHeader& other) const { return !(*this == other); }
};

namespace detail {

/// Reads the 8-byte header length of a file of `size` bytes, checking it against the limit and the
/// file's size.
inline std::uint64_t header_length(const std::byte* first8, std::uint64_t size, const std::string& source) {
  if (!little_endian()) throw RuntimeError("polyak: safetensors on big-endian hosts is not supported");
  const std::string prefix = failure_prefix(source);
  if (size < 8) {
    throw FormatError(prefix + "not safetensors: " + std::to_string(size) +
                      " bytes, fewer than the 8 of the header length");
  }
  std::uint64_t length = 0;
  for (int b = 7; b >= 0; --b) length = (length << 8) | static_cast<unsigned char>(first8[b]);
  if (length > max_header_bytes) {
    throw FormatError(prefix + "safetensors header length " + std::to_string(length) +
                      " exceeds the 100 MB limit");
  }
  if (length > size - 8) {
    throw FormatError(prefix + "safetensors header length " + std::to_string(length) +
                      " runs past the end of the " + std::to_string(size) + "-byte file");
  }
  return length;
}

/// Parses and checks the JSON header, for `data_size` bytes of data after it; `source` names the file
/// in messages.
inline SafetensorsHeader parse_header(const char* text, std::uint64_t length, std::uint64_t data_size,
                                      const std::string& source) {
  const std::string prefix = failure_prefix(source);
  SafetensorsHeaderEvents header;
  parse_json(text, length, prefix, "safetensors header", header);
  SafetensorsHeader index;
  index.data_start = 8 + length;
  index.metadata = std::move(header.metadata);
  index.entries.reserve(header.entries.size());
  for (auto& written : header.entries) {
    SafetensorsHeader::Entry e{std::move(written.name), DType::F32, {}, 0, 0};
    auto bad = [&](const std::string& why) {
      throw FormatError(prefix + "safetensors tensor '" + e.name + "': " + why);
    };
    bool known = false;
    for (const DType d : {DType::F32, DType::F64, DType::F16, DType::BF16, DType::I64}) {
      if (written.dtype == dtype_name(d)) {
        e.dtype = d;
        known = true;
      }
    }
    if (!known) bad("unsupported dtype '" + written.dtype + "'");
    std::uint64_t numel = 1;
    for (const std::uint64_t x : written.shape) {
      if (x > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        bad("an extent overflows");
      if (x != 0 && numel > std::numeric_limits<std::uint64_t>::max() / x) bad("the element count overflows");
      numel *= x;
      e.shape.push_back(static_cast<std::int64_t>(x));
    }
    e.begin = written.offsets[0];
    e.end = written.offsets[1];
    if (e.begin > e.end || e.end > data_size) {
      bad("data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] lie outside the " +
          std::to_string(data_size) + " data bytes");
    }
    if (numel > std::numeric_limits<std::uint64_t>::max() / dtype_size(e.dtype) ||
        numel * dtype_size(e.dtype) != e.end - e.begin) {
      bad("its shape and dtype need " + std::to_string(numel) + " elements, its data_offsets hold " +
          std::to_string(e.end - e.begin) + " bytes");
    }
    index.entries.push_back(std::move(e));
  }
  // In data order (the order save_safetensors wrote them in; an empty tensor before the one it
  // shares its offset with). As Python's safetensors requires, the tensors cover the data exactly:
  // the first starts at 0, each where the previous ends, and the last ends with the file.
  std::sort(index.entries.begin(), index.entries.end(), [](const auto& x, const auto& y) {
    return x.begin != y.begin ? x.begin < y.begin : x.end < y.end;
  });
  std::uint64_t covered = 0;
  for (std::size_t i = 0; i < index.entries.size(); ++i) {
    const auto& e = index.entries[i];
    if (e.begin < covered) {
      throw FormatError(prefix + "safetensors tensors '" + index.entries[i - 1].name + "' and '" + e.name +
                        "' overlap");
    }
    if (e.begin > covered) {
      throw FormatError(prefix + "safetensors tensor '" + e.name + "' starts at data byte " +
                        std::to_string(e.begin) + ", leaving a gap after byte " + std::to_string(covered));
    }
    covered = e.end;
  }
  if (covered != data_size) {
    throw FormatError(prefix + "safetensors file has " + std::to_string(data_size - covered) +
                      " bytes after the last tensor");
  }
  return index;
}

}  // namespace detail

/// Parses safetensors bytes, trusting nothing: any problem is a FormatError naming it.
inline StateDict parse_safetensors(const std::byte* data, std::size_t size) {
  const std::uint64_t length = detail::header_length(data, size, "");
  const SafetensorsHeader index =
      detail::parse_header(reinterpret_cast<const char*>(data + 8), length, size - 8 - length, "");
  StateDict sd;
  sd.metadata = index.metadata;
  for (const auto& e : index.entries) {
    StoredTensor t;
    t.dtype = e.dtype;
    t.shape = e.shape;
    t.bytes.assign(data + index.data_start + e.begin, data + index.data_start + e.end);
    sd.insert(e.name, std::move(t));
  }
  return sd;
}

class CheckpointReader;

/// One safetensors file, opened once: its header read and checked at construction, its tensors read
/// on request from the same open file. A save that replaces the path meanwhile (save_safetensors
/// renames a new file over it) cannot mix two files: this reader keeps reading the one it opened.
class SafetensorsReader {
 public:
  /// Opens `path` and reads its header; a missing, truncated, oversized or malformed file is a
  /// FormatError naming the file and the problem.
  explicit SafetensorsReader(std::string path) : path_(std::move(path)) {
    // (O_NONBLOCK: a FIFO or device named like a checkpoint is refused below rather than waited on)
    fd_ = detail::FileDescriptor(::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    read_header();
  }

  /// Reads the file open as `fd`, which it takes over (and closes); `path` names it in messages. For
  /// readers that open a folder's files relative to the folder (CheckpointReader).
  SafetensorsReader(int fd, std::string path) : path_(std::move(path)), fd_(fd) { read_header(); }

  /// The file's path, as given.
  const std::string& path() const noexcept { return path_; }
  /// Its header, checked.
  const SafetensorsHeader& header() const noexcept { return header_; }

  /// Whether the file's bytes are as they were when this reader opened it, as far as the system
  /// says: its identity, size and time of last modification (a write in place changes them; a new
  /// file renamed over its path, or an unlink, changes only its inode's change time, and the bytes
  /// this reader reads stay the old ones). A reader that copied its tensors checks this before it
  /// keeps what it wrote. True while the file is closed (CheckpointReader checks a shard it opens
  /// again).
  bool unchanged() const {
    detail::FileVersion now;
    return !fd_ || (detail::file_version(fd_.get(), now) && now.id == opened_.id &&
                    now.size == opened_.size && now.modified_ns == opened_.modified_ns);
  }

  /// Reads one tensor of header().
  StoredTensor read(const SafetensorsHeader::Entry& entry) {
    StoredTensor t;
    t.dtype = entry.dtype;
    t.shape = entry.shape;
    t.bytes.reserve(entry.end - entry.begin);
    detail::advise_huge_pages(t.bytes.data(), entry.end - entry.begin);  // (before the first touch)
    t.bytes.resize(entry.end - entry.begin);
    read_bytes(entry, 0, t.bytes.size(), t.bytes.data());
    return t;
  }

  /// Reads `length` bytes of one tensor of header(), from byte `offset` of its data on, into `out`:
  /// a piece of a large tensor, for readers that stream (polyak/checkpoint/merge.hpp).
  void read_bytes(const SafetensorsHeader::Entry& entry, std::uint64_t offset, std::size_t length,
                  std::byte* out) {
    if (offset > entry.end - entry.begin || length > entry.end - entry.begin - offset) {
      throw InvalidArgument("polyak::SafetensorsReader::read_bytes: bytes [" + std::to_string(offset) +
                            ", +" + std::to_string(length) + ") lie outside tensor '" + entry.name + "'");
    }
    if (!detail::pread_all(fd_.get(), out, length, header_.data_start + entry.begin + offset, path_)) {
      throw FormatError("polyak: '" + path_ + "': cannot read tensor '" + entry.name +
                        "': the file ends before it (truncated since it was opened?)");
    }
  }

  /// Reads the tensor named `name`; FormatError when the file has none.
  StoredTensor read(const std::string& name) {
    for (const auto& entry : header_.entries) {
      if (entry.name == name) return read(entry);
    }
    throw FormatError("polyak: '" + path_ + "' has no tensor '" + name + "'");
  }

 private:
  friend class CheckpointReader;  // which keeps few of a checkpoint's shards open at once

  void close_file() noexcept { fd_.reset(); }
  bool file_open() const noexcept { return static_cast<bool>(fd_); }
  /// Takes over `fd`: this file opened again, which the caller checked is the same version (its
  /// header is not read again).
  void reopen(int fd) noexcept { fd_ = detail::FileDescriptor(fd); }

  void read_header() {
    if (!fd_) throw FormatError("polyak: cannot open '" + path_ + "': " + std::strerror(errno));
    detail::file_version(fd_.get(), opened_);
    struct stat info {};
    if (::fstat(fd_.get(), &info) != 0) detail::fail_io("cannot stat", path_);
    if (!S_ISREG(info.st_mode)) throw FormatError("polyak: '" + path_ + "' is not a regular file");
    const auto size = static_cast<std::uint64_t>(info.st_size);
    std::byte first8[8] = {};
    if (size >= 8 && !detail::pread_all(fd_.get(), first8, 8, 0, path_)) size_changed();
    const std::uint64_t length = detail::header_length(first8, size, path_);
    std::string text(length, '\0');
    if (!detail::pread_all(fd_.get(), text.data(), length, 8, path_)) size_changed();
    header_ = detail::parse_header(text.data(), length, size - 8 - length, path_);
  }
  [[noreturn]] void size_changed() const {
    throw FormatError("polyak: '" + path_ + "': the file ends early (truncated while it was opened?)");
  }

  std::string path_;
  detail::FileDescriptor fd_;
  detail::FileVersion opened_;  // the file as it was opened
  SafetensorsHeader header_;
};

/// Reads only the header of a safetensors file, checked as load_safetensors checks it.
inline SafetensorsHeader read_safetensors_header(const std::string& path) {
  return SafetensorsReader(path).header();
}

/// Reads a safetensors file: its header checked as parse_safetensors checks it, then each tensor's
/// bytes straight into its StoredTensor, all from one open file. A truncated, oversized or
/// malformed file is a FormatError.
inline StateDict load_safetensors(const std::string& path) {
  SafetensorsReader reader(path);
  StateDict sd;
  sd.metadata = reader.header().metadata;
  for (const auto& entry : reader.header().entries) sd.insert(entry.name, reader.read(entry));
  return sd;
}

}  // namespace polyak
