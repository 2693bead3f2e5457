// SPDX-License-Identifier: MIT
#include "polyak/core/swalr.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <stdexcept>
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
/// An optimizer whose second group refuses rates below 0.01 (as dlib's trainer refuses 0).
struct PickyOptimizer {
  std::vector<double> rates;
};
}  // namespace

template <>
struct polyak::learning_rates<PickyOptimizer> {
  static std::size_t size(const PickyOptimizer& o) { return o.rates.size(); }
  static double get(const PickyOptimizer& o, std::size_t g) { return o.rates[g]; }
  static void set(PickyOptimizer& o, std::size_t g, double lr) {
    if (g == 1 && lr < 0.01) throw std::invalid_argument("group 1 takes no rate below 0.01");
    o.rates[g] = lr;
  }
};

TEST_CASE("SWALR's step is all or nothing where the optimizer refuses a rate", "[swalr]") {
  PickyOptimizer optimizer{{0.1, 0.1}};
  SWALR scheduler(optimizer, 0.0, 2, polyak::AnnealStrategy::Linear);  // 0.1 -> 0.05 -> 0
  scheduler.step();
  REQUIRE(optimizer.rates == std::vector<double>{0.05, 0.05});
  const auto epoch = scheduler.last_epoch();
  const auto last = scheduler.get_last_lr();
  CHECK_THROWS_WITH(scheduler.step(), Catch::Contains("below 0.01"));
  CHECK(optimizer.rates == std::vector<double>{0.05, 0.05});  // group 0 took its rate back
  CHECK(scheduler.last_epoch() == epoch);
  CHECK(scheduler.get_last_lr() == last);
}

TEST_CASE("SWALR names an unsigned anneal_epochs beyond int64 by its value", "[swalr]") {
  std::vector<double> lrs{0.1};
  CHECK_THROWS_WITH(SWALR(lrs, 0.01, std::uint64_t{1} << 63), Catch::Contains("9223372036854775808"));
  CHECK(lrs == std::vector<double>{0.1});
}
