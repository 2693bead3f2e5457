// SPDX-License-Identifier: MIT
// The communicator contract that model averaging runs on, and ThreadCommunicator, which serves the
// threads of one process.
//
// A communicator is any type C with
//     int rank() const;                          // this member's index, 0 <= rank < size
//     int size() const;                          // how many members the group has
//     void allreduce_sum(T* data, std::size_t n);   // for T = float and double: in place, every
//                                                // member gets the element-wise sum of all members'
//     C split(int color, int key) const;         // collective: a communicator of the members that
//                                                // passed the same color, ranked by (key, rank)
// (MPI_Comm_split's meaning). polyak::MpiCommunicator (polyak/mpi/communicator.hpp) wraps an MPI
// communicator; ThreadCommunicator below connects threads. Every member must make the same collective calls
// in the same order, as with MPI.
//
// Overlapped averaging (polyak::Overlap) also needs a non-blocking allreduce:
//     R iallreduce_sum(T* data, std::size_t n);  // starts it; R has void wait() (completes it, and
//                                                // throws what the blocking call would) and
//                                                // bool test() (true once complete; drives progress)
// `data` must stay untouched until the request completes; destroying an incomplete request waits.
// Non-blocking calls are collective too, started in the same order on every member.
//
// And optionally, where one call costs much (a network round trip):
//     static constexpr std::size_t average_chunk_bytes = ...;  // bytes per allreduce the averagers
//                                                              // make (default 1 MB)
#pragma once

#include <algorithm>           // std::sort
#include <chrono>              // Request::test's zero wait
#include <condition_variable>  // the barrier
#include <cstddef>             // std::size_t
#include <cstdint>             // std::int64_t
#include <functional>          // std::less
#include <future>              // iallreduce_sum's threads
#include <map>
#include <memory>  // std::shared_ptr
#include <mutex>
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::pair
#include <vector>

#include "polyak/core/detail/start_or_defer.hpp"
#include "polyak/core/error.hpp"

namespace polyak {

namespace detail {

template <class C, class = void>
struct is_communicator : std::false_type {};
template <class C>
struct is_communicator<
    C, std::void_t<decltype(std::declval<const C&>().rank()), decltype(std::declval<const C&>().size()),
                   decltype(std::declval<C&>().allreduce_sum(std::declval<float*>(), std::size_t{})),
                   decltype(std::declval<C&>().allreduce_sum(std::declval<double*>(), std::size_t{})),
                   decltype(std::declval<const C&>().split(0, 0))>> : std::true_type {};

}  // namespace detail

/// True when C meets the communicator contract above.
template <class C>
inline constexpr bool is_communicator_v = detail::is_communicator<C>::value;

namespace detail {

template <class C, class = void>
struct has_iallreduce : std::false_type {};
template <class C>
struct has_iallreduce<
    C, std::void_t<decltype(std::declval<C&>().iallreduce_sum(std::declval<float*>(), std::size_t{}).wait()),
                   decltype(std::declval<C&>().iallreduce_sum(std::declval<double*>(), std::size_t{}).wait()),
                   decltype(bool{
                       std::declval<C&>().iallreduce_sum(std::declval<float*>(), std::size_t{}).test()})>>
    : std::true_type {};

}  // namespace detail

/// True when C also has the non-blocking allreduce that overlapped averaging needs.
template <class C>
inline constexpr bool has_iallreduce_v = detail::has_iallreduce<C>::value;

namespace detail {

/// Bytes per allreduce call where the communicator does not say. Large calls are slow (Open MPI's
/// temporary pages fault afresh on each), and so were 512 KB ones: Open MPI's allreduce of 512 KB
/// pieces took 1.11 times as long as of 1 MB ones, 2 MB 1.01 to 1.04 (docs/distributed.md).
inline constexpr std::size_t default_average_chunk_bytes = std::size_t{1} << 20;

template <class C, class = void>
struct chunk_bytes_of : std::integral_constant<std::size_t, default_average_chunk_bytes> {};
template <class C>
struct chunk_bytes_of<C, std::void_t<decltype(C::average_chunk_bytes)>>
    : std::integral_constant<std::size_t, C::average_chunk_bytes> {};

}  // namespace detail

/// Bytes per allreduce call the averagers make over C: C::average_chunk_bytes where C declares it,
/// else 1 MB (detail::default_average_chunk_bytes says why).
template <class C>
inline constexpr std::size_t average_chunk_bytes_v = detail::chunk_bytes_of<C>::value;

/// A communicator between the threads of one process, with a real shared-memory allreduce: for
/// local SGD on one machine and for testing distributed code without mpirun.
///
///     auto members = polyak::ThreadCommunicator::create(4);   // one per thread
///     std::thread t([&] { polyak::average_parameters(params, members[1]); });
///
/// allreduce_sum: each member adds up one slice of the range over all members' buffers, in rank
/// order, and writes the sum into every buffer; so all members get bit-identical results. Members
/// that pass different lengths all get std::invalid_argument. iallreduce_sum runs the same sum on a
/// thread of its own, among a second group that only non-blocking calls use, so blocking calls may
/// go on meanwhile; a member's non-blocking calls run one after another, in the order started. Where
/// the system starts no thread for it (a process or container limit), the sum runs in wait() on the
/// waiting thread instead (test() says false until then), so that the other members are not left
/// waiting for a member whose call failed. A copy of a ThreadCommunicator is the same member.
class ThreadCommunicator {
 public:
  /// A non-blocking allreduce in flight. wait() completes it and rethrows what the sum threw; test()
  /// says whether it is complete. Destroying a request waits for its sum.
  class Request {
   public:
    Request() = default;
    /// Movable.
    Request(Request&&) noexcept = default;
    /// Completes this request first (waits), then takes `other`'s.
    Request& operator=(Request&& other) noexcept {
      if (this != &other) {
        finish_quietly();
        done_ = std::move(other.done_);
      }
      return *this;
    }
    Request(const Request&) = delete;
    Request& operator=(const Request&) = delete;
    ~Request() { finish_quietly(); }

