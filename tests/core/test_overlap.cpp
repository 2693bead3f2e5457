// SPDX-License-Identifier: MIT
// Overlapped averaging (polyak/core/overlap.hpp) over ThreadCommunicator: four threads stand for four
// ranks.
#include "polyak/core/overlap.hpp"

#include "polyak/core/model_averaging.hpp"

#include "support.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

using polyak::HierarchicalModelAverager;
using polyak::ParameterList;
using polyak::PeriodicModelAverager;
using polyak::ThreadCommunicator;

namespace {

using polyak_test::on_threads;

using polyak_test::RankModel;

}  // namespace
namespace {

/// The delayed average's closed form for member r moving by g_r = r + 1 each step from 0, the
/// averager called after each move: averages start at steps s = warmup + k * period and land `delay`
/// steps later (delay 0: blocking). After the call at step t, with s the last average landed by
/// then, x_r = mean(g) * (s + 1) + (t - s) * g_r (the members agreed on the mean of their step-s
/// models, and each kept its own moves since); before any, x_r = (t + 1) * g_r.
double delayed_closed_form(int r, int members, std::int64_t t, std::int64_t warmup, std::int64_t period,
                           std::int64_t delay) {
  const double g = r + 1, mean_g = (members + 1) / 2.0;
  std::int64_t landed = -1;
  for (std::int64_t s = warmup; s + delay <= t; s += period) landed = s;
  if (landed < 0) return static_cast<double>(t + 1) * g;
  return mean_g * static_cast<double>(landed + 1) + static_cast<double>(t - landed) * g;
}

}  // namespace

TEST_CASE("an overlapped PeriodicModelAverager holds the delayed average's closed form at every step",
          "[model_averaging][overlap]") {
  const std::int64_t warmup = 3, period = 4, steps = 23;
  for (const std::int64_t delay : {0, 1, 2, 4}) {
    CAPTURE(delay);
    std::vector<std::vector<float>> seen(4);
    std::vector<std::vector<bool>> started(4);
    const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
      Eigen::VectorXf w = Eigen::VectorXf::Zero(3);
      Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, 1> h =
          Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, 1>::Zero(2);
      ParameterList<float> list;
      list.add("w", w);
      auto averager = delay == 0 ? PeriodicModelAverager<ThreadCommunicator>(period, warmup, comm)
                                 : PeriodicModelAverager<ThreadCommunicator>(period, warmup, comm,
                                                                             polyak::Overlap{delay});
      for (std::int64_t t = 0; t < steps; ++t) {
        w.array() += static_cast<float>(comm.rank() + 1);
        started[static_cast<std::size_t>(comm.rank())].push_back(averager.average_parameters(list));
        seen[static_cast<std::size_t>(comm.rank())].push_back(w[0]);
        seen[static_cast<std::size_t>(comm.rank())].push_back(w[2]);
      }
    });
    CHECK(errors == std::vector<std::string>(4));
    std::size_t wrong = 0;
    for (int r = 0; r < 4; ++r) {
      for (std::int64_t t = 0; t < steps; ++t) {
        const auto expected = static_cast<float>(delayed_closed_form(r, 4, t, warmup, period, delay));
        wrong += seen[static_cast<std::size_t>(r)][static_cast<std::size_t>(2 * t)] != expected;
        wrong += seen[static_cast<std::size_t>(r)][static_cast<std::size_t>(2 * t + 1)] != expected;
        CHECK(started[static_cast<std::size_t>(r)][static_cast<std::size_t>(t)] ==
              (t >= warmup && (t - warmup) % period == 0));
      }
    }
    CHECK(wrong == 0);
  }
}

