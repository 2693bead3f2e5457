// SPDX-License-Identifier: MIT
// polyak's exceptions. Each derives from the standard exception a caller would catch anyway
// (std::invalid_argument, std::runtime_error) and from polyak::Error, so that one handler can
// catch everything polyak throws, and nothing else.
#pragma once

#include <stdexcept>

namespace polyak {

/// The base of every exception polyak throws on purpose.
class Error {
 public:
  virtual ~Error() = default;
  /// The message: what was refused or failed, and why.
  virtual const char* what() const noexcept = 0;

 protected:
  Error() = default;
  /// (Copyable, as the standard exceptions it comes with.)
  Error(const Error&) = default;
  /// (Assignable, as the standard exceptions it comes with.)
  Error& operator=(const Error&) = default;
};

/// An argument polyak refuses: mismatched models, a setting out of range, a stale view. Nothing
/// was changed.
class InvalidArgument : public std::invalid_argument, public Error {
 public:
  using std::invalid_argument::invalid_argument;
  /// The message (the standard exception's).
  const char* what() const noexcept override { return std::invalid_argument::what(); }
};

/// A checkpoint file or state that is not valid, or does not hold what was asked of it. Nothing
/// was changed.
class FormatError : public std::runtime_error, public Error {
 public:
  using std::runtime_error::runtime_error;
  /// The message (the standard exception's).
  const char* what() const noexcept override { return std::runtime_error::what(); }
};

/// A failure of the system under polyak: a file that cannot be written, an MPI call that failed,
/// a worker thread that threw.
class RuntimeError : public std::runtime_error, public Error {
 public:
  using std::runtime_error::runtime_error;
  /// The message (the standard exception's).
  const char* what() const noexcept override { return std::runtime_error::what(); }
};

}  // namespace polyak
