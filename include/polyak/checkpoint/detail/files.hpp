// SPDX-License-Identifier: MIT
// POSIX files for the checkpoint layer: reading and writing whole (pread, write, pwrite); the one way
// polyak writes an output a user sees, a file or a folder of files: written beside its destination
// under a temporary name, fsynced, and put in place by one rename, an existing output replaced only
// at that last step; and file identity (device and inode, through symbolic links), by which every
// writer keeps its output apart from its inputs.
//
// What a crash leaves: the old output or the new one, whole, at the destination; beside it, possibly
// the temporary of the write that was interrupted ("<destination>.tmp.<pid>.<n>"), which nothing reads
// and which may be deleted whenever no write to that destination is running.
#pragma once

#if !defined(__unix__) && !defined(__APPLE__)
#error \
    "polyak's checkpoint layer writes files atomically with POSIX calls (open, fsync, rename): \
this platform is not POSIX. The core (polyak/polyak.hpp) does not need it."
#endif

#include <atomic>  // the counter that makes each temporary's name unique
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>   // std::rename
#include <cstring>  // std::strerror
#include <filesystem>
#include <string>
#include <system_error>
#include <utility>  // std::exchange
#include <vector>

#include <fcntl.h>     // open: fsync needs a file descriptor
#include <sys/stat.h>  // stat, mkdir
#include <unistd.h>    // write, pwrite, fsync, close, getpid
#if defined(__linux__)
#include <sys/syscall.h>  // renameat2: RENAME_EXCHANGE replaces a folder in one step
#include <sys/mman.h>     // madvise: tensors read into huge pages
#endif

#include "polyak/core/error.hpp"

namespace polyak {
namespace detail {

[[noreturn]] inline void fail_io(const std::string& what, const std::string& path) {
  throw RuntimeError("polyak: " + what + " '" + path + "': " + std::strerror(errno));
}

/// pwrite until all `size` bytes are at `offset`.
inline void pwrite_all(int fd, const void* data, std::size_t size, std::uint64_t offset,
                       const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t written = ::pwrite(fd, p, size, static_cast<off_t>(offset));
    if (written < 0) {
      if (errno == EINTR) continue;
      fail_io("cannot write", path);
    }
    p += written;
    size -= static_cast<std::size_t>(written);
    offset += static_cast<std::uint64_t>(written);
  }
}

/// pread until all `size` bytes from `offset` are in `data`; false when the file ends first.
inline bool pread_all(int fd, void* data, std::size_t size, std::uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    const ssize_t got = ::pread(fd, p, size, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      fail_io("cannot read", path);
    }
    if (got == 0) return false;
    p += got;
    size -= static_cast<std::size_t>(got);
    offset += static_cast<std::uint64_t>(got);
  }
  return true;
}

/// An open file descriptor, closed when it goes.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) noexcept : fd_(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept : fd_(other.release()) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = other.release();
    }
    return *this;
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  int release() noexcept { return std::exchange(fd_, -1); }
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

inline void write_all(int fd, const void* data, std::size_t size, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t written = ::write(fd, p, size);
    if (written < 0) {
      if (errno == EINTR) continue;
      fail_io("cannot write", path);
    }
    p += written;
    size -= static_cast<std::size_t>(written);
  }
}

/// "<path>.tmp.<pid>.<n>": unique to each call, so that threads and processes writing the same path
/// at once never share one (O_EXCL and mkdir make sure).
inline std::string temporary_name(const std::string& path) {
  static std::atomic<unsigned long long> writes{0};
  return path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(++writes);
}

/// Makes a rename in the folder of `path` reach the disk.
inline void sync_folder_of(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  const std::string folder = slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
  const int folder_fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (folder_fd >= 0) {
    ::fsync(folder_fd);
    ::close(folder_fd);
  }
}

/// Puts a finished, fsynced temporary file in place: renamed over `path`, the folder fsynced; on
/// failure the temporary is removed and `path` is as it was.
inline void commit_file(const std::string& temporary, const std::string& path) {
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::unlink(temporary.c_str());
    errno = error;
    fail_io("cannot rename onto", path);
  }
  sync_folder_of(path);
}