TEST_CASE("start_average_parameters and finish: the mean exactly where nothing moved, bf16 rounded once",
          "[model_averaging][overlap]") {
  std::vector<std::vector<float>> seen(4);
  const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
    const float r = static_cast<float>(comm.rank());
    Eigen::VectorXf w = Eigen::VectorXf::Constant(5, 0.1f * (r + 1));
    Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, 1> h(2);
    h.setConstant(Eigen::bfloat16(r + 1));
    ParameterList<float> floats;
    floats.add("w", w);
    ParameterList<Eigen::bfloat16> halves;
    halves.add("h", h);
    auto pending_w = polyak::start_average_parameters(floats, comm);
    auto pending_h = polyak::start_average_parameters(halves, comm);
    const bool was_pending = pending_w.pending();
    h.array() += Eigen::bfloat16(0.5f * r);  // this member's own progress meanwhile
    pending_h.finish(halves);
    pending_w.finish(floats);  // w did not move: the blocking average's bits
    const bool still_pending = pending_w.pending();
    pending_w.finish(floats);  // nothing in flight: nothing happens
    auto& out = seen[static_cast<std::size_t>(comm.rank())];
    out = {w[0], w[4], static_cast<float>(h[0]), was_pending ? 1.0f : 0.0f, still_pending ? 1.0f : 0.0f};
  });
  CHECK(errors == std::vector<std::string>(4));
  // Blocking: sum over r of 0.1f * (r + 1) * 0.25f, in rank order, as ThreadCommunicator sums.
  float blocking = 0;
  for (int r = 0; r < 4; ++r) blocking += 0.1f * static_cast<float>(r + 1) * 0.25f;
  for (int r = 0; r < 4; ++r) {
    CHECK(seen[static_cast<std::size_t>(r)][0] == blocking);
    CHECK(seen[static_cast<std::size_t>(r)][1] == blocking);
    CHECK(seen[static_cast<std::size_t>(r)][2] == 2.5f + 0.5f * static_cast<float>(r));  // mean + own move
    CHECK(seen[static_cast<std::size_t>(r)][3] == 1.0f);  // pending once started
    CHECK(seen[static_cast<std::size_t>(r)][4] == 0.0f);  // not after finish
  }
}

TEST_CASE("finish gives the mean exactly where nothing moved, infinities included",
          "[model_averaging][overlap]") {
  // x + (mean - x) would be inf - inf = NaN for an infinite scalar that did not move.
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<Eigen::VectorXf> seen(2);
  const auto errors = on_threads(2, [&](ThreadCommunicator& comm) {
    Eigen::VectorXf w(3);
    w << inf, (comm.rank() == 0 ? inf : 1.0f), -inf;
    ParameterList<float> list;
    list.add("w", w);
    auto pending = polyak::start_average_parameters(list, comm);
    pending.finish(list);
    seen[static_cast<std::size_t>(comm.rank())] = w;
  });
  CHECK(errors == std::vector<std::string>(2));
  for (const auto& w : seen) {
    CHECK(w[0] == inf);  // (inf / 2 + inf / 2), nothing moved
    CHECK(w[1] == inf);  // inf / 2 + 1 / 2 on both; member 1's own 1 did not move either
    CHECK(w[2] == -inf);
  }
}

TEST_CASE("an overlapped HierarchicalModelAverager applies each group's delayed mean",
          "[model_averaging][overlap]") {
  // {{2, 2}, {6, 4}}, warm-up 1, delay 2: pairs average at even steps, all four at multiples of 6.
  // The reference runs the documented rule on plain numbers: at a landing step,
  // x <- mean over the group of the snapshot + (x - own snapshot).
  const std::int64_t steps = 20, delay = 2;
  std::vector<std::vector<double>> expected(4, std::vector<double>(steps));
  {
    std::vector<double> x(4, 0.0), snapshot(4, 0.0);
    std::int64_t started = -1, group_size = 0;
    for (std::int64_t t = 0; t < steps; ++t) {
      for (int r = 0; r < 4; ++r) x[static_cast<std::size_t>(r)] += r + 1;
      if (started >= 0 && t - started == delay) {
        std::vector<double> next = x;
        for (int r = 0; r < 4; ++r) {
          const int first = r / static_cast<int>(group_size) * static_cast<int>(group_size);
          double mean = 0;
          for (int k = first; k < first + group_size; ++k) mean += snapshot[static_cast<std::size_t>(k)];
          mean /= static_cast<double>(group_size);
          next[static_cast<std::size_t>(r)] =
              mean + (x[static_cast<std::size_t>(r)] - snapshot[static_cast<std::size_t>(r)]);
        }
        x = next;
        started = -1;
      }
      if (t >= 1 && t % 2 == 0) {
        snapshot = x;
        started = t;
        group_size = t % 6 == 0 ? 4 : 2;
      }
      for (int r = 0; r < 4; ++r)
        expected[static_cast<std::size_t>(r)][static_cast<std::size_t>(t)] = x[static_cast<std::size_t>(r)];
    }
  }
  std::vector<std::vector<double>> seen(4);
  const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
    Eigen::VectorXd w = Eigen::VectorXd::Zero(2);
    ParameterList<double> list;
    list.add("w", w);
    HierarchicalModelAverager<ThreadCommunicator> averager({{2, 2}, {6, 4}}, 1, comm, polyak::Overlap{delay});
    for (std::int64_t t = 0; t < steps; ++t) {
      w.array() += comm.rank() + 1.0;
      averager.average_parameters(list);
      seen[static_cast<std::size_t>(comm.rank())].push_back(w[1]);
    }
  });
  CHECK(errors == std::vector<std::string>(4));
  CHECK(seen == expected);
}

