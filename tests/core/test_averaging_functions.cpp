// SPDX-License-Identifier: MIT
#include "polyak/core/averaging_functions.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "test_types.hpp"

using polyak::EMA;
using polyak::SWA;

namespace {
Eigen::ArrayXd array_of(std::initializer_list<double> values) {
  Eigen::ArrayXd out(static_cast<Eigen::Index>(values.size()));
  Eigen::Index i = 0;
  for (const double v : values) out[i++] = v;
  return out;
}
}  // namespace

TEST_CASE("SWA is the running mean: after k snapshots, their mean", "[averaging_functions]") {
  const Eigen::ArrayXd snapshots[] = {array_of({1, -2, 4}), array_of({3, 0, 4}), array_of({8, 5, -5}),
                                      array_of({0, 1, 1})};
  Eigen::ArrayXd averaged = snapshots[0];
  for (std::int64_t k = 1; k < 4; ++k) SWA{}(averaged, snapshots[k], k);
  CHECK(averaged[0] == Approx(3.0).epsilon(1e-15));
  CHECK(averaged[1] == Approx(1.0).epsilon(1e-15));
  CHECK(averaged[2] == Approx(1.0).epsilon(1e-15));
}

TEST_CASE("EMA is the lerp towards the current weights", "[averaging_functions]") {
  SECTION("small weight: averaged + (1 - decay) * (current - averaged)") {
    Eigen::ArrayXd averaged = array_of({1, 2});
    EMA{0.75}(averaged, array_of({5, -2}), 1);
    CHECK(averaged[0] == 2.0);
    CHECK(averaged[1] == 1.0);
  }
  SECTION("weight 0.5 or more takes lerp's other branch with the same value") {
    Eigen::ArrayXd averaged = array_of({1, 2});
    EMA{0.25}(averaged, array_of({5, -2}), 1);
    CHECK(averaged[0] == 4.0);
    CHECK(averaged[1] == -1.0);
  }
  SECTION("decay 1 keeps the average, decay 0 takes the current weights") {
    Eigen::ArrayXd averaged = array_of({1, 2});
    EMA{1.0}(averaged, array_of({5, -2}), 1);
    CHECK((averaged == array_of({1, 2})).all());
    EMA{0.0}(averaged, array_of({5, -2}), 2);
    CHECK((averaged == array_of({5, -2})).all());
  }
  SECTION("an EMA of a constant is that constant, exactly") {
    Eigen::ArrayXf averaged = Eigen::ArrayXf::Constant(5, 0.3f);
    const Eigen::ArrayXf current = averaged;
    for (int k = 1; k < 100; ++k) EMA{0.999}(averaged, current, k);
    CHECK((averaged == current).all());
  }
}

TEST_CASE("EMA refuses a decay outside [0, 1], naming it", "[averaging_functions]") {
  CHECK_THROWS_WITH(EMA{-0.1}, Catch::Contains("-0.1") && Catch::Contains("[0, 1]"));
  CHECK_THROWS_WITH(EMA{1.5}, Catch::Contains("1.5"));
  CHECK_THROWS_AS(EMA{std::numeric_limits<double>::quiet_NaN()}, std::invalid_argument);
  CHECK_THROWS_AS(polyak::get_ema_avg_fn(2.0), std::invalid_argument);
  CHECK_THROWS_AS(polyak::get_ema_multi_avg_fn(-1.0), std::invalid_argument);
  CHECK(EMA{}.decay() == 0.999);  // PyTorch's default
  CHECK(polyak::get_ema_multi_avg_fn(0.5).fn.decay() == 0.5);
}

TEST_CASE("mixed precision: a half current folded into a float average", "[averaging_functions]") {
  Eigen::ArrayXf averaged = Eigen::ArrayXf::Constant(3, 1.0f);
  Eigen::Array<Eigen::half, Eigen::Dynamic, 1> current(3);
  current.setConstant(Eigen::half(2.0f));
  SWA{}(averaged, current, 1);
  CHECK((averaged == 1.5f).all());
}

TEST_CASE("get_swa_avg_fn and get_ema_avg_fn give PyTorch's rules: SWA, and EMA with the decay asked",
          "[averaging_functions]") {
  Eigen::ArrayXd by_name = array_of({1, 2}), by_type = by_name;
  const Eigen::ArrayXd current = array_of({7, -4});
  polyak::get_swa_avg_fn()(by_name, current, 3);
  SWA{}(by_type, current, 3);
  CHECK((by_name == by_type).all());
  CHECK(by_name[0] == 2.5);  // 1 + (7 - 1) / (3 + 1)
  by_name = array_of({1, 2});
  polyak::get_ema_avg_fn(0.75)(by_name, current, 3);
  CHECK(by_name[0] == 2.5);  // 1 + 0.25 * (7 - 1)
  CHECK(by_name[1] == 0.5);  // 2 + 0.25 * (-4 - 2)
}