/// Refuses (InvalidArgument) a destination that a file write would destroy rather than replace: an
/// existing path that is not a regular file (a folder, a device such as /dev/null, a FIFO, a socket;
/// a symbolic link is followed). Absent or a regular file: fine.
inline void check_file_destination(const std::string& who, const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) return;  // nothing there (or a dangling link: replaced)
  if (S_ISREG(info.st_mode)) return;
  throw InvalidArgument(
      who + ": '" + path + "' is " +
      (S_ISDIR(info.st_mode) ? "a folder, and this output is one file" : "not a regular file") +
      "; nothing was written");
}

/// Writes a file atomically: `write(fd, temporary)` fills a temporary file in the same folder, which
/// is fsynced and renamed over `path`, the folder fsynced. A failure (an exception from `write`
/// included) removes the temporary and leaves `path` as it was. A `path` that is a symbolic link is
/// replaced by a regular file (rename replaces the link, not the file it points to); one that is not a
/// regular file (a folder, /dev/null, a FIFO) is refused first (check_file_destination).
template <class Write>
void write_atomically(const std::string& path, Write&& write) {
  check_file_destination("polyak: writing '" + path + "'", path);
  const std::string temporary = temporary_name(path);
  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) fail_io("cannot create", temporary);
  try {
    write(fd, temporary);
    if (::fsync(fd) != 0) fail_io("cannot fsync", temporary);
  } catch (...) {
    ::close(fd);
    ::unlink(temporary.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    ::unlink(temporary.c_str());
    fail_io("cannot close", temporary);
  }
  commit_file(temporary, path);
}

/// A file's identity: its device and inode, through symbolic links. Two paths name the same file
/// exactly when their identities are equal, whatever links, "..", or hard links lie between.
struct FileId {
  std::uint64_t device = 0, inode = 0;
  bool operator==(const FileId& other) const { return device == other.device && inode == other.inode; }
  bool operator!=(const FileId& other) const { return !(*this == other); }
  bool operator<(const FileId& other) const {
    return device < other.device || (device == other.device && inode < other.inode);
  }
};

/// Asks the kernel to back [data, data + size) with transparent huge pages, before its first touch:
/// reading a tensor into fresh memory faults every 4 KiB page in, which on a virtual machine cost more
/// than the read itself (load_safetensors of 1 GB, 4.3 s). Linux only, and only where the system
/// leaves huge pages to madvise (the default); elsewhere, and for tensors under 4 MiB, nothing.
inline void advise_huge_pages(void* data, std::size_t size) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t page = 4096;
  if (size < (std::size_t{4} << 20)) return;
  const auto begin = (reinterpret_cast<std::uintptr_t>(data) + page - 1) & ~(page - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(data) + size) & ~(page - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // (advice only)
#else
  (void)data;
  (void)size;
#endif
}

/// The identity of what `path` names; false when nothing is there (or it cannot be reached).
inline bool file_id(const std::string& path, FileId& id) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) return false;
  id = {static_cast<std::uint64_t>(info.st_dev), static_cast<std::uint64_t>(info.st_ino)};
  return true;
}

/// The identity of the file open as `fd`; false when fstat fails.
inline bool file_id(int fd, FileId& id) {
  struct stat info {};
  if (::fstat(fd, &info) != 0) return false;
  id = {static_cast<std::uint64_t>(info.st_dev), static_cast<std::uint64_t>(info.st_ino)};
  return true;
}

/// A file as it is now: its identity, size and times of last change. An inode number can be reused
/// by a file made after the first was deleted; its change time (ctime, which no user call can set)
/// tells them apart.
struct FileVersion {
  FileId id;
  std::int64_t size = 0, modified_ns = 0, changed_ns = 0;
  bool operator==(const FileVersion& other) const {
    return id == other.id && size == other.size && modified_ns == other.modified_ns &&
           changed_ns == other.changed_ns;
  }
  bool operator!=(const FileVersion& other) const { return !(*this == other); }
};