TEST_CASE("overlap refuses delays that let averages overlap, a second start, and other lists at finish",
          "[model_averaging][overlap]") {
  auto members = ThreadCommunicator::create(1);
  ThreadCommunicator& comm = members[0];
  using polyak::Overlap;
  CHECK_THROWS_WITH(PeriodicModelAverager<ThreadCommunicator>(4, 0, comm, Overlap{0}),
                    Catch::Contains("overlap delay must be in [1, 4]"));
  CHECK_THROWS_WITH(PeriodicModelAverager<ThreadCommunicator>(4, 0, comm, Overlap{5}),
                    Catch::Contains("an average must land before the next one starts"));
  CHECK_THROWS_WITH(PeriodicModelAverager<ThreadCommunicator>(0, 0, comm, Overlap{1}),
                    Catch::Contains("period must be >= 1"));
  CHECK_THROWS_WITH(HierarchicalModelAverager<ThreadCommunicator>({{2, 1}}, 0, comm, Overlap{3}),
                    Catch::Contains("overlap delay must be in [1, 2]"));

  Eigen::VectorXf w = Eigen::VectorXf::Constant(3, 2.0f), other = Eigen::VectorXf::Zero(4);
  ParameterList<float> list, wrong;
  list.add("w", w);
  wrong.add("w", other);
  auto pending = polyak::start_average_parameters(list, comm);
  CHECK_THROWS_WITH(pending.start(comm, list), Catch::Contains("still in flight"));
  w.setConstant(5.0f);
  CHECK_THROWS_WITH(pending.finish(wrong), Catch::Contains("not laid out as those it started from"));
  CHECK(other == Eigen::VectorXf::Zero(4));
  CHECK(pending.pending());
  pending.finish(list);
  CHECK(w == Eigen::VectorXf::Constant(3, 5.0f));  // one member: the mean is its snapshot; its moves kept

  // An averager in flight refuses lists of another wire type until it has landed.
  PeriodicModelAverager<ThreadCommunicator> averager(2, 0, comm, Overlap{2});
  Eigen::VectorXd d = Eigen::VectorXd::Zero(3);
  ParameterList<double> doubles;
  doubles.add("w", d);
  CHECK(averager.average_parameters(list));
  CHECK(averager.in_flight());
  // A step that neither lands nor starts involves no other member and refuses nothing (a lone throw
  // there left the other members a step ahead); the step that lands the average refuses, agreed.
  CHECK_FALSE(averager.average_parameters(doubles));
  CHECK_THROWS_WITH(averager.average_parameters(doubles), Catch::Contains("lists of another scalar type"));
  CHECK(averager.step() == 2);
  averager.synchronize(list);
  CHECK(!averager.in_flight());
}

// Issue 21: the overlapped paths, made to fail at every point of their cycle.

TEST_CASE("assigning over or moving a PendingAverage in flight waits for its collective first",
          "[model_averaging][overlap][adversarial]") {
  std::vector<float> seen(4);
  const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
    Eigen::VectorXf w = Eigen::VectorXf::Constant(200000, static_cast<float>(comm.rank() + 1));
    ParameterList<float> list;
    list.add("w", w);
    auto pending = polyak::start_average_parameters(list, comm);
    // The first average is still being summed into its buffers: the assignment must wait for it
    // (it freed them under the running sum: heap-use-after-free under ASan), then discard it.
    pending = polyak::start_average_parameters(list, comm);
    auto moved = std::move(pending);
    moved.finish(list);
    seen[static_cast<std::size_t>(comm.rank())] = w[199999];
  });
  CHECK(errors == std::vector<std::string>(4));
  CHECK(seen == std::vector<float>(4, 2.5f));
}

