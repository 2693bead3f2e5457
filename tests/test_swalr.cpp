// SPDX-License-Identifier: MIT
#include "polyak/checkpoint.hpp"
#include "polyak/core/swalr.hpp"
#include "polyak/checkpoint/state_dict.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include "reference_file.hpp"

using polyak::AnnealStrategy;
using polyak::SWALR;

TEST_CASE("SWALR agrees with PyTorch's SWALR, alone and chained", "[reference][swalr]") {
  // The golden file: tests/reference/swalr.py (see its docstring for the cases and the format).
  const auto records = polyak_test::read_records("swalr.txt");
  int cases = 0;
  double worst = 0;
  for (std::size_t r = 0; r < records.size(); ++r) {
    if (records[r].kind != "case") continue;
    const auto& head = records[r].words;
    const auto strategy = head.at(0) == "cos" ? AnnealStrategy::Cos : AnnealStrategy::Linear;
    const auto anneal_epochs = std::stoll(head.at(1));
    const double chain = head.at(2) == "-" ? 0.0 : std::stod(head.at(2));
    std::vector<double> lrs{records[r].number(3), records[r].number(4)};
    std::vector<double> swa_lrs;
    for (std::size_t i = 6; i < head.size(); ++i) swa_lrs.push_back(records[r].number(i));
    INFO("case " << head.at(0) << " anneal_epochs " << anneal_epochs << " chain " << chain << " swa_lrs "
                 << swa_lrs.size());

    auto scheduler = swa_lrs.size() == 1 ? SWALR(lrs, swa_lrs[0], anneal_epochs, strategy)
                                         : SWALR(lrs, swa_lrs, anneal_epochs, strategy);
    int steps = 0;
    for (++r; records.at(r).kind == "lrs"; ++r, ++steps) {
      if (steps > 0) {
        if (chain != 0) {
          for (double& lr : lrs) lr *= chain;  // PyTorch's MultiplicativeLR with a constant factor
        }
        scheduler.step();
      }
      const auto expected = records[r].numbers();
      REQUIRE(lrs.size() == expected.size());
      for (std::size_t g = 0; g < lrs.size(); ++g) {
        INFO("step " << steps << " group " << g);
        CHECK(std::abs(lrs[g] - expected[g]) <= 1e-12 * expected[g]);
        worst = std::max(worst, std::abs(lrs[g] - expected[g]) / expected[g]);
      }
      CHECK(scheduler.get_last_lr() == lrs);
    }
    CHECK(steps >= 31);  // the rates after construction and after at least 30 steps
    ++cases;
  }
  CHECK(cases == 24);
  std::cout << "reference SWALR: largest relative error " << worst << " over " << cases << " cases\n";
}

TEST_CASE("SWALR's closed form: linear anneal over 4 epochs", "[swalr]") {
  // initial 0.1, swa_lr 0.02: the rate moves by (0.1 - 0.02) / 4 each step, then stays.
  std::vector<double> lrs{0.1};
  SWALR scheduler(lrs, 0.02, 4, AnnealStrategy::Linear);
  CHECK(lrs[0] == Approx(0.1));
  for (const double expected : {0.08, 0.06, 0.04, 0.02, 0.02, 0.02}) {
    scheduler.step();
    CHECK(lrs[0] == Approx(expected).epsilon(1e-14));
  }
  CHECK(scheduler.last_epoch() == 6);
}

TEST_CASE("SWALR refuses bad settings and changes nothing", "[swalr]") {
  std::vector<double> lrs{0.1, 0.05};
  CHECK_THROWS_WITH(SWALR(lrs, 0.01, -1), Catch::Contains("anneal_epochs") && Catch::Contains("-1"));
  CHECK_THROWS_WITH(SWALR(lrs, std::vector<double>{0.1, 0.2, 0.3}),
                    Catch::Contains("3 values for 2 parameter groups"));
  CHECK_THROWS_WITH(SWALR(lrs, -0.5), Catch::Contains("-0.5"));
  CHECK_THROWS_AS(SWALR(lrs, std::nan("")), std::invalid_argument);
  CHECK(lrs == std::vector<double>{0.1, 0.05});
}