/// The version of the file open as `fd`; false when fstat fails.
inline bool file_version(int fd, FileVersion& version) {
  struct stat info {};
  if (::fstat(fd, &info) != 0) return false;
  version.id = {static_cast<std::uint64_t>(info.st_dev), static_cast<std::uint64_t>(info.st_ino)};
  version.size = static_cast<std::int64_t>(info.st_size);
#if defined(__APPLE__)
  version.modified_ns =
      static_cast<std::int64_t>(info.st_mtimespec.tv_sec) * 1000000000 + info.st_mtimespec.tv_nsec;
  version.changed_ns =
      static_cast<std::int64_t>(info.st_ctimespec.tv_sec) * 1000000000 + info.st_ctimespec.tv_nsec;
#else
  version.modified_ns = static_cast<std::int64_t>(info.st_mtim.tv_sec) * 1000000000 + info.st_mtim.tv_nsec;
  version.changed_ns = static_cast<std::int64_t>(info.st_ctim.tv_sec) * 1000000000 + info.st_ctim.tv_nsec;
#endif
  return true;
}

/// Refuses (InvalidArgument, naming both, before anything is written) an output `out` that is one of
/// `inputs` (every file an input reads: index, shards, snapshots) or a folder that holds one, at any
/// depth: replacing `out` would destroy that input. Compared by identity, so a symbolic link, a hard
/// link or another spelling of the same path is caught.
inline void check_output_apart(const std::string& who, const std::string& out,
                               const std::vector<std::string>& inputs) {
  FileId target;
  if (!file_id(out, target)) return;  // nothing there yet: nothing to destroy
  namespace fs = std::filesystem;
  for (const auto& input : inputs) {
    std::error_code error;
    fs::path at = fs::weakly_canonical(fs::absolute(input), error);
    if (error) at = fs::absolute(input);
    for (bool itself = true;; itself = false) {  // the input, then each folder above it
      FileId id;
      if (file_id(at.string(), id) && id == target) {
        throw InvalidArgument(who + ": the output '" + out + "' " + (itself ? "is" : "holds") +
                              " the input '" + input +
                              "', which writing it would destroy; nothing was written");
      }
      if (!at.has_relative_path()) break;  // the root
      at = at.parent_path();
    }
  }
}

/// The folder `out` names, checked as a destination that a folder write may create or replace:
/// not "", ".", ".." or the root (which cannot be renamed), not an existing file, and, where it
/// exists, a folder for which `foreign(folder)` finds nothing of the user's ("": it is an output of
/// this kind, which the write replaces whole; else what it holds that is not). Returns `out` without
/// trailing slashes.
template <class Foreign>
std::string folder_destination(const std::string& who, const std::string& out, Foreign&& foreign) {
  namespace fs = std::filesystem;
  std::string path = out;
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const std::string name = fs::path(path).filename().string();
  if (name.empty() || name == "." || name == ".." || path == "/") {
    throw InvalidArgument(who + ": the output folder '" + out +
                          "' cannot be replaced as a whole; name a folder to create or replace");
  }
  std::error_code error;
  const fs::file_status status = fs::status(path, error);
  if (fs::exists(status) && !fs::is_directory(status)) {
    throw InvalidArgument(who + ": the output '" + out + "' is " +
                          (fs::is_regular_file(status) ? "a file" : "not a folder") +
                          ", and this output is a folder");
  }
  if (fs::is_directory(status)) {
    const std::string found = foreign(path);
    if (!found.empty()) {
      throw InvalidArgument(who + ": the output folder '" + out + "' " + found +
                            "; it would be replaced as a whole, so write to a new folder or empty it first");
    }
  }
  return path;
}

/// Renames `from` to `to` as renameat2 with `flags` does; -1 with errno ENOSYS where the system has
/// no renameat2 (then the caller falls back to rename).
inline int rename_with(const std::string& from, const std::string& to, unsigned flags) {
#if defined(__linux__) && defined(SYS_renameat2)
  return static_cast<int>(::syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), flags));
#else
  (void)from;
  (void)to;
  (void)flags;
  errno = ENOSYS;
  return -1;
#endif
}

