// SPDX-License-Identifier: MIT
// polyak's communicator over a c10d process group, the one a libtorch trainer on several processes
// already holds (Gloo on CPUs): the averagers, Overlap and ShardView run on it as on MPI.
//
//     c10d::TCPStoreOptions options;  // as torchrun's MASTER_ADDR / MASTER_PORT say
//     options.port = port, options.isServer = rank == 0, options.numWorkers = world_size;
//     auto store = c10::make_intrusive<c10d::TCPStore>(host, options);
//     auto comm = polyak::libtorch::C10dCommunicator::gloo(store, rank, world_size);
//     polyak::PeriodicModelAverager<polyak::libtorch::C10dCommunicator> averager(8, 100, comm);
//
// Host memory is wrapped as CPU tensors (torch::from_blob), never copied. split() builds each color's
// subgroup as a new Gloo group on the store, under a prefix of its own.
#pragma once

// libtorch's headers declare the Gloo group only under USE_C10D_GLOO, which libtorch's CMake
// package does not set for its users; Debian's libtorch is built with Gloo (its headers: libgloo-dev).
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/torch.h>

#include <algorithm>  // std::sort
#include <chrono>
#include <cstddef>  // std::size_t
#include <cstdint>  // std::int64_t
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>  // std::move
#include <vector>

#include "polyak/core/communicator.hpp"
#include "polyak/core/error.hpp"

namespace polyak {
namespace libtorch {

/// A communicator (polyak/core/communicator.hpp) over a c10d process group. Every member must make
/// the same calls in the same order, as with any process group.
class C10dCommunicator {
 public:
  /// Wraps `group`, which stays usable by its other holders. `store` is the store the group was made
  /// on: split() makes its subgroups there, as Gloo groups of `options` (the group's own devices and
  /// timeout where it is a Gloo group).
  C10dCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group, c10::intrusive_ptr<c10d::Store> store,
                   c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> options)
      : group_(std::move(group)), store_(std::move(store)), options_(std::move(options)) {
    if (!group_ || !store_ || !options_)
      throw InvalidArgument("polyak::libtorch::C10dCommunicator: a process group, its store and options");
    if (options_->devices.empty()) {  // (else the first split would fail, on some members only)
      throw InvalidArgument(
          "polyak::libtorch::C10dCommunicator: the Gloo options name no device "
          "(c10d::ProcessGroupGloo::createDeviceForHostname)");
    }
  }

  // Copies share the group, as copies of an MPI communicator's handle do, and are the same member:
  // one thread at a time calls a member's collectives, in the group's order (two threads summing
  // on copies at once would pair their calls at random). There is no move: a moved-from
  // communicator would hold no group, so "moving" copies and the source stays usable.
  /// Another handle of the same member (see above).
  C10dCommunicator(const C10dCommunicator&) = default;
  /// This handle becomes another's member (see above).
  C10dCommunicator& operator=(const C10dCommunicator&) = default;

  /// Collective over the `size` processes that call it with the same store: a new Gloo group, this
  /// process its member `rank`, on the loopback device by default (`hostname`: the address the
  /// others reach this one at, for several machines). The group meets on the store's keys as they
  /// are, as c10d::ProcessGroupGloo's constructor does: for a second group on one store, pass a
  /// c10d::PrefixStore of its own (or use split()), else the two fail to connect.
  static C10dCommunicator gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                               const std::string& hostname = "127.0.0.1",
                               std::chrono::milliseconds timeout = std::chrono::minutes(5)) {
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
    auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
    return C10dCommunicator(std::move(group), store, std::move(options));
  }

  /// Bytes per allreduce call of the averagers (polyak/core/communicator.hpp): a Gloo call is a
  /// round over TCP, milliseconds, so the model goes in few large calls, as PyTorch's one flat call
  /// does (a model in one run of floats is reduced where it lies; else each chunk is packed into a
  /// buffer of this size, kept per thread).
  static constexpr std::size_t average_chunk_bytes = std::size_t{64} << 20;

  /// This process's rank in the group.
  int rank() const { return group_->getRank(); }
  /// How many processes the group holds.
  int size() const { return group_->getSize(); }
  /// The process group, for the caller's own collectives.
  const c10::intrusive_ptr<c10d::ProcessGroup>& group() const noexcept { return group_; }

  /// In place: data[0, n) becomes its sum over the group (the host memory itself is reduced). Every
  /// member must pass the same n (also 0) and type: Gloo checks neither across processes, and a
  /// mismatch ends the processes (std::terminate on Gloo's thread), times out, or, where the byte
  /// counts happen to match (8 floats against 4 doubles), sums bytes as the wrong type without an
  /// error, as it does under PyTorch. polyak's averagers agree on their layout before they sum, so
  /// only direct calls can mismatch.
  template <class T>
  void allreduce_sum(T* data, std::size_t n) {
    start(data, n).wait();
  }