    /// Completes the sum, rethrowing what it threw.
    void wait() {
      if (!done_.valid()) return;
      std::shared_future<void> done = std::move(done_);
      done.get();
    }
    /// Whether the sum is complete.
    bool test() const {
      return !done_.valid() || done_.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
    }

   private:
    friend class ThreadCommunicator;
    explicit Request(std::shared_future<void> done) : done_(std::move(done)) {}
    void finish_quietly() noexcept {
      if (done_.valid()) done_.wait();  // the sum writes into the caller's buffer until it ends
      done_ = {};
    }
    std::shared_future<void> done_;
  };

  /// `size` members of one group; hand member i to thread i.
  static std::vector<ThreadCommunicator> create(int size) {
    if (size < 1) throw InvalidArgument("polyak::ThreadCommunicator: size " + std::to_string(size) + " < 1");
    auto group = std::make_shared<Group>(size);
    std::vector<ThreadCommunicator> members;
    for (int rank = 0; rank < size; ++rank) members.push_back(ThreadCommunicator(group, rank));
    return members;
  }

  /// This member's rank.
  int rank() const noexcept { return rank_; }
  /// How many members the group holds.
  int size() const noexcept { return group_->size; }

  /// Collective: replaces data[0, n) by its sum over the members; every member passes the same n
  /// (else every member throws).
  template <class T>
  void allreduce_sum(T* data, std::size_t n) {
    allreduce_sum(static_cast<const T*>(data), data, n);
  }