/// Writes a folder atomically: `fill(temporary)` writes its files into a new folder beside `out`
/// (each with write_atomically, or fsynced otherwise); that folder is fsynced and then takes `out`'s
/// place in one step (Linux's renameat2 RENAME_EXCHANGE, then the old folder removed), so that a
/// reader or a crash sees the old folder whole or the new one whole, never a mix. Two writes to
/// one `out` at once each land whole, the last one staying. `out` must pass folder_destination, and
/// the old folder is checked again once it is out of the way: where `foreign(folder)` then finds
/// something of the user's in it (see folder_destination), the exchange is undone and nothing written.
/// A failure (an exception from `fill` included) removes the temporary and leaves `out` as it was.
/// Where the file system cannot exchange two names (not Linux, or an old kernel), the old folder is
/// renamed aside first and a crash between the two renames leaves `out` missing, the old folder at
/// "<out>.tmp.<pid>.<n>" and the new one beside it. An old folder that cannot be removed after the
/// exchange (its files read-only to this user) stays at "<out>.tmp.<pid>.<n>" too.
template <class Fill, class Foreign>
void write_folder_atomically(const std::string& out, Fill&& fill, Foreign&& foreign) {
  const std::string temporary = temporary_name(out);
  std::error_code error;
  const std::filesystem::path parent = std::filesystem::path(out).parent_path();
  if (!parent.empty() && !std::filesystem::create_directories(parent, error) && error) {
    throw RuntimeError("polyak: cannot create the folder '" + parent.string() + "': " + error.message());
  }
  if (::mkdir(temporary.c_str(), 0755) != 0) fail_io("cannot create the folder", temporary);
  try {
    fill(temporary);
    const int fd = ::open(temporary.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) fail_io("cannot open", temporary);
    const int synced = ::fsync(fd);
    ::close(fd);
    if (synced != 0) fail_io("cannot fsync", temporary);
  } catch (...) {
    std::filesystem::remove_all(temporary, error);
    throw;
  }
  constexpr unsigned no_replace = 1, exchange = 2;  // RENAME_NOREPLACE, RENAME_EXCHANGE
  for (int attempt = 0;; ++attempt) {
    if (rename_with(temporary, out, no_replace) == 0) break;  // `out` did not exist
    if (errno == EEXIST || errno == ENOTEMPTY) {
      if (rename_with(temporary, out, exchange) == 0) {  // `temporary` now holds the old folder
        // Checked again now that it is out of the way: a file added to it meanwhile (a config.json
        // copied in during the write) puts the old folder back and the new one away.
        const std::string found = foreign(temporary);
        if (!found.empty()) {
          rename_with(temporary, out, exchange);
          std::filesystem::remove_all(temporary, error);
          throw InvalidArgument(
              "polyak: writing '" + out + "': while it was written, the old folder came to hold " +
              found.substr(found.find(' ') + 1) + "; it is as it was, and nothing was written");
        }
        std::filesystem::remove_all(temporary, error);
        break;
      }
      if (errno == ENOENT && attempt < 8) continue;  // removed meanwhile: create it
    }
    if (errno == ENOSYS || errno == EINVAL) {  // no exchange here: aside, then in
      const std::string aside = temporary_name(out);
      const bool moved = std::rename(out.c_str(), aside.c_str()) == 0;
      if (std::rename(temporary.c_str(), out.c_str()) != 0) {
        const int failure = errno;
        if (moved) std::rename(aside.c_str(), out.c_str());
        std::filesystem::remove_all(temporary, error);
        errno = failure;
        fail_io("cannot rename a folder onto", out);
      }
      const std::string found = moved ? foreign(aside) : std::string();
      if (!found.empty()) {  // (as above: a file of the user's came meanwhile; all put back)
        std::rename(out.c_str(), temporary.c_str());
        std::rename(aside.c_str(), out.c_str());
        std::filesystem::remove_all(temporary, error);
        throw InvalidArgument(
            "polyak: writing '" + out + "': while it was written, the old folder came to hold " +
            found.substr(found.find(' ') + 1) + "; it is as it was, and nothing was written");
      }
      if (moved) std::filesystem::remove_all(aside, error);
      break;
    }
    const int failure = errno;
    std::filesystem::remove_all(temporary, error);
    errno = failure;
    fail_io("cannot rename a folder onto", out);
  }
  sync_folder_of(out);
}

}  // namespace detail
}  // namespace polyak