namespace {

/// What each member saw when its averager refused: the step, the message, and whether its weights
/// and its step counter were left as they were.
struct Refusal {
  std::int64_t step = -1;
  std::string message;
  bool unchanged = false;
};

/// Four members run an overlapped PeriodicModelAverager (period 4, `delay`); before step `fail_at`,
/// member 2 spoils its call as `spoil` says. Returns what each member saw.
std::vector<Refusal> fail_one_member(std::int64_t delay, std::int64_t fail_at, const std::string& spoil) {
  std::vector<Refusal> seen(4);
  const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
    const int rank = comm.rank();
    Eigen::VectorXf w = Eigen::VectorXf::Zero(1000), kept, extra = Eigen::VectorXf::Zero(2);
    Eigen::VectorXd wide = Eigen::VectorXd::Zero(1000);
    ParameterList<float> list, longer;
    list.add("w", w);
    longer.add("w", w).add("extra", extra);
    ParameterList<double> doubles;
    doubles.add("w", wide);
    PeriodicModelAverager<ThreadCommunicator> averager(4, 0, comm, polyak::Overlap{delay});
    for (std::int64_t t = 0; t < 12; ++t) {
      w.array() += static_cast<float>(rank + 1);
      const bool spoiled = rank == 2 && t >= fail_at;
      if (spoiled && spoil == "storage moved" && t == fail_at) {
        kept = w;      // the same values...
        w.swap(kept);  // ...in another allocation: the list's view is stale
      }
      const Eigen::VectorXf before = w;
      try {
        if (spoiled && spoil == "another scalar type") {
          averager.average_parameters(doubles);
        } else if (spoiled && spoil == "another layout") {
          averager.average_parameters(longer);
        } else {
          averager.average_parameters(list);
        }
      } catch (const std::exception& e) {
        seen[static_cast<std::size_t>(rank)] = {t, e.what(), w == before && averager.step() == t};
        return;
      }
    }
  });
  CHECK(errors == std::vector<std::string>(4));
  return seen;
}

}  // namespace

TEST_CASE(
    "a member that fails at any point of the overlapped cycle fails every member at that step, "
    "and nothing changes",
    "[model_averaging][overlap][adversarial]") {
  struct Case {
    std::int64_t delay, fail_at;
    const char* spoil;
    std::int64_t refused_at;  // where every member must refuse
    const char* everywhere;   // what every member's message says
    const char* on_rank_2;    // and what member 2's says of its own problem
  };
  // Period 4: averages start at steps 0, 4, 8; with delay 2 they land at 2, 6, 10; with delay 4 at
  // 4 and 8, the steps that also start the next one.
  const char* moved = "was resized, moved or replaced";
  const std::vector<Case> cases{
      {2, 4, "storage moved", 4, "nothing was averaged", moved},  // a step that only starts
      {2, 6, "storage moved", 6, "nothing was averaged", moved},  // a step that only lands
      {4, 8, "storage moved", 8, "nothing was averaged", moved},  // a step that lands and starts
      {2, 5, "storage moved", 6, "nothing was averaged", moved},  // between: refused where it lands
      {2, 6, "another scalar type", 6, "nothing was averaged", "another scalar type"},  // lands
      {2, 5, "another scalar type", 6, "nothing was averaged",
       "another scalar type"},  // between: no lone throw
      {4, 4, "another scalar type", 4, "nothing was averaged", "another scalar type"},  // lands, starts
      {2, 4, "another layout", 4, "nothing was averaged", "differs from rank 0's"},     // starts
      {4, 8, "another layout", 8, "nothing was averaged", "not laid out as those it started from"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.delay, c.fail_at, c.spoil);
    const auto seen = fail_one_member(c.delay, c.fail_at, c.spoil);
    for (std::size_t r = 0; r < 4; ++r) {
      CAPTURE(r, seen[r].message);
      CHECK(seen[r].step == c.refused_at);
      CHECK(seen[r].unchanged);
      CHECK_THAT(seen[r].message, Catch::Contains("rank 2") && Catch::Contains(c.everywhere));
    }
    CHECK_THAT(seen[2].message, Catch::Contains(c.on_rank_2));
  }
}