  /// A non-blocking sum in flight: wait() completes it (and rethrows what the group threw), test()
  /// says whether it is complete. Destroying an incomplete request waits for it.
  class Request {
   public:
    Request() = default;
    /// Movable; the source is then complete.
    Request(Request&&) noexcept = default;
    /// Waits for this one's sum first, then takes `other`'s.
    Request& operator=(Request&& other) noexcept {
      if (this != &other) {
        finish_quietly();
        work_ = std::move(other.work_);
      }
      return *this;
    }
    Request(const Request&) = delete;
    Request& operator=(const Request&) = delete;
    ~Request() { finish_quietly(); }

    /// Completes the sum; throws what the group reported. The request is complete afterwards,
    /// thrown or not, as an MPI request is null after MPI_Wait: a second wait() returns at once.
    void wait() {
      if (!work_) return;
      auto work = std::move(work_);
      work->wait();
    }
    /// True once the sum is complete.
    bool test() { return !work_ || work_->isCompleted(); }

   private:
    friend class C10dCommunicator;
    explicit Request(c10::intrusive_ptr<c10d::Work> work) : work_(std::move(work)) {}
    void finish_quietly() noexcept {
      try {
        wait();
      } catch (...) {  // (a destructor reports nothing; wait() reports to those who ask)
      }
    }
    c10::intrusive_ptr<c10d::Work> work_;
  };

  /// Starts allreduce_sum(data, n); `data` must stay untouched until the request completes.
  template <class T>
  Request iallreduce_sum(T* data, std::size_t n) {
    return start(data, n);
  }

  /// Collective: the members that pass the same `color`, ranked by (key, rank), as a new Gloo group
  /// on the store under a prefix of its own. Every member learns every member's (color, key) first,
  /// so a negative color anywhere fails every member before any group is made.
  C10dCommunicator split(int color, int key) const {
    const int n = size(), me = rank();
    std::vector<double> requests(2 * static_cast<std::size_t>(n) + 1, 0.0);
    requests[2 * static_cast<std::size_t>(me)] = color;
    requests[2 * static_cast<std::size_t>(me) + 1] = key;
    // The split's number on the store, drawn by member 0 and learned by all in the same sum: unique
    // on the store, also across separate wrappers of one group (a counter of their own would repeat
    // a prefix, and a Gloo group must not meet where another met).
    if (me == 0) requests.back() = static_cast<double>(store_->add("polyak/splits", 1));
    start(requests.data(), requests.size()).wait();
    std::vector<std::tuple<double, int>> members;  // (key, rank) of this color
    for (int r = 0; r < n; ++r) {
      const int c = static_cast<int>(requests[2 * static_cast<std::size_t>(r)]);  // exact: ints
      if (c < 0) {
        throw InvalidArgument("polyak::libtorch::C10dCommunicator::split: member " + std::to_string(r) +
                              " passed color " + std::to_string(c) + "; colors must be >= 0");
      }
      if (c == color) members.emplace_back(requests[2 * static_cast<std::size_t>(r) + 1], r);
    }
    std::sort(members.begin(), members.end());
    int sub_rank = 0;
    while (std::get<1>(members[static_cast<std::size_t>(sub_rank)]) != me) ++sub_rank;
    const auto split = static_cast<std::int64_t>(requests.back());
    auto store = c10::make_intrusive<c10d::PrefixStore>(
        "polyak/split/" + std::to_string(split) + "/" + std::to_string(color), store_);
    auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, sub_rank,
                                                             static_cast<int>(members.size()), options_);
    C10dCommunicator part(std::move(group), std::move(store), options_);
    // Returns once every member of the part has connected (a member that returned earlier and
    // dropped its part would break the others' connecting; c10d's new_group waits alike).
    double connected = 0;
    part.allreduce_sum(&connected, 1);
    return part;
  }

 private:
  template <class T>
  Request start(T* data, std::size_t n) const {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "polyak::libtorch::C10dCommunicator: float or double");
    // n == 0 still goes to the group: a member that skipped it would pair its next call with the
    // others' empty one.
    std::vector<at::Tensor> tensors{torch::from_blob(
        data, {static_cast<std::int64_t>(n)},
        torch::TensorOptions().dtype(std::is_same_v<T, float> ? torch::kFloat : torch::kDouble))};
    return Request(group_->allreduce(tensors));
  }

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> options_;
};

static_assert(is_communicator_v<C10dCommunicator> && has_iallreduce_v<C10dCommunicator>);

}  // namespace libtorch
}  // namespace polyak