  /// Collective: out[0, n) = the sum over the members of their in[0, n); `in` is left unchanged
  /// unless it is `out`. Every member passes the same n and scalar type, and `in` and `out` the same
  /// buffer or buffers apart; else every member throws InvalidArgument and no buffer is written.
  template <class T>
  void allreduce_sum(const T* in, T* out, std::size_t n) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "polyak::ThreadCommunicator::allreduce_sum: float or double");
    Group& g = *group_;
    const std::less<const T*> before;  // a total order, also between unrelated buffers
    const bool overlap = in != out && before(in, out + n) && before(out, in + n);
    g.posted[static_cast<std::size_t>(rank_)] = {in, out, n, sizeof(T), overlap};
    g.barrier();
    std::string problem;
    for (std::size_t r = 0; r < g.posted.size() && problem.empty(); ++r) {
      const Posted& other = g.posted[r];
      if (other.n != n) {
        problem = "members passed " + std::to_string(n) + " and " + std::to_string(other.n) + " elements";
      } else if (other.scalar_bytes != sizeof(T)) {
        problem = "members passed float and double";
      } else if (other.overlap) {
        problem = "member " + std::to_string(r) + "'s input and output overlap";
      }
    }
    if (!problem.empty()) {
      g.barrier();  // everyone has compared before anyone may post again
      throw InvalidArgument("polyak::ThreadCommunicator::allreduce_sum: " + problem);
    }
    const std::size_t members = g.posted.size();
    const std::size_t begin = n * static_cast<std::size_t>(rank_) / members;
    const std::size_t end = n * (static_cast<std::size_t>(rank_) + 1) / members;
    for (std::size_t i = begin; i < end; ++i) {
      T sum = static_cast<const T*>(g.posted.front().in)[i];  // (not 0 + ...: -0 stays -0, as in MPI)
      for (std::size_t r = 1; r < members; ++r) sum += static_cast<const T*>(g.posted[r].in)[i];
      for (const Posted& other : g.posted) static_cast<T*>(other.out)[i] = sum;
    }
    g.barrier();  // no member returns before every slice of its buffer is written
  }

  /// Starts allreduce_sum(data, n) on a thread of its own; see Request.
  template <class T>
  Request iallreduce_sum(T* data, std::size_t n) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "polyak::ThreadCommunicator::iallreduce_sum: float or double");
    Group& g = *group_;
    std::lock_guard<std::mutex> lock(g.mutex);
    if (!g.nonblocking) g.nonblocking = std::make_shared<Group>(g.size);
    ThreadCommunicator member(g.nonblocking, rank_);
    std::shared_future<void>& previous = g.last_nonblocking[static_cast<std::size_t>(rank_)];
    auto sum = [member, data, n, before = previous]() mutable {
      if (before.valid()) before.wait();  // this member's earlier calls first, in order
      member.allreduce_sum(data, n);
    };
    previous = detail::start_or_defer(std::move(sum)).share();
    return Request(previous);
  }

  /// Collective: the members that pass the same `color`, ranked by (key, rank).
  ThreadCommunicator split(int color, int key) const {
    Group& g = *group_;
    g.split_request[static_cast<std::size_t>(rank_)] = {color, key};
    g.barrier();
    if (rank_ == 0) {
      std::map<int, std::vector<std::pair<std::pair<int, int>, int>>>
          by_color;  // color -> ((key, rank), rank)
      for (int r = 0; r < g.size; ++r) {
        const auto [c, k] = g.split_request[static_cast<std::size_t>(r)];
        by_color[c].push_back({{k, r}, r});
      }
      for (auto& [c, members] : by_color) {
        std::sort(members.begin(), members.end());
        auto group = std::make_shared<Group>(static_cast<int>(members.size()));
        for (std::size_t i = 0; i < members.size(); ++i) {
          g.split_result[static_cast<std::size_t>(members[i].second)] = {group, static_cast<int>(i)};
        }
      }
    }
    g.barrier();
    const auto& [group, rank] = g.split_result[static_cast<std::size_t>(rank_)];
    return ThreadCommunicator(group, rank);  // read before anyone can reach the next split's rebuild
  }

 private:
  /// One member's allreduce: what it adds, where the sum goes (the same buffer in place), how many
  /// scalars of what size, and whether its buffers partly overlap (refused).
  struct Posted {
    const void* in = nullptr;
    void* out = nullptr;
    std::size_t n = 0;
    std::size_t scalar_bytes = 0;
    bool overlap = false;
  };

  /// What the members of one group share.
  struct Group {
    explicit Group(int n)
        : size(n),
          posted(static_cast<std::size_t>(n)),
          split_request(static_cast<std::size_t>(n)),
          split_result(static_cast<std::size_t>(n)),
          last_nonblocking(static_cast<std::size_t>(n)) {}

    /// Blocks until every member has arrived; reusable.
    void barrier() {
      std::unique_lock<std::mutex> lock(mutex);
      const std::int64_t generation = barrier_generation;
      if (++arrived == size) {
        arrived = 0;
        ++barrier_generation;
        all_arrived.notify_all();
      } else {
        all_arrived.wait(lock, [&] { return barrier_generation != generation; });
      }
    }

    const int size;
    std::vector<Posted> posted;                      // each member's allreduce buffers and length
    std::vector<std::pair<int, int>> split_request;  // each member's (color, key)
    std::vector<std::pair<std::shared_ptr<Group>, int>> split_result;  // per member: its new group and rank
    std::shared_ptr<Group> nonblocking;                      // the group iallreduce_sum's threads meet in
    std::vector<std::shared_future<void>> last_nonblocking;  // per member: its latest iallreduce_sum
    std::mutex mutex;
    std::condition_variable all_arrived;
    int arrived = 0;
    std::int64_t barrier_generation = 0;
  };

  ThreadCommunicator(std::shared_ptr<Group> group, int rank) : group_(std::move(group)), rank_(rank) {}

  std::shared_ptr<Group> group_;
  int rank_;
};

static_assert(is_communicator_v<ThreadCommunicator> && has_iallreduce_v<ThreadCommunicator>);

}  // namespace polyak