TEST_CASE("an overlapped hierarchy refuses a delay longer than the gap between two of its averaging steps",
          "[model_averaging][overlap]") {
  // Periods 2 and 3 average at steps 2, 3, 4, 6, 8, 9...: one step apart, so only delay 1 lands every
  // average before the next starts (with delay 2 the step-2 average was still in flight at step 3,
  // and every later step refused it: training could not go on).
  const auto refused = on_threads(2, [](ThreadCommunicator& comm) {
    HierarchicalModelAverager<ThreadCommunicator> averager({{2, 1}, {3, 2}}, 0, comm, polyak::Overlap{2});
  });
  for (const auto& e : refused) CHECK_THAT(e, Catch::Contains("overlap delay must be in [1, 1]"));
  CHECK_THAT(on_threads(2,
                        [](ThreadCommunicator& comm) {
                          HierarchicalModelAverager<ThreadCommunicator> averager({{4, 1}, {6, 2}}, 0, comm,
                                                                                 polyak::Overlap{3});
                        })[0],
             Catch::Contains("overlap delay must be in [1, 2]"));  // gcd(4, 6) = 2
  std::vector<std::vector<double>> seen(2);
  const auto errors = on_threads(2, [&](ThreadCommunicator& comm) {
    Eigen::VectorXd w = Eigen::VectorXd::Zero(3);
    ParameterList<double> list;
    list.add("w", w);
    HierarchicalModelAverager<ThreadCommunicator> averager({{2, 1}, {3, 2}}, 0, comm, polyak::Overlap{1});
    for (int t = 0; t < 13; ++t) {
      w.array() += comm.rank() + 1.0;
      averager.average_parameters(list);
    }
    averager.synchronize(list);
    seen[static_cast<std::size_t>(comm.rank())] = {w[0], static_cast<double>(averager.step())};
  });
  CHECK(errors == std::vector<std::string>(2));
  CHECK(seen[0][1] == 13.0);
  CHECK(seen[0][0] == seen[1][0]);  // step 12 started a world average; synchronize landed it, nothing moved
}

TEST_CASE("an overlapped hierarchy agrees across both groups where a world average lands as a pair's starts",
          "[model_averaging][overlap][adversarial]") {
  // Periods {2: pairs, 4: the world}, delay 2: step 0 starts a world average, step 2 lands it and
  // starts a pair average. Member 0's storage moves before step 2: its pair refuses the start, and
  // the other pair must learn it before landing the world average (it landed it: the world diverged,
  // and under MPI it then waited for member 0 forever).
  std::vector<Refusal> seen(4);
  const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
    const int rank = comm.rank();
    Eigen::VectorXf w = Eigen::VectorXf::Zero(100), kept;
    ParameterList<float> list;
    list.add("w", w);
    HierarchicalModelAverager<ThreadCommunicator> averager({{2, 2}, {4, 4}}, 0, comm, polyak::Overlap{2});
    for (std::int64_t t = 0; t < 6; ++t) {
      w.array() += static_cast<float>(rank + 1);
      if (rank == 0 && t == 2) {
        kept = w;
        w.swap(kept);
      }
      const Eigen::VectorXf before = w;
      try {
        averager.average_parameters(list);
      } catch (const std::exception& e) {
        seen[static_cast<std::size_t>(rank)] = {t, e.what(), w == before && averager.step() == t};
        return;
      }
    }
  });
  CHECK(errors == std::vector<std::string>(4));
  for (std::size_t r = 0; r < 4; ++r) {
    CAPTURE(r, seen[r].message);
    CHECK(seen[r].step == 2);
    CHECK(seen[r].unchanged);
    // Every member learns it from the agreement over the whole group, before anyone lands or starts.
    CHECK_THAT(seen[r].message, Catch::Contains("nothing was averaged") && Catch::Contains("rank 0"));
  }
}

