// SPDX-License-Identifier: MIT
// MpiCommunicator: the communicator contract (polyak/core/communicator.hpp) over an MPI communicator.
// The only polyak header that includes <mpi.h>; link polyak::mpi.
#pragma once

#include <mpi.h>

#include <algorithm>  // std::min
#include <cstddef>    // std::size_t
#include <memory>     // std::shared_ptr: communicators from split are freed with their last copy
#include <stdexcept>  // std::runtime_error
#include <string>
#include <type_traits>
#include <vector>

#include "polyak/core/error.hpp"
#include "polyak/core/communicator.hpp"

namespace polyak {

/// Wraps an MPI communicator. Constructed from a communicator the caller owns (MPI_COMM_WORLD, say),
/// it only borrows it; the communicators split() makes are its own and freed (MPI_Comm_free) with the
/// last copy. MPI must be initialized while it is used. MPI errors become std::runtime_error where
/// the communicator's error handler returns them (MPI's default handler aborts the job instead).
class MpiCommunicator {
 public:
  /// Borrows `comm` (the caller keeps owning it).
  explicit MpiCommunicator(MPI_Comm comm) : comm_(std::make_shared<MPI_Comm>(comm)) {
    check(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm, &size_), "MPI_Comm_size");
  }

  /// This process's rank in the communicator.
  int rank() const noexcept { return rank_; }
  /// How many processes it holds.
  int size() const noexcept { return size_; }
  /// The MPI communicator, for the caller's own MPI calls.
  MPI_Comm native() const noexcept { return *comm_; }

  /// Allreduce calls move at most this many bytes: Open MPI's allreduce of one 40 MB buffer was 9x
  /// slower here than the same bytes in 4 MB pieces (its temporary pages fault on every large call).
  static constexpr std::size_t max_bytes_per_call = std::size_t{4} << 20;

  /// In place (MPI_IN_PLACE), in pieces of at most max_bytes_per_call.
  template <class T>
  void allreduce_sum(T* data, std::size_t n) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "polyak::MpiCommunicator::allreduce_sum: float or double");
    const MPI_Datatype type = std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
    for (std::size_t done = 0; done < n;) {
      const int count = static_cast<int>(std::min<std::size_t>(n - done, max_bytes_per_call / sizeof(T)));
      check(MPI_Allreduce(MPI_IN_PLACE, data + done, count, type, MPI_SUM, *comm_), "MPI_Allreduce");
      done += static_cast<std::size_t>(count);
    }
  }

  /// out = the sum of every process's `in` (MPI_Allreduce out of place), in pieces of at most
  /// max_bytes_per_call; `in` is unchanged. `in` and `out` must not overlap.
  template <class T>
  void allreduce_sum(const T* in, T* out, std::size_t n) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "polyak::MpiCommunicator::allreduce_sum: float or double");
    const MPI_Datatype type = std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
    for (std::size_t done = 0; done < n;) {
      const int count = static_cast<int>(std::min<std::size_t>(n - done, max_bytes_per_call / sizeof(T)));
      check(MPI_Allreduce(in + done, out + done, count, type, MPI_SUM, *comm_), "MPI_Allreduce");
      done += static_cast<std::size_t>(count);
    }
  }

  /// A non-blocking allreduce in flight: its MPI_Iallreduce requests, one a piece of at most
  /// max_bytes_per_call. wait() is MPI_Waitall, test() MPI_Testall (which also drives Open MPI's
  /// progress: call it now and then while computing). Destroying an incomplete request waits.
  class Request {
   public:
    Request() = default;
    /// Movable; the source then holds nothing.
    Request(Request&& other) noexcept : pieces_(std::move(other.pieces_)) { other.pieces_.clear(); }
    /// Completes this request first (waits), then takes `other`'s.
    Request& operator=(Request&& other) noexcept {
      if (this != &other) {
        finish_quietly();
        pieces_ = std::move(other.pieces_);
        other.pieces_.clear();
      }
      return *this;
    }
    Request(const Request&) = delete;
    Request& operator=(const Request&) = delete;
    ~Request() { finish_quietly(); }

    /// Completes the sum (MPI_Waitall); throws on an MPI error.
    void wait() {
      if (pieces_.empty()) return;
      const int code = MPI_Waitall(static_cast<int>(pieces_.size()), pieces_.data(), MPI_STATUSES_IGNORE);
      pieces_.clear();
      check(code, "MPI_Waitall");
    }
    /// Whether the sum is complete (MPI_Testall); drives MPI's progress.
    bool test() {
      if (pieces_.empty()) return true;
      int done = 0;
      check(MPI_Testall(static_cast<int>(pieces_.size()), pieces_.data(), &done, MPI_STATUSES_IGNORE),
            "MPI_Testall");
      if (done) pieces_.clear();
      return done != 0;
    }

   private:
    friend class MpiCommunicator;
    void finish_quietly() noexcept {
      if (!pieces_.empty())
        MPI_Waitall(static_cast<int>(pieces_.size()), pieces_.data(), MPI_STATUSES_IGNORE);
      pieces_.clear();
    }
    std::vector<MPI_Request> pieces_;
  };

  /// MPI_Iallreduce in place, in pieces of at most max_bytes_per_call; see Request.
  template <class T>
  Request iallreduce_sum(T* data, std::size_t n) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "polyak::MpiCommunicator::iallreduce_sum: float or double");
    const MPI_Datatype type = std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
    Request request;
    request.pieces_.reserve((n * sizeof(T) + max_bytes_per_call - 1) / max_bytes_per_call);
    for (std::size_t done = 0; done < n;) {
      const int count = static_cast<int>(std::min<std::size_t>(n - done, max_bytes_per_call / sizeof(T)));
      MPI_Request piece = MPI_REQUEST_NULL;
      check(MPI_Iallreduce(MPI_IN_PLACE, data + done, count, type, MPI_SUM, *comm_, &piece),
            "MPI_Iallreduce");
      request.pieces_.push_back(piece);
      done += static_cast<std::size_t>(count);
    }
    return request;
  }

  /// Collective: MPI_Comm_split(color, key). `color` must be >= 0.
  MpiCommunicator split(int color, int key) const {
    if (color < 0) throw InvalidArgument("polyak::MpiCommunicator::split: color must be >= 0");
    MPI_Comm part;
    check(MPI_Comm_split(*comm_, color, key, &part), "MPI_Comm_split");
    return MpiCommunicator(std::shared_ptr<MPI_Comm>(new MPI_Comm(part), [](MPI_Comm* c) {
      MPI_Comm_free(c);
      delete c;
    }));
  }

 private:
  explicit MpiCommunicator(std::shared_ptr<MPI_Comm> owned) : comm_(std::move(owned)) {
    check(MPI_Comm_rank(*comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(*comm_, &size_), "MPI_Comm_size");
  }

  static void check(int code, const char* what) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw RuntimeError(std::string("polyak::MpiCommunicator: ") + what +
                       " failed: " + std::string(text, static_cast<std::size_t>(length)));
  }

  std::shared_ptr<MPI_Comm> comm_;
  int rank_ = 0, size_ = 1;
};

static_assert(is_communicator_v<MpiCommunicator> && has_iallreduce_v<MpiCommunicator>);

}  // namespace polyak