TEST_CASE("SWALR's state restores the schedule where it left off", "[swalr]") {
  std::vector<double> lrs{0.1, 0.05};
  SWALR scheduler(lrs, {0.01, 0.02}, 6, AnnealStrategy::Cos);
  for (int k = 0; k < 3; ++k) scheduler.step();
  const auto state = scheduler.state_dict();
  const auto saved_lrs = lrs;
  std::vector<double> uninterrupted;
  for (int k = 0; k < 5; ++k) scheduler.step();
  uninterrupted = lrs;

  std::vector<double> resumed_lrs = saved_lrs;
  SWALR resumed(resumed_lrs, {0.5, 0.5}, 1);  // other settings, replaced by the state
  resumed_lrs = saved_lrs;                    // the optimizer's rates as they were saved
  resumed.load_state_dict(state);
  for (int k = 0; k < 5; ++k) resumed.step();
  CHECK(resumed_lrs == uninterrupted);

  std::vector<double> one_group{0.1};
  SWALR other(one_group, 0.01);
  const auto before = other.state_dict();
  CHECK_THROWS_WITH(other.load_state_dict(state), Catch::Contains("'swa_lrs' has shape [2], expected [1]"));
  CHECK(other.state_dict().scalar<std::int64_t>("step_count") == before.scalar<std::int64_t>("step_count"));
}

namespace {
/// A user's optimizer with its own notion of parameter groups.
struct MyOptimizer {
  struct Group {
    double learning_rate;
  };
  std::vector<Group> groups;
};
}  // namespace

template <>
struct polyak::learning_rates<MyOptimizer> {
  static std::size_t size(const MyOptimizer& o) { return o.groups.size(); }
  static double get(const MyOptimizer& o, std::size_t g) { return o.groups[g].learning_rate; }
  static void set(MyOptimizer& o, std::size_t g, double lr) { o.groups[g].learning_rate = lr; }
};

TEST_CASE("SWALR drives any optimizer type through learning_rates", "[swalr]") {
  MyOptimizer optimizer{{{0.1}, {0.2}}};
  SWALR scheduler(optimizer, 0.05, 0);
  CHECK(optimizer.groups[0].learning_rate == 0.05);
  CHECK(optimizer.groups[1].learning_rate == 0.05);
}

namespace {

/// `sd` with the entry `name` replaced by `tensor` (a hostile checkpoint, built from a real one).
polyak::StateDict with_entry(const polyak::StateDict& sd, const std::string& name,
                             polyak::StoredTensor tensor) {
  polyak::StateDict out;
  out.metadata = sd.metadata;
  for (const auto& [key, value] : sd) out.insert(key, key == name ? tensor : value);
  return out;
}

template <class T>
polyak::StoredTensor stored(std::vector<T> values, std::vector<std::int64_t> shape) {
  polyak::StateDict one;
  one.insert("x", values.data(), std::move(shape));
  return one.at("x");
}

}  // namespace

// Issue 12, item 8: load_state_dict skipped the constructor's checks: swa_lrs {-5, NaN} were
// accepted and the next step wrote lr -2.31 and NaN; a step_count of INT64_MAX overflowed at the next
// step (UBSan).
TEST_CASE("SWALR refuses a state its constructor would refuse and changes nothing", "[swalr]") {
  std::vector<double> lrs{0.1, 0.2};
  polyak::SWALR scheduler(lrs, 0.05, 4);
  scheduler.step();
  const polyak::StateDict good = scheduler.state_dict();
  const auto lrs_before = lrs;
  const auto epoch_before = scheduler.last_epoch();
  auto refused = [&](const polyak::StateDict& bad, const std::string& fragment) {
    CHECK_THROWS_AS(scheduler.load_state_dict(bad), polyak::FormatError);
    CHECK_THROWS_WITH(scheduler.load_state_dict(bad), Catch::Contains(fragment));
    CHECK(lrs == lrs_before);
    CHECK(scheduler.last_epoch() == epoch_before);
  };
  const double nan = std::nan("");
  const auto max = std::numeric_limits<std::int64_t>::max();
  refused(with_entry(good, "swa_lrs", stored<double>({-5.0, nan}, {2})), "swa_lr");
  refused(with_entry(good, "swa_lrs", stored<double>({0.05, std::numeric_limits<double>::infinity()}, {2})),
          "swa_lr");
  refused(with_entry(good, "last_lrs", stored<double>({nan, 0.1}, {2})), "last_lr");
  refused(with_entry(good, "step_count", stored<std::int64_t>({max}, {})), "step_count");
  refused(with_entry(good, "step_count", stored<std::int64_t>({-1}, {})), "step_count");
  refused(with_entry(good, "last_epoch", stored<std::int64_t>({max}, {})), "last_epoch");
  refused(with_entry(good, "last_epoch", stored<std::int64_t>({-2}, {})), "last_epoch");
  refused(with_entry(good, "anneal_epochs", stored<std::int64_t>({-3}, {})), "anneal_epochs");
  scheduler.load_state_dict(good);  // and the good one still loads
  scheduler.step();
  CHECK(std::isfinite(lrs[0]));
}