TEST_CASE(
    "an overlapped averager's landing step follows the step count: synchronize on one member alone is "
    "safe",
    "[model_averaging][overlap][adversarial]") {
  // Found by the second hostile pass: synchronize() is not collective and is the way to save a checkpoint
  // on rank 0 alone; the landing step was decided from the average still in flight, so the member that
  // had synchronized skipped the landing the others made (their next collectives mismatched).
  const auto run = [](bool synchronize_member_0) {
    std::vector<std::vector<float>> seen(4);
    const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
      Eigen::VectorXf w = Eigen::VectorXf::Zero(64);
      ParameterList<float> list;
      list.add("w", w);
      PeriodicModelAverager<ThreadCommunicator> averager(4, 0, comm, polyak::Overlap{2});
      for (int t = 0; t < 13; ++t) {
        w.array() += static_cast<float>(comm.rank() + 1);  // integers: every order of sums is exact
        averager.average_parameters(list);
        if (synchronize_member_0 && comm.rank() == 0 && t % 4 == 1) averager.synchronize(list);
      }
      averager.synchronize(list);
      seen[static_cast<std::size_t>(comm.rank())].assign(w.data(), w.data() + w.size());
    });
    CHECK(errors == std::vector<std::string>(4));
    return seen;
  };
  CHECK(run(true) == run(false));  // x <- mean(x_s) + (x - x_s): the same sums, landed early or not
}

TEST_CASE("a hierarchy whose groups do not nest, or hold one member, agrees over the whole group",
          "[model_averaging][overlap][adversarial]") {
  // Pairs and triples straddle ({2: 2, 3: 3, 6: 6} on 6 members): a member failing at step 3 was
  // refused by its triple and its pair's landing, while the other triple started without it and
  // waited forever. A group of one ({2: 1, ...}) had no one to disagree with a list of another type.
  struct Case {
    std::vector<std::pair<std::int64_t, int>> levels;
    int members;
    std::int64_t fail_at;
  };
  for (const Case& c : {Case{{{2, 2}, {3, 3}, {6, 6}}, 6, 3}, Case{{{2, 1}, {3, 2}, {6, 4}}, 4, 2}}) {
    CAPTURE(c.members, c.fail_at);
    std::vector<Refusal> seen(static_cast<std::size_t>(c.members));
    std::vector<std::int64_t> finished(static_cast<std::size_t>(c.members), -1);
    const auto errors = on_threads(c.members, [&](ThreadCommunicator& comm) {
      const int rank = comm.rank();
      Eigen::VectorXf w = Eigen::VectorXf::Zero(16);
      Eigen::VectorXd wide = Eigen::VectorXd::Zero(16);
      ParameterList<float> list;
      list.add("w", w);
      ParameterList<double> doubles;
      doubles.add("w", wide);
      HierarchicalModelAverager<ThreadCommunicator> averager(c.levels, 0, comm, polyak::Overlap{1});
      for (std::int64_t t = 0; t < 13; ++t) {
        w.array() += static_cast<float>(rank + 1);
        const Eigen::VectorXf before = w;
        try {
          if (rank == 0 && t == c.fail_at) {
            averager.average_parameters(doubles);  // another scalar type, on member 0 alone
          } else {
            averager.average_parameters(list);
          }
        } catch (const std::exception& e) {
          seen[static_cast<std::size_t>(rank)] = {t, e.what(), w == before && averager.step() == t};
          averager.average_parameters(list);  // every member tries the step again, repaired: it goes on
        }
      }
      finished[static_cast<std::size_t>(rank)] = averager.step();
    });
    CHECK(errors == std::vector<std::string>(static_cast<std::size_t>(c.members)));
    for (std::size_t r = 0; r < seen.size(); ++r) {
      CAPTURE(r, seen[r].message);
      CHECK(seen[r].step == c.fail_at);
      CHECK(seen[r].unchanged);
      CHECK(finished[r] == 13);
    }
  }
}

TEST_CASE("overlap_delay reports the overlap an averager was made with, blocking is 0", "[overlap]") {
  const auto errors = on_threads(2, [](ThreadCommunicator& comm) {
    const PeriodicModelAverager<ThreadCommunicator> blocking(4, 0, comm);
    const PeriodicModelAverager<ThreadCommunicator> overlapped(4, 0, comm, polyak::Overlap{3});
    const HierarchicalModelAverager<ThreadCommunicator> hierarchy({{2, 1}, {4, 2}}, 0, comm,
                                                                  polyak::Overlap{1});
    if (blocking.overlap_delay() != 0 || overlapped.overlap_delay() != 3 || hierarchy.overlap_delay() != 1)
      throw std::runtime_error("overlap_delay: " + std::to_string(blocking.overlap_delay()) + ", " +
                               std::to_string(overlapped.overlap_delay()) + ", " +
                               std::to_string(hierarchy.overlap_delay()));
  });
  for (const auto& e : errors) CHECK(e.empty());
}
