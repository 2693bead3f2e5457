// SPDX-License-Identifier: MIT
// What the tests share: a temporary folder of their own (under the system's temporary directory,
// unique to the process and to each call, removed when done), a file's bytes, members of a
// ThreadCommunicator on threads, a rank's small model, and a body run under a limit on threads.
#pragma once

#include <atomic>
#include <chrono>
#include <csignal>  // kill
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>  // setrlimit
#include <sys/wait.h>      // waitpid
#include <unistd.h>        // getpid, fork, setuid

#include <Eigen/Core>

#include "polyak/core/communicator.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak_test {

/// A fresh folder under the temporary directory, unique to this process and call, removed (with
/// everything in it) when the object goes: CTest runs test cases in parallel processes.
class TemporaryFolder {
 public:
  explicit TemporaryFolder(const std::string& name) {
    static std::atomic<int> made{0};
    path_ = std::filesystem::temp_directory_path() /
            ("polyak_" + name + "_" + std::to_string(::getpid()) + "_" + std::to_string(++made));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  TemporaryFolder(const TemporaryFolder&) = delete;
  TemporaryFolder& operator=(const TemporaryFolder&) = delete;
  ~TemporaryFolder() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }

  /// The folder itself.
  std::string path() const { return path_.string(); }
  /// A path inside it.
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

/// A path in a temporary folder of this process's own (removed when the process ends).
inline std::string temporary_path(const std::string& name) {
  static const TemporaryFolder folder("tests");
  return folder / name;
}

/// The bytes of a file ("" for a missing one).
inline std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// Writes `bytes` as the whole file.
inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// A rank's model in the averaging tests: a matrix and a vector.
struct RankModel {
  Eigen::MatrixXf weight = Eigen::MatrixXf::Zero(3, 2);
  Eigen::VectorXf bias = Eigen::VectorXf::Zero(4);
  polyak::ParameterList<float> list() {
    polyak::ParameterList<float> out;
    out.add("weight", weight).add("bias", bias);
    return out;
  }
};

/// Runs body(member) on `size` threads, each a member of one ThreadCommunicator; returns each
/// thread's exception message ("" if none). (Catch2's assertions are not thread-safe: bodies record,
/// the test checks after the join.)
inline std::vector<std::string> on_threads(int size,
                                           const std::function<void(polyak::ThreadCommunicator&)>& body) {
  auto members = polyak::ThreadCommunicator::create(size);
  std::vector<std::string> errors(static_cast<std::size_t>(size));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(members[static_cast<std::size_t>(r)]);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

/// How a body run by with_thread_limit ended.
enum class Limited {
  passed,       ///< it returned true
  failed,       ///< it returned false or threw
  crashed,      ///< it died (std::terminate, a signal)
  hung,         ///< it had not ended after the seconds allowed (killed)
  not_limited,  ///< the limit could not be imposed (root that cannot become nobody): not run
};

/// Runs body() in a child process whose user may hold at most `threads` threads (RLIMIT_NPROC, as a
/// container's pids limit or `ulimit -u` sets it; a root child first becomes user nobody, whom the
/// limit binds, where root ignores it). The child ends with _exit: no exit handlers (LeakSanitizer
/// would need a thread). The body must not use Catch's assertions (another process); it reports by
/// its return value; one that has not ended after `seconds` is killed.
inline Limited with_thread_limit(rlim_t threads, const std::function<bool()>& body, int seconds = 60) {
  const pid_t child = ::fork();
  if (child < 0) return Limited::not_limited;
  if (child == 0) {
    if (::geteuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) ::_exit(77);
    const rlimit limit{threads, threads};
    if (::geteuid() == 0 || ::setrlimit(RLIMIT_NPROC, &limit) != 0) ::_exit(77);
    bool ok = false;
    try {
      ok = body();
    } catch (...) {
    }
    ::_exit(ok ? 0 : 1);
  }
  int status = 0;
  for (int waited_ms = 0; ::waitpid(child, &status, WNOHANG) == 0; waited_ms += 10) {
    if (waited_ms >= 1000 * seconds) {
      ::kill(child, SIGKILL);
      ::waitpid(child, &status, 0);
      return Limited::hung;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!WIFEXITED(status)) return Limited::crashed;
  if (WEXITSTATUS(status) == 77) return Limited::not_limited;
  return WEXITSTATUS(status) == 0 ? Limited::passed : Limited::failed;
}

}  // namespace polyak_test
