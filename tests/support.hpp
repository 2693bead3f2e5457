// SPDX-License-Identifier: MIT
// What the tests share: a temporary folder of their own (under the system's temporary directory,
// unique to the process and to each call, removed when done), a file's bytes, members of a
// ThreadCommunicator on threads, and a rank's small model.
#pragma once

#include <atomic>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>  // getpid

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

}  // namespace polyak_test
