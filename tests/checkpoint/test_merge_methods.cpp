// SPDX-License-Identifier: MIT
// mergekit's methods beyond the first five (merge_options.hpp): DARE-TIES and linear DARE,
// Breadcrumbs (and with TIES), DELLA (and linear), Model Stock, NearSwap, SCE, and the options they
// share (per-model densities, normalize, rescale). Each against its formula worked by hand here
// from the papers' and mergekit's definitions, on small tensors, with the cases each definition fixes;
// each random method's keep rate within 5 standard deviations.
#include "polyak/checkpoint/merge.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using polyak::MergeMethod;
using polyak::MergeOptions;
using polyak::StateDict;

StateDict tensor_of(const std::vector<float>& x, std::vector<std::int64_t> shape = {}) {
  StateDict sd;
  if (shape.empty()) shape = {static_cast<std::int64_t>(x.size())};
  sd.insert("w", x.data(), shape);
  return sd;
}

std::vector<double> merge_of(const std::vector<StateDict>& models, const StateDict& base,
                             const MergeOptions& o) {
  std::vector<const StateDict*> inputs;
  for (const auto& m : models) inputs.push_back(&m);
  return polyak::to_doubles(polyak::merge_state_dicts(inputs, &base, o).at("w"));
}

MergeOptions method(MergeMethod m) {
  MergeOptions o;
  o.method = m;
  return o;
}

}  // namespace

TEST_CASE("Breadcrumbs drops the largest gamma and the smallest magnitudes", "[merge][breadcrumbs]") {
  const StateDict base = tensor_of(std::vector<float>(10, 0.0f));
  const StateDict one_to_ten = tensor_of({1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
  MergeOptions o = method(MergeMethod::Breadcrumbs);
  o.density = 0.5;  // 5 kept; gamma 0.1: the top 1 dropped, then the 4 smallest
  o.gamma = 0.1;
  CHECK(merge_of({one_to_ten}, base, o) == std::vector<double>{0, 0, 0, 0, 5, 6, 7, 8, 9, 0});
  o.gamma = 0;  // none dropped from the top (mergekit's slice [n_bot:-0] would keep nothing)
  CHECK(merge_of({one_to_ten}, base, o) == std::vector<double>{0, 0, 0, 0, 0, 6, 7, 8, 9, 10});
  o.gamma = 0.8;  // 8 from the top and 5 kept cannot both hold: 5 from the top, none from the bottom
  CHECK(merge_of({one_to_ten}, base, o) == std::vector<double>{1, 2, 3, 4, 5, 0, 0, 0, 0, 0});
  o.gamma = 0.1;
  o.density = 1;  // everything, outliers too (mergekit's)
  CHECK(merge_of({one_to_ten}, base, o) == std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
  o.density = 0.5;
  o.rescale = true;  // the L1 norm kept: 55 / (5 + 6 + 7 + 8 + 9)
  const auto rescaled = merge_of({one_to_ten}, base, o);
  CHECK(rescaled[4] == Approx(5 * 55.0 / 35).epsilon(1e-7));
  CHECK(rescaled[9] == 0);
  // Equal magnitudes: the earlier position ranks higher. Four 2s, density 0.5, gamma 0.25: the
  // highest (position 0) dropped, then the lowest (position 3).
  o = method(MergeMethod::Breadcrumbs);
  o.density = 0.5;
  o.gamma = 0.25;
  CHECK(merge_of({tensor_of({2, -2, 2, 2})}, tensor_of({0, 0, 0, 0}), o) == std::vector<double>{0, -2, 2, 0});
  // A streamed tensor of many equal magnitudes: exactly floor(d n) kept, at the right positions.
  const std::size_t n = 100000;  // magnitudes 1, 2, 3, 4 repeating; gamma 0.05 drops the first 5,000 fours
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<float>(i % 4 + 1);
  o.density = 0.5;
  o.gamma = 0.05;  // keeps 50,000: the other 20,000 fours, all 25,000 threes and the first 5,000 twos
  const auto kept = merge_of({tensor_of(x)}, tensor_of(std::vector<float>(n, 0.0f)), o);
  std::size_t counts[5] = {0, 0, 0, 0, 0}, first_four = n, last_two = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const auto v = static_cast<std::size_t>(kept[i]);
    REQUIRE((kept[i] == 0 || kept[i] == x[i]));
    ++counts[v];
    if (v == 4 && first_four == n) first_four = i;
    if (v == 2) last_two = i;
  }
  CHECK(counts[4] == 20000);
  CHECK(counts[3] == 25000);
  CHECK(counts[2] == 5000);
  CHECK(counts[1] == 0);
  CHECK(first_four == 4 * 5000 + 3);  // the fours before it were the top 5,000
  CHECK(last_two == 4 * 4999 + 1);    // the 5,000th two
}

TEST_CASE("sign consensus with and without normalizing: TIES, Breadcrumbs-TIES, DARE-TIES at density 1",
          "[merge][ties]") {
  const StateDict base = tensor_of({0, 0, 0, 0});
  const std::vector<StateDict> models{tensor_of({3, -1, 2, -4}), tensor_of({-2, 2, 1, -1})};
  // Elected signs from the sums 1, 1, 3, -5: +, +, +, -. The agreeing values: {3}, {2}, {2, 1}, {-4, -1}.
  CHECK(merge_of(models, base, method(MergeMethod::BreadcrumbsTies)) == std::vector<double>{3, 2, 3, -5});
  CHECK(merge_of(models, base, method(MergeMethod::DareTies)) == std::vector<double>{3, 2, 3, -5});
  CHECK(merge_of(models, base, method(MergeMethod::Ties)) == std::vector<double>{3, 2, 1.5, -2.5});
  MergeOptions o = method(MergeMethod::Ties);
  o.normalize = false;
  CHECK(merge_of(models, base, o) == std::vector<double>{3, 2, 3, -5});
  o = method(MergeMethod::DareTies);
  o.normalize = true;
  CHECK(merge_of(models, base, o) == std::vector<double>{3, 2, 1.5, -2.5});
  o = method(MergeMethod::Della);  // density 1: TIES (sign consensus, normalized)
  CHECK(merge_of(models, base, o) == std::vector<double>{3, 2, 1.5, -2.5});
  // Weights weigh the election: 3 * 1 < 2 * 2 elects - at element 0.
  o = method(MergeMethod::BreadcrumbsTies);
  o.weights = {1, 2};
  CHECK(merge_of(models, base, o) == std::vector<double>{-4, 4, 4, -6});
  // Per-model densities: the second model keeps nothing (its task vector is all zero).
  o = method(MergeMethod::Ties);
  o.densities = {1, 0};
  CHECK(merge_of(models, base, o) == std::vector<double>{3, -1, 2, -4});
  // 65 models (the former limit was 64): each +1, the mean 1.
  std::vector<StateDict> many(65, tensor_of({1, 1, 1, 1}));
  CHECK(merge_of(many, base, method(MergeMethod::Ties)) == std::vector<double>{1, 1, 1, 1});
}

TEST_CASE("normalize divides the task arithmetic by the weights", "[merge]") {
  MergeOptions o = method(MergeMethod::TaskArithmetic);
  o.normalize = true;
  o.weights = {1, 3};
  CHECK(merge_of({tensor_of({2}), tensor_of({4})}, tensor_of({1}), o) ==
        std::vector<double>{1 + (1 * 1 + 3 * 3) / 4.0});
  o = method(MergeMethod::DareLinear);  // density 1: task arithmetic, normalized on request
  o.normalize = true;
  o.weights = {1, -1};  // the weights sum to 0: divided by 1 (mergekit's guard)
  CHECK(merge_of({tensor_of({2}), tensor_of({4})}, tensor_of({1}), o) == std::vector<double>{1 + (1 - 3)});
}

TEST_CASE("linear DARE and DARE-TIES: seeded drops, mergekit's L1 rescale", "[merge][dare]") {
  const std::size_t n = 40000;
  const StateDict zeros = tensor_of(std::vector<float>(n, 0.0f));
  std::vector<float> signs(n);
  for (std::size_t i = 0; i < n; ++i) signs[i] = i % 2 ? 1.0f : -1.0f;
  const StateDict x = tensor_of(signs);
  MergeOptions o = method(MergeMethod::DareLinear);
  o.density = 0.3;
  o.seed = 5;
  const auto a = merge_of({x}, zeros, o);
  std::size_t kept = 0;
  for (const double v : a) kept += v != 0;
  // Binomial(n, 0.3) within 5 sd; each kept value rescaled so the L1 norm stays n: n / kept.
  const double mean = 0.3 * n, sd = std::sqrt(n * 0.3 * 0.7);
  CHECK(std::abs(static_cast<double>(kept) - mean) < 5 * sd);
  for (std::size_t i = 0; i < n; ++i) {
    if (a[i] != 0)
      REQUIRE(a[i] == Approx(signs[i] * static_cast<double>(n) / static_cast<double>(kept)).epsilon(1e-6));
  }
  CHECK(merge_of({x}, zeros, o) == a);  // seeded: the same draws
  o.seed = 6;
  CHECK(merge_of({x}, zeros, o) != a);
  o.rescale = false;  // unrescaled: each kept value as it was
  for (const double v : merge_of({x}, zeros, o)) REQUIRE((v == 0 || std::abs(v) == 1));
  o = method(MergeMethod::DareLinear);
  o.density = 0;  // nothing kept: the base
  CHECK(merge_of({x}, zeros, o) == std::vector<double>(n, 0.0));
  // DARE-TIES: model draws independent, the sign elected from what survived.
  o = method(MergeMethod::DareTies);
  o.density = 0.5;
  o.rescale = false;
  o.seed = 9;
  const StateDict plus = tensor_of(std::vector<float>(n, 1.0f)),
                  minus = tensor_of(std::vector<float>(n, -1.0f));
  std::size_t pos = 0, neg = 0;
  for (const double v : merge_of({plus, minus}, zeros, o)) {
    REQUIRE((v == 0 || v == 1 || v == -1));  // one sign wins; both dropped, or a tie (+1 - 1 = 0 elects +)
    pos += v == 1;
    neg += v == -1;
  }
  // + wins where the + model survives (P = 0.5); - only where + dropped and - kept (P = 0.25).
  CHECK(std::abs(static_cast<double>(pos) - 0.5 * n) < 5 * std::sqrt(n * 0.25));
  CHECK(std::abs(static_cast<double>(neg) - 0.25 * n) < 5 * std::sqrt(n * 0.25 * 0.75));
}

TEST_CASE("DELLA keeps by rank within each row, from density - epsilon to density + epsilon",
          "[merge][della]") {
  // 20,000 rows of 3: magnitudes 3, 1, 2 rank 2, 0, 1: kept with probability 0.9, 0.1 and 0.5
  // (density 0.5, epsilon 0.4).
  const std::size_t rows = 20000;
  std::vector<float> x(rows * 3);
  for (std::size_t r = 0; r < rows; ++r) {
    x[3 * r] = 3;
    x[3 * r + 1] = -1;
    x[3 * r + 2] = 2;
  }
  MergeOptions o = method(MergeMethod::DellaLinear);
  o.density = 0.5;
  o.epsilon = 0.4;
  o.rescale = false;
  o.seed = 3;
  const auto shape = std::vector<std::int64_t>{static_cast<std::int64_t>(rows), 3};
  const auto merged =
      merge_of({tensor_of(x, shape)}, tensor_of(std::vector<float>(rows * 3, 0.0f), shape), o);
  double kept[3] = {0, 0, 0};
  for (std::size_t i = 0; i < merged.size(); ++i) {
    REQUIRE((merged[i] == 0 || merged[i] == x[i]));
    kept[i % 3] += merged[i] != 0;
  }
  const double probability[3] = {0.9, 0.1, 0.5};
  for (int c = 0; c < 3; ++c) {
    CAPTURE(c);
    CHECK(std::abs(kept[c] - probability[c] * rows) <
          5 * std::sqrt(rows * probability[c] * (1 - probability[c])));
  }
  // A vector is one row: 10,000 equal magnitudes rank by position, earlier higher, so the first
  // half keeps more often (mean probability 0.7) than the second (0.3).
  const std::size_t n = 10000;
  const auto flat =
      merge_of({tensor_of(std::vector<float>(n, 1.0f))}, tensor_of(std::vector<float>(n, 0.0f)), o);
  double first = 0, second = 0;
  for (std::size_t i = 0; i < n; ++i) (i < n / 2 ? first : second) += flat[i];
  CHECK(std::abs(first - 0.7 * n / 2) < 5 * std::sqrt(n / 2 * 0.25));
  CHECK(std::abs(second - 0.3 * n / 2) < 5 * std::sqrt(n / 2 * 0.25));
  // Distinct magnitudes n - i, signs alternating: rank n - 1 - i, the same halves by value.
  std::vector<float> falling(n);
  for (std::size_t i = 0; i < n; ++i) falling[i] = static_cast<float>(n - i) * (i % 2 ? -1.0f : 1.0f);
  const auto ranked = merge_of({tensor_of(falling)}, tensor_of(std::vector<float>(n, 0.0f)), o);
  first = second = 0;
  for (std::size_t i = 0; i < n; ++i) {
    REQUIRE((ranked[i] == 0 || ranked[i] == falling[i]));
    (i < n / 2 ? first : second) += ranked[i] != 0;
  }
  CHECK(std::abs(first - 0.7 * n / 2) < 5 * std::sqrt(n / 2 * 0.25));
  CHECK(std::abs(second - 0.3 * n / 2) < 5 * std::sqrt(n / 2 * 0.25));
  // One column: the density itself.
  const auto column = merge_of({tensor_of(std::vector<float>(n, 1.0f), {static_cast<std::int64_t>(n), 1})},
                               tensor_of(std::vector<float>(n, 0.0f), {static_cast<std::int64_t>(n), 1}), o);
  double ones = 0;
  for (const double v : column) ones += v;
  CHECK(std::abs(ones - 0.5 * n) < 5 * std::sqrt(n * 0.25));
}

TEST_CASE("Model Stock: t = n cos / (1 + (n - 1) cos) between the mean and the base",
          "[merge][model_stock]") {
  const MergeOptions o = method(MergeMethod::ModelStock);
  const double t = 2 * (std::sqrt(2.0) - 1);  // two task vectors at 45 degrees: 2 c / (1 + c), c = 1/sqrt 2
  auto result = merge_of({tensor_of({2, 1}), tensor_of({2, 2})}, tensor_of({1, 1}), o);
  CHECK(result[0] == Approx(t * 2 + (1 - t) * 1).epsilon(1e-6));
  CHECK(result[1] == Approx(t * 1.5 + (1 - t) * 1).epsilon(1e-6));
  // Orthogonal task vectors: t = 0, the base; equal ones: t = 1, the mean.
  CHECK(merge_of({tensor_of({1, 0, 0}), tensor_of({0, 1, 0}), tensor_of({0, 0, 1})}, tensor_of({0, 0, 0}),
                 o) == std::vector<double>{0, 0, 0});
  CHECK(merge_of({tensor_of({1, 2}), tensor_of({1, 2}), tensor_of({1, 2})}, tensor_of({0, 0}), o) ==
        std::vector<double>{1, 2});
  // Zero task vectors: |a||b| taken as 1e-6, cos 0, the base.
  CHECK(merge_of({tensor_of({1, 1}), tensor_of({1, 1})}, tensor_of({1, 1}), o) == std::vector<double>{1, 1});
  // Opposite task vectors of two models: 1 + (n - 1) cos = 0, refused.
  CHECK_THROWS_WITH(merge_of({tensor_of({1, 2}), tensor_of({-1, -2})}, tensor_of({0, 0}), o),
                    Catch::Contains("t is undefined"));
  // filter_wise: a t per row of the last dimension.
  MergeOptions rows = o;
  rows.filter_wise = true;
  result = merge_of({tensor_of({1, 0, 0, 1}, {2, 2}), tensor_of({1, 1, 0, 1}, {2, 2})},
                    tensor_of({0, 0, 0, 0}, {2, 2}), rows);
  CHECK(result[0] == Approx(t * 1).epsilon(1e-6));  // row 0: 45 degrees
  CHECK(result[1] == Approx(t * 0.5).epsilon(1e-6));
  CHECK(result[2] == 0);  // row 1: equal task vectors, the mean
  CHECK(result[3] == 1);
}

TEST_CASE("NearSwap moves the base toward the model where they are within t", "[merge][nearswap]") {
  MergeOptions o = method(MergeMethod::NearSwap);
  o.t = 0.5;
  // |b - x| = 0.1: weight min(1, 5) = 1, the model; 1: weight 0.5; 0: the model; 4: weight 1/8.
  CHECK(merge_of({tensor_of({0.125f, 1, 3, 4})}, tensor_of({0, 0, 3, 0}), o) ==
        std::vector<double>{0.125, 0.5, 3, 0.5});
}

TEST_CASE("SCE: the highest-variance scalars, weighted by mean square, TIES signs", "[merge][sce]") {
  const StateDict base = tensor_of({0, 0, 0, 0});
  const std::vector<StateDict> models{tensor_of({1, 2, 0, 4}), tensor_of({1, -2, 0, 2})};
  // Variances 0, 4, 0, 1. Weights: (1 + 4 + 16) / 4 and (1 + 4 + 4) / 4, normalized: 0.7 and 0.3.
  // Signs from the sums 2, 0, 0, 6: +, +, +, +; element 1 only the first agrees; element 2 nobody.
  MergeOptions o = method(MergeMethod::Sce);
  auto result = merge_of(models, base, o);
  CHECK(result[0] == Approx(1));
  CHECK(result[1] == Approx(2));
  CHECK(result[2] == 0);
  CHECK(result[3] == Approx(0.7 * 4 + 0.3 * 2));
  // select_topk 0.5 of the 2 nonzero variances: element 1 alone; weights 1 and 1 (0.5 each).
  o.select_topk = 0.5;
  CHECK(merge_of(models, base, o) == std::vector<double>{0, 2, 0, 0});
  // One model: every variance 0, nothing selected below 1: the base; at 1, the model.
  CHECK(merge_of({models[0]}, base, o) == std::vector<double>{0, 0, 0, 0});
  CHECK(merge_of({models[0]}, base, method(MergeMethod::Sce)) == std::vector<double>{1, 2, 0, 4});
}

TEST_CASE("the new methods take integer tensors from the last model and round once to bf16", "[merge]") {
  StateDict base, a, b;
  const Eigen::bfloat16 zero[1] = {Eigen::bfloat16(0.0f)};
  const Eigen::bfloat16 one[1] = {Eigen::bfloat16(1.0f)};
  const Eigen::bfloat16 near[1] = {Eigen::bfloat16(1.0078125f)};  // 1 + 2^-7, one bf16 ulp above 1
  base.insert("w", zero, {1});
  a.insert("w", one, {1});
  b.insert("w", near, {1});
  base.insert_scalar<std::int64_t>("n", 1);
  a.insert_scalar<std::int64_t>("n", 2);
  b.insert_scalar<std::int64_t>("n", 3);
  // Model Stock of parallel task vectors is their mean, 1 + 2^-8: a tie, rounded to even (1).
  const StateDict merged = polyak::merge_state_dicts({&a, &b}, &base, method(MergeMethod::ModelStock));
  CHECK(merged.at("w").dtype == polyak::DType::BF16);
  CHECK(polyak::to_doubles(merged.at("w"))[0] == 1.0);
  CHECK(merged.scalar<std::int64_t>("n") == 3);
  MergeOptions o = method(MergeMethod::NearSwap);
  o.t = 1;
  CHECK(polyak::merge_state_dicts({&b}, &base, o).scalar<std::int64_t>("n") == 3);
}

// The hostile pass's cases (issue 24, item 1).
TEST_CASE("16-bit outputs are rounded once: a value just past a halfway point rounds up",
          "[merge][adversarial]") {
  const auto one_value = [](polyak::DType dtype, float v) {
    StateDict sd;
    if (dtype == polyak::DType::BF16) {
      const Eigen::bfloat16 x[1] = {Eigen::bfloat16(v)};
      sd.insert("w", x, {1});
    } else {
      const Eigen::half x[1] = {Eigen::half(v)};
      sd.insert("w", x, {1});
    }
    return sd;
  };
  MergeOptions o = method(MergeMethod::TaskArithmetic);
  // 1 + (2^-8 + 2^-40) (2 - 1): above the halfway point 1 + 2^-8 between bf16's 1 and 1 + 2^-7.
  // Through float it would be the halfway point itself, and round to even (1).
  o.scale = std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  const StateDict b1 = one_value(polyak::DType::BF16, 1), b2 = one_value(polyak::DType::BF16, 2);
  CHECK(polyak::to_doubles(polyak::merge_state_dicts({&b2}, &b1, o).at("w"))[0] == 1.0078125);
  o.scale = std::ldexp(1.0, -11) + std::ldexp(1.0, -40);  // half: ulp 2^-10 at 1
  const StateDict h1 = one_value(polyak::DType::F16, 1), h2 = one_value(polyak::DType::F16, 2);
  CHECK(polyak::to_doubles(polyak::merge_state_dicts({&h2}, &h1, o).at("w"))[0] == 1 + std::ldexp(1.0, -10));
  o.scale = std::ldexp(1.0, -11);  // exactly halfway: to even
  CHECK(polyak::to_doubles(polyak::merge_state_dicts({&h2}, &h1, o).at("w"))[0] == 1.0);
  o.scale = std::ldexp(1.0, -11) - std::ldexp(1.0, -40);  // just below: down
  CHECK(polyak::to_doubles(polyak::merge_state_dicts({&h2}, &h1, o).at("w"))[0] == 1.0);
}

TEST_CASE("NaN ranks above infinity, both are carried into their own scalar only", "[merge][adversarial]") {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  StateDict x, zero;
  const double values[4] = {inf, nan, 1, 2}, zeros[4] = {0, 0, 0, 0};
  x.insert("w", values, {4});
  zero.insert("w", zeros, {4});
  MergeOptions o = method(MergeMethod::Ties);
  o.density = 0.25;  // one kept: the NaN, not the infinity
  const auto ties = merge_of({x}, zero, o);
  CHECK(ties[0] == 0);
  CHECK(std::isnan(ties[1]));
  CHECK(ties[2] == 0);
  CHECK(ties[3] == 0);
  o = method(MergeMethod::Breadcrumbs);  // gamma 0.25 drops the top, the NaN (not the inf before it)
  o.density = 0.75;
  o.gamma = 0.25;
  const auto crumbs = merge_of({x}, zero, o);
  CHECK(crumbs[0] == inf);
  CHECK(std::isnan(crumbs[1]));  // (dropped, and still NaN: carried as arithmetic would)
  CHECK(crumbs[2] == 1);
  CHECK(crumbs[3] == 2);
  // Model Stock: the cosine from the finite task values; the NaN only in its own scalar.
  StateDict a, b, base;
  const double av[3] = {1, 0, nan}, bv[3] = {1, 1, 0}, basev[3] = {0, 0, 0};
  a.insert("w", av, {3});
  b.insert("w", bv, {3});
  base.insert("w", basev, {3});
  const double t = 2 * (std::sqrt(2.0) - 1);
  const auto stock = merge_of({a, b}, base, method(MergeMethod::ModelStock));
  CHECK(stock[0] == Approx(t).epsilon(1e-12));
  CHECK(stock[1] == Approx(t * 0.5).epsilon(1e-12));
  CHECK(std::isnan(stock[2]));
}

TEST_CASE("Model Stock and SCE on F64 values near 1e160 do not overflow", "[merge][adversarial]") {
  StateDict a, b, base;
  const double av[2] = {1e160, 0}, bv[2] = {1e160, 1e160}, basev[2] = {0, 0};
  a.insert("w", av, {2});
  b.insert("w", bv, {2});
  base.insert("w", basev, {2});
  const double t = 2 * (std::sqrt(2.0) - 1);  // 45 degrees, as at any scale
  const auto stock = merge_of({a, b}, base, method(MergeMethod::ModelStock));
  CHECK(stock[0] == Approx(t * 1e160).epsilon(1e-12));
  CHECK(stock[1] == Approx(t * 0.5e160).epsilon(1e-12));
  // SCE: weights 1e320 / 2 and 2e320 / 2 (mean squares), normalized 1/3 and 2/3; signs agree at 0.
  const auto sce = merge_of({a, b}, base, method(MergeMethod::Sce));
  CHECK(sce[0] == Approx(1e160).epsilon(1e-12));
  CHECK(sce[1] == Approx(1e160).epsilon(1e-12));  // only the second is nonzero there: itself
}

TEST_CASE(
    "NuSLERP: t from the weights, over the tensor, its rows or its columns, of task vectors with a base",
    "[merge][nuslerp]") {
  const double half = std::sqrt(0.5);
  const auto nuslerp = [&](const std::vector<StateDict>& models, const StateDict* base,
                           const MergeOptions& o) {
    std::vector<const StateDict*> inputs;
    for (const auto& m : models) inputs.push_back(&m);
    return polyak::to_doubles(polyak::merge_state_dicts(inputs, base, o).at("w"));
  };
  MergeOptions o = method(MergeMethod::NuSlerp);
  auto r = nuslerp({tensor_of({1, 0}), tensor_of({0, 1})}, nullptr, o);  // a quarter circle, t = 0.5
  CHECK(r[0] == Approx(half).epsilon(1e-7));
  CHECK(r[1] == Approx(half).epsilon(1e-7));
  o.weights = {1, 3};  // t = 3 / 4: sin(pi / 8) and sin(3 pi / 8)
  r = nuslerp({tensor_of({1, 0}), tensor_of({0, 1})}, nullptr, o);
  CHECK(r[0] == Approx(std::sin(M_PI / 8)).epsilon(1e-7));
  CHECK(r[1] == Approx(std::sin(3 * M_PI / 8)).epsilon(1e-7));
  o.weights = {1, -1};  // the weights sum to 0: t = 0.5 (mergekit's)
  r = nuslerp({tensor_of({1, 0}), tensor_of({0, 1})}, nullptr, o);
  CHECK(r[0] == Approx(half).epsilon(1e-7));
  o.weights.clear();
  const StateDict ones = tensor_of({1, 1});  // with a base: the task vectors e1 and e2
  r = nuslerp({tensor_of({2, 1}), tensor_of({1, 2})}, &ones, o);
  CHECK(r[0] == Approx(1 + half).epsilon(1e-7));
  CHECK(r[1] == Approx(1 + half).epsilon(1e-7));
  CHECK(nuslerp({tensor_of({1, 2}), tensor_of({2, 4})}, nullptr, o) ==
        std::vector<double>{1.5, 3});  // parallel
  // Not flattened: per row (row 0 a quarter circle, row 1 parallel, linear); row-wise: per column.
  o.nuslerp_flatten = false;
  r = nuslerp({tensor_of({1, 0, 1, 0}, {2, 2}), tensor_of({0, 1, 2, 0}, {2, 2})}, nullptr, o);
  CHECK(r[0] == Approx(half).epsilon(1e-7));
  CHECK(r[1] == Approx(half).epsilon(1e-7));
  CHECK(r[2] == 1.5);
  CHECK(r[3] == 0);
  o.nuslerp_row_wise = true;
  r = nuslerp({tensor_of({1, 1, 0, 0}, {2, 2}), tensor_of({0, 2, 1, 0}, {2, 2})}, nullptr, o);
  CHECK(r[0] == Approx(half).epsilon(1e-7));  // column 0: (1, 0) and (0, 1)
  CHECK(r[2] == Approx(half).epsilon(1e-7));
  CHECK(r[1] == 1.5);  // column 1: (1, 0) and (2, 0), parallel
  CHECK(r[3] == 0);
  // Refused: three models; row-wise while flattened; its settings on another method.
  o = method(MergeMethod::NuSlerp);
  CHECK_THROWS_WITH(nuslerp({tensor_of({1}), tensor_of({1}), tensor_of({1})}, nullptr, o),
                    Catch::Contains("nuslerp merges two models"));
  o.nuslerp_row_wise = true;
  CHECK_THROWS_WITH(nuslerp({tensor_of({1}), tensor_of({1})}, nullptr, o),
                    Catch::Contains("nuslerp_row_wise takes nuslerp_flatten false"));
  o = method(MergeMethod::Slerp);
  o.nuslerp_flatten = false;
  CHECK_THROWS_WITH(nuslerp({tensor_of({1}), tensor_of({1})}, nullptr, o),
                    Catch::Contains("nuslerp_flatten is not a setting of slerp"));
}

namespace {

std::vector<double> merged_without_base(const std::vector<StateDict>& models, const StateDict* base,
                                        const MergeOptions& o) {
  std::vector<const StateDict*> inputs;
  for (const auto& m : models) inputs.push_back(&m);
  return polyak::to_doubles(polyak::merge_state_dicts(inputs, base, o).at("w"));
}

}  // namespace

TEST_CASE("Multi-SLERP: the weighted mean direction, scaled by the weighted mean norm",
          "[merge][multislerp]") {
  const double half = std::sqrt(0.5);
  MergeOptions o = method(MergeMethod::MultiSlerp);
  // Directions e1 and e2, norms 1 and 3, weights 1/2: the direction (e1 + e2) / sqrt 2, the norm 2
  // (the linear mean would be (0.5, 1.5)).
  auto r = merged_without_base({tensor_of({1, 0}), tensor_of({0, 3})}, nullptr, o);
  CHECK(r[0] == Approx(2 * half).epsilon(1e-7));
  CHECK(r[1] == Approx(2 * half).epsilon(1e-7));
  o.weights = {1, 3};  // normalized to 1/4, 3/4: direction (1, 3) / sqrt 10, norm 1/4 + 9/4
  r = merged_without_base({tensor_of({1, 0}), tensor_of({0, 3})}, nullptr, o);
  CHECK(r[0] == Approx(2.5 / std::sqrt(10.0)).epsilon(1e-7));
  CHECK(r[1] == Approx(7.5 / std::sqrt(10.0)).epsilon(1e-7));
  o.normalize_weights = false;  // weights 1, 3 as given: direction (1, 3) / sqrt 10, norm 1 + 9
  r = merged_without_base({tensor_of({1, 0}), tensor_of({0, 3})}, nullptr, o);
  CHECK(r[0] == Approx(10 / std::sqrt(10.0)).epsilon(1e-7));
  CHECK(r[1] == Approx(30 / std::sqrt(10.0)).epsilon(1e-7));
  // Three models, and a base: task vectors (2, 0, 0), (0, 2, 0), (0, 0, 2) about (1, 1, 1).
  o = method(MergeMethod::MultiSlerp);
  const StateDict ones = tensor_of({1, 1, 1});
  r = merged_without_base({tensor_of({3, 1, 1}), tensor_of({1, 3, 1}), tensor_of({1, 1, 3})}, &ones, o);
  for (const double x : r) CHECK(x == Approx(1 + 2 / std::sqrt(3.0)).epsilon(1e-7));
  // Two antipodal models of equal weight: mergekit's linear fallback; three: refused.
  CHECK(merged_without_base({tensor_of({1, 0}), tensor_of({-2, 0})}, nullptr, o) ==
        std::vector<double>{-0.5, 0});
  CHECK_THROWS_WITH(
      merged_without_base({tensor_of({1, 0}), tensor_of({-1, 0}), tensor_of({0, 0})}, nullptr, o),
      Catch::Contains("no spherical mean"));
  // One model: its tensor, with a base too.
  const StateDict one_one = tensor_of({1, 1});
  CHECK(merged_without_base({tensor_of({3, -4})}, &one_one, o) == std::vector<double>{3, -4});
  // A zero model: its direction is zero; the others' mean, its norm counted as 0.
  r = merged_without_base({tensor_of({2, 0}), tensor_of({0, 0})}, nullptr, o);
  CHECK(r[0] == Approx(1).epsilon(1e-7));
  CHECK(r[1] == 0);
  // One model of weight 0: its tensor (the weights' sum is not divided by).
  o.weights = {0};
  CHECK(merged_without_base({tensor_of({3, -4})}, nullptr, o) == std::vector<double>{3, -4});
  // Refused: weights that sum to 0 (normalize_weights divides by them), eps <= 0, its settings elsewhere.
  o.weights = {1, -1};
  CHECK_THROWS_WITH(merged_without_base({tensor_of({1, 0}), tensor_of({0, 1})}, nullptr, o),
                    Catch::Contains("weights sum to 0"));
  o = method(MergeMethod::MultiSlerp);
  o.eps = 0;
  CHECK_THROWS_WITH(merged_without_base({tensor_of({1, 0}), tensor_of({0, 1})}, nullptr, o),
                    Catch::Contains("eps must be finite and > 0"));
  o = method(MergeMethod::NuSlerp);
  o.normalize_weights = false;
  CHECK_THROWS_WITH(merged_without_base({tensor_of({1, 0}), tensor_of({0, 1})}, nullptr, o),
                    Catch::Contains("normalize_weights is not a setting of nuslerp"));
}

TEST_CASE("Karcher mean: the geodesic mean of the directions, scaled by the mean norm", "[merge][karcher]") {
  MergeOptions o = method(MergeMethod::Karcher);
  // Directions at 0, 0 and 90 degrees on a circle (norms 1, 2, 3): the Karcher mean is at their
  // mean angle, 30 degrees (the Euclidean mean's direction is atan(1 / 2), 26.6 degrees); the norm 2.
  const std::vector<StateDict> circle = {tensor_of({1, 0}), tensor_of({2, 0}), tensor_of({0, 3})};
  auto r = merged_without_base(circle, nullptr, o);
  CHECK(r[0] == Approx(std::sqrt(3.0)).epsilon(1e-6));
  CHECK(r[1] == Approx(1.0).epsilon(1e-6));
  o.max_iter = 0;  // no step: the normalized Euclidean mean, (2, 1) / sqrt 5, times 2
  r = merged_without_base(circle, nullptr, o);
  CHECK(r[0] == Approx(4 / std::sqrt(5.0)).epsilon(1e-7));
  CHECK(r[1] == Approx(2 / std::sqrt(5.0)).epsilon(1e-7));
  // In five dimensions, converged (tol 0, 200 steps): the directions' log map at the result sums to 0
  // (the mean's defining condition, computed here from the inputs), and its norm is the mean norm.
  o = method(MergeMethod::Karcher);
  o.tol = 0;
  o.max_iter = 200;
  const std::vector<std::vector<float>> xs = {{1, 0.2f, -0.3f, 0.1f, 0.5f},
                                              {0.4f, 1, 0.1f, -0.2f, 0},
                                              {0.3f, 0.1f, 2, 0.4f, -0.1f},
                                              {1, 1, 1, 0, 0.3f}};
  std::vector<StateDict> models;
  for (const auto& x : xs) models.push_back(tensor_of(x));
  r = merged_without_base(models, nullptr, o);
  double length = 0, mean_norm = 0;
  for (const double x : r) length += x * x;
  length = std::sqrt(length);
  std::vector<double> gradient(5, 0.0);
  for (const auto& x : xs) {
    double norm = 0, dot = 0;
    for (std::size_t j = 0; j < 5; ++j) norm += double{x[j]} * x[j];
    norm = std::sqrt(norm);
    mean_norm += norm / 4;
    for (std::size_t j = 0; j < 5; ++j) dot += x[j] / norm * r[j] / length;
    const double theta = std::acos(dot);
    for (std::size_t j = 0; j < 5; ++j)
      gradient[j] += theta / std::sin(theta) * (x[j] / norm - dot * r[j] / length);
  }
  for (const double g : gradient) CHECK(std::abs(g) < 1e-6);  // (the output is float32)
  CHECK(length == Approx(mean_norm).epsilon(1e-6));
  // A zero model: left out of the directions, counted in the norms' mean ((0 + 1 + 1) / 3).
  o = method(MergeMethod::Karcher);
  r = merged_without_base({tensor_of({0, 0}), tensor_of({1, 0}), tensor_of({0, 1})}, nullptr, o);
  CHECK(r[0] == Approx(2.0 / 3 * std::sqrt(0.5)).epsilon(1e-7));
  CHECK(r[1] == Approx(2.0 / 3 * std::sqrt(0.5)).epsilon(1e-7));
  CHECK(merged_without_base({tensor_of({0, 0}), tensor_of({0, 0})}, nullptr, o) == std::vector<double>{0, 0});
  CHECK(merged_without_base({tensor_of({3, -4})}, nullptr, o) == std::vector<double>{3, -4});
  // Antipodal directions (two scalars of opposite sign): the Euclidean mean is zero, so the first
  // direction starts; the antipode adds nothing (mergekit's term is 0 there): the first direction at
  // the mean norm, 1.5. Tol 0 runs (a tangent of length 0 stops it), identical models give the model.
  CHECK(merged_without_base({tensor_of({1, 0}), tensor_of({-2, 0})}, nullptr, o) ==
        std::vector<double>{1.5, 0});
  CHECK(merged_without_base({tensor_of({-3}), tensor_of({1})}, nullptr, o) == std::vector<double>{-2});
  o.tol = 0;
  CHECK(merged_without_base({tensor_of({1, 2, 3, 4}), tensor_of({1, 2, 3, 4})}, nullptr, o) ==
        std::vector<double>{1, 2, 3, 4});
  o = method(MergeMethod::Karcher);
  const StateDict zeros = tensor_of({0, 0});
  CHECK_THROWS_WITH(merged_without_base({tensor_of({1, 0}), tensor_of({0, 1})}, &zeros, o),
                    Catch::Contains("karcher takes no base model"));
  o.weights = {1, 2};
  CHECK_THROWS_WITH(merged_without_base({tensor_of({1, 0}), tensor_of({0, 1})}, nullptr, o),
                    Catch::Contains("weights is not a setting of karcher"));
  o = method(MergeMethod::MultiSlerp);
  o.tol = 1e-3;
  CHECK_THROWS_WITH(merged_without_base({tensor_of({1, 0}), tensor_of({0, 1})}, nullptr, o),
                    Catch::Contains("tol is not a setting of multislerp"));
}

TEST_CASE("the random methods' draws are independent across models and neighbouring scalars",
          "[merge][dare]") {
  // Two identical task vectors of ones, each kept with probability 1/2, unrescaled: a merged scalar
  // is k_1 + k_2. Independent draws: both kept (2) and neither (0) each a quarter of the scalars;
  // neighbours both kept in a quarter of the pairs; each within 5 sd of its binomial mean.
  const std::size_t n = 100000;
  const StateDict ones = tensor_of(std::vector<float>(n, 1.0f)),
                  zeros = tensor_of(std::vector<float>(n, 0.0f));
  MergeOptions o = method(MergeMethod::DareLinear);
  o.density = 0.5;
  o.rescale = false;
  o.seed = 2026;
  const std::vector<double> r = merge_of({ones, ones}, zeros, o);
  std::size_t both = 0, neither = 0, neighbours = 0;
  for (std::size_t p = 0; p < n; ++p) {
    both += r[p] == 2;
    neither += r[p] == 0;
    neighbours += p + 1 < n && r[p] >= 1 && r[p + 1] >= 1 && r[p] != 2 && r[p + 1] != 2;  // (k_1 or k_2)
  }
  const double sd = std::sqrt(static_cast<double>(n) * 0.25 * 0.75);
  CHECK(std::abs(static_cast<double>(both) - 0.25 * n) < 5 * sd);
  CHECK(std::abs(static_cast<double>(neither) - 0.25 * n) < 5 * sd);
  // Exactly one kept at p and at p + 1: probability 1/2 each, 1/4 both (pairs overlap: a looser sd).
  CHECK(std::abs(static_cast<double>(neighbours) - 0.25 * n) < 5 * 2 * sd);
}

TEST_CASE("selection by rank agrees with a full sort, duplicates and every bucket included",
          "[merge][ties]") {
  // rank_window against the definition: sort positions by (key, later position first), keep the
  // ranks in [lo, hi). Keys: many duplicates in one bucket, spread over buckets, NaN's and infinity's keys.
  std::uint64_t state = 7;
  const auto next = [&] { return state = polyak::detail::mix64(state); };
  for (int trial = 0; trial < 6; ++trial) {
    std::vector<std::uint64_t> keys(3000);
    for (auto& k : keys) {
      const std::uint64_t r = next();
      k = trial % 3 == 0   ? (r % 5)  // one bucket, duplicates
          : trial % 3 == 1 ? polyak::detail::rank_key(static_cast<double>(r % 1000) / 7)  // spread
                           : (r % 10 == 0   ? 0x7ff8000000000000ull
                              : r % 10 == 1 ? 0x7ff0000000000000ull
                                            : r >> 2);
    }
    std::vector<std::size_t> order(keys.size());
    for (std::size_t p = 0; p < order.size(); ++p) order[p] = p;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return keys[a] < keys[b] || (keys[a] == keys[b] && a > b);
    });
    for (const auto& [lo, hi] : std::vector<std::pair<std::size_t, std::size_t>>{
             {0, 1}, {1500, 3000}, {17, 2999}, {2999, 3000}, {1000, 1001}, {0, 3000}, {5, 5}, {0, 0}}) {
      std::vector<bool> expected(keys.size(), false);
      std::vector<std::uint64_t> scratch;
      for (std::size_t r = lo; r < hi; ++r) expected[order[r]] = true;
      const auto kept = [&keys](const polyak::detail::RankWindow& window) {
        std::vector<bool> keep(keys.size());
        for (std::size_t p = 0; p < keys.size(); ++p) keep[p] = window.contains(keys[p], p);
        return keep;
      };
      CAPTURE(trial, lo, hi);
      CHECK(kept(polyak::detail::rank_window(keys, lo, hi, scratch)) == expected);
      // In spans of 64 (100, 128) on three threads, lane l taking spans l, l + 3, ...: the equal ones
      // at a boundary spread over many spans, counted span by span.
      for (const std::size_t span : {std::size_t{64}, std::size_t{100}, std::size_t{128}}) {
        const auto on_threads = [&](auto&& body) {
          std::vector<std::thread> lanes;
          for (std::size_t l = 0; l < 3; ++l) {
            lanes.emplace_back([&body, &keys, span, l] {
              for (std::size_t begin = l * span; begin < keys.size(); begin += 3 * span)
                body(l, begin, std::min(begin + span, keys.size()));
            });
          }
          for (auto& lane : lanes) lane.join();
        };
        CAPTURE(span);
        CHECK(kept(polyak::detail::rank_window(keys, lo, hi, scratch, 3, span, on_threads)) == expected);
      }
    }
  }
}

TEST_CASE("selection by rank without the keys held agrees with a full sort, or leaves it to them",
          "[merge][ties]") {
  // rank_window_streamed against the definition (positions sorted by (key, later position first),
  // the ranks [lo, hi) kept), on task values whose keys are spread, tied across a boundary, NaN and
  // infinite; and where its sample misses (the sampled pieces unlike the rest), puts a fifth of
  // itself near a boundary (40% of the values equal), or its candidates outgrow a quarter of the
  // tensor (the sampled pieces spread, the others all near the boundary), it must say so (false),
  // leaving the window to rank_window over the keys held.
  namespace d = polyak::detail;
  const std::size_t n = d::streamed_selection_min + 12345;
  std::uint64_t state = 11;
  const auto uniform = [&] { return static_cast<double>((state = d::mix64(state)) >> 11) * 0x1p-53; };
  const std::size_t pieces = (n + d::merge_piece - 1) / d::merge_piece, stride = pieces / 4 * d::merge_piece;
  for (int trial = 0; trial < 5; ++trial) {
    std::vector<double> tau(n);
    for (std::size_t p = 0; p < n; ++p) {
      const double sign = uniform() < 0.5 ? -1.0 : 1.0, u = uniform();
      switch (trial) {
        case 0:  // spread over many binades, some NaN and infinity
          tau[p] = p % 1001 == 0   ? std::numeric_limits<double>::quiet_NaN()
                   : p % 1003 == 0 ? -std::numeric_limits<double>::infinity()
                                   : sign * std::exp(8 * u - 4);
          break;
        case 1:  // 5% exactly +-0.5, ranked 47.5% to 52.5%: the window's boundaries cut them
          tau[p] = sign * (u < 0.05 ? 0.5 : uniform());
          break;
        case 2:  // the sampled pieces 1e-30 and below, the rest in (0, 1): the sample misses
          tau[p] = sign * (p / d::merge_piece * d::merge_piece % stride == 0 ? 1e-30 * u : u);
          break;
        case 3:  // 40% equal (0.25): too many candidates, as the sample says
          tau[p] = sign * (u < 0.4 ? 0.25 : uniform());
          break;
        default:  // the sampled pieces in (0, 1), the rest in [0.8, 0.801): too many, found as counted
          tau[p] = sign * (p / d::merge_piece * d::merge_piece % stride == 0 ? u : 0.8 + 0.001 * u);
      }
    }
    std::vector<std::uint64_t> keys(n);
    for (std::size_t p = 0; p < n; ++p) keys[p] = d::rank_key(tau[p]);
    std::vector<std::size_t> order(n);
    for (std::size_t p = 0; p < n; ++p) order[p] = p;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return keys[a] < keys[b] || (keys[a] == keys[b] && a > b);
    });
    const auto at = [&](double q) { return static_cast<std::size_t>(q * static_cast<double>(n)); };
    for (const auto& [lo, hi] : std::vector<std::pair<std::size_t, std::size_t>>{{at(0.8), n},
                                                                                 {at(0.5), n},
                                                                                 {at(0.25), at(0.75)},
                                                                                 {at(0.49), at(0.51)},
                                                                                 {0, at(0.9)},
                                                                                 {n - 1, n},
                                                                                 {0, n},
                                                                                 {5, 5}}) {
      std::vector<bool> expected(n, false);
      for (std::size_t r = lo; r < hi; ++r) expected[order[r]] = true;
      const bool trivial = lo >= hi || (lo == 0 && hi == n);
      // On one lane (the tensor one span), and on three threads in spans of 4 pieces, lane l taking
      // spans l, l + 3, ...
      for (const std::size_t lanes : {std::size_t{1}, std::size_t{3}}) {
        const std::size_t span = lanes == 1 ? n : 4 * d::merge_piece;
        const auto for_each_span = [&](auto&& body) {
          std::vector<std::thread> threads;
          for (std::size_t l = 0; l < lanes; ++l) {
            threads.emplace_back([&body, n, span, lanes, l] {
              for (std::size_t begin = l * span; begin < n; begin += lanes * span)
                body(l, begin, std::min(begin + span, n));
            });
          }
          for (auto& thread : threads) thread.join();
        };
        const auto for_each_piece = [&](auto&& body) {
          for_each_span([&](std::size_t l, std::size_t begin, std::size_t end) {
            for (std::size_t p = begin; p < end; p += d::merge_piece)
              body(l, p, std::min(d::merge_piece, end - p));
          });
        };
        const auto tau_of = [&tau](std::size_t, std::size_t begin, std::size_t) {
          return static_cast<const double*>(tau.data() + begin);
        };
        d::KeyCounts counted;
        d::StreamedSelection selection;
        d::RankWindow window;
        std::vector<std::uint64_t> held_keys(n), held_scratch(1000);  // (as an earlier tensor left them)
        CAPTURE(trial, lo, hi, lanes);
        const bool streamed =
            d::rank_window_streamed(n, lo, hi, tau_of, for_each_piece, lanes, span, for_each_span, counted,
                                    selection, held_keys, held_scratch, window);
        // The keys held and the candidates never at once: freed where the candidates are taken, the
        // candidates freed where it leaves the window to the keys.
        CHECK((selection.room == 0) == (!streamed || trivial));
        if (selection.room > 0) CHECK((held_keys.capacity() == 0 && held_scratch.capacity() == 0));
        // Trial 2: the sample misses every boundary; trials 3 and 4: those among the crowded values
        // have too many candidates (trial 4's top 20% found so as the candidates outgrow their
        // limit), the others not.
        const auto crowded = [&](std::size_t rank) {
          const double size = std::abs(tau[order[rank]]);
          return (trial == 3 && size == 0.25) || (trial == 4 && size >= 0.8 && size < 0.801);
        };
        const bool too_many = (lo > 0 && lo < n && crowded(lo)) || (hi < n && hi > 0 && crowded(hi - 1));
        CHECK(streamed == (trivial || trial < 2 || (trial >= 3 && !too_many)));
        CHECK(selection.missed == (streamed ? 0u : 1u));
        if (trial == 4 && lo == at(0.8) && hi == n) CHECK(selection.outgrown == 1);
        if (!streamed) continue;
        std::vector<bool> keep(n);
        for (std::size_t p = 0; p < n; ++p) keep[p] = window.contains(keys[p], p);
        CHECK(keep == expected);
        // The same window as rank_window's over the keys held, field by field.
        std::vector<std::uint64_t> scratch;
        const d::RankWindow held = d::rank_window(keys, lo, hi, scratch);
        CHECK(std::tie(window.has_low, window.has_high, window.low, window.high, window.low_until,
                       window.high_from) ==
              std::tie(held.has_low, held.has_high, held.low, held.high, held.low_until, held.high_from));
        if (trial == 1 && lo == at(0.5) && hi == n) CHECK(window.low_until < n);  // (a cut among ties)
      }
    }
  }
  // A tensor below streamed_selection_min after a streamed one: left to the keys held, the
  // candidates of the earlier one freed first.
  std::vector<double> tau(n);
  for (std::size_t p = 0; p < n; ++p) tau[p] = std::sin(static_cast<double>(p));
  const auto tau_of = [&tau](std::size_t, std::size_t begin, std::size_t) {
    return static_cast<const double*>(tau.data() + begin);
  };
  d::KeyCounts counted;
  d::StreamedSelection selection;
  d::RankWindow window;
  std::vector<std::uint64_t> held_keys, held_scratch;
  for (const std::size_t size : {n, std::size_t{1000}}) {
    const auto one_span = [&](auto&& body) { body(std::size_t{0}, std::size_t{0}, size); };
    const auto pieces = [&](auto&& body) {
      for (std::size_t p = 0; p < size; p += d::merge_piece)
        body(std::size_t{0}, p, std::min(d::merge_piece, size - p));
    };
    const bool streamed = d::rank_window_streamed(size, size / 2, size, tau_of, pieces, 1, size, one_span,
                                                  counted, selection, held_keys, held_scratch, window);
    CHECK(streamed == (size == n));
    CHECK((selection.room > 0) == (size == n));
  }
}

TEST_CASE("DELLA's row order: the radix sort agrees with std::stable_sort, equal keys in order",
          "[merge][della]") {
  // Keys: one digit shared by all (skipped passes), every byte varied, duplicates, NaN's and
  // infinity's keys, 0; sizes on both sides of the small-row cut (256) and 0.
  std::uint64_t state = 11;
  const auto next = [&] { return state = polyak::detail::mix64(state); };
  using Pair = std::pair<std::uint64_t, std::uint64_t>;
  for (const std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{255}, std::size_t{256},
                              std::size_t{5000}, std::size_t{100000}}) {
    for (int trial = 0; trial < 5; ++trial) {
      std::vector<Pair> items(n), scratch;
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint64_t r = next();
        std::uint64_t key = r >> 12;          // trial 3: NaN's, infinity's keys, 0, and the rest
        if (trial == 0) key = (r % 7) << 40;  // few values, one byte varies
        if (trial == 1) key = r;              // every byte
        if (trial == 2) key = polyak::detail::rank_key(static_cast<float>(r % 100000) / 3);  // floats
        if (trial == 3 && r % 4 == 0) key = 0x7ff8000000000000ull;
        if (trial == 3 && r % 4 == 1) key = 0x7ff0000000000000ull;
        if (trial == 3 && r % 4 == 2) key = 0;
        items[i] = {key, i};
      }
      std::vector<Pair> expected = items;
      std::stable_sort(expected.begin(), expected.end(),
                       [](const Pair& a, const Pair& b) { return a.first < b.first; });
      polyak::detail::stable_sort_by_key(items, scratch);
      CAPTURE(n, trial);
      const bool same = items == expected;
      CHECK(same);
    }
  }
}

namespace {

StateDict f64_of(const std::vector<double>& x) {
  StateDict sd;
  sd.insert("w", x.data(), {static_cast<std::int64_t>(x.size())});
  return sd;
}

}  // namespace

TEST_CASE("the spherical methods at the edges of double's range, and near antipodes",
          "[merge][multislerp][karcher][nuslerp]") {
  // A model of norm 1e-155 beside one of norm 1 (their Gram entries would leave double's range), with
  // eps and tol far below it: the geodesic midpoint of the two directions at the mean norm, for both.
  const std::vector<double> a = {1, 2, 3, 4}, b = {1e-155, -1e-155, 2e-155, 0};
  const double na = std::sqrt(30.0), nb = std::sqrt(6.0) * 1e-155;
  std::vector<double> mid(4);
  double length = 0;
  for (std::size_t j = 0; j < 4; ++j) length += std::pow(mid[j] = a[j] / na + b[j] / nb, 2);
  for (double& x : mid) x *= (na + nb) / 2 / std::sqrt(length);
  MergeOptions o = method(MergeMethod::Karcher);
  o.tol = 1e-300;
  auto r = merged_without_base({f64_of(a), f64_of(b)}, nullptr, o);
  for (std::size_t j = 0; j < 4; ++j) CHECK(r[j] == Approx(mid[j]).epsilon(1e-9));
  o = method(MergeMethod::MultiSlerp);
  o.eps = 1e-300;
  r = merged_without_base({f64_of(a), f64_of(b)}, nullptr, o);
  for (std::size_t j = 0; j < 4; ++j) CHECK(r[j] == Approx(mid[j]).epsilon(1e-9));
  // A zero model with a tiny eps: the linear fallback's sign is the weights', not flipped.
  o.normalize_weights = false;
  o.weights = {1, -1};
  r = merged_without_base({f64_of({0, 0, 0, 0}), f64_of({-2, 1, 0.5, 3})}, nullptr, o);
  CHECK(r == std::vector<double>{-2, 1, 0.5, 3});
  // Nearly antipodal: v and -1.5 v, weights 1/2: |m| = |r_1 - r_2| / 2 (r_i = |v_i| / (|v_i| + eps))
  // is about 1e-8, far below the cosines' cancellation; read from the tensor, the result is
  // -cos(eps) (0.1 + 0.15) / 2 v^ (the helper found |result| 0.119 where 0.125 is right).
  std::vector<double> v(1000), minus(1000);
  double nv = 0;
  for (std::size_t j = 0; j < v.size(); ++j)
    nv += std::pow(v[j] = std::sin(0.37 * static_cast<double>(j) + 1), 2);
  nv = std::sqrt(nv);
  for (std::size_t j = 0; j < v.size(); ++j) minus[j] = -1.5 * (v[j] *= 0.1 / nv);
  o = method(MergeMethod::MultiSlerp);
  r = merged_without_base({f64_of(v), f64_of(minus)}, nullptr, o);
  double worst = 0;
  for (std::size_t j = 0; j < v.size(); ++j) worst = std::max(worst, std::abs(r[j] - (-0.125 / 0.1) * v[j]));
  CHECK(worst < 1e-9);
  // NuSLERP: a NaN is carried into its own scalar, the others merged without it; F64 values near
  // 1e300 do not overflow its sums; weights whose sum overflows give t = 1/2.
  o = method(MergeMethod::NuSlerp);
  r = merged_without_base({f64_of({std::nan(""), 1, 0}), f64_of({0, 0, 1})}, nullptr, o);
  CHECK(std::isnan(r[0]));
  CHECK(r[1] == Approx(std::sqrt(0.5)).epsilon(1e-12));
  CHECK(r[2] == Approx(std::sqrt(0.5)).epsilon(1e-12));
  r = merged_without_base({f64_of({1e300, 0}), f64_of({0, 1e300})}, nullptr, o);
  CHECK(r[0] == Approx(std::sqrt(0.5) * 1e300).epsilon(1e-12));
  o.weights = {1e308, 1e308};
  r = merged_without_base({f64_of({1, 0}), f64_of({0, 1})}, nullptr, o);
  CHECK(r[0] == Approx(std::sqrt(0.5)).epsilon(1e-12));
  CHECK(r[1] == Approx(std::sqrt(0.5)).epsilon(1e-12));
}

TEST_CASE("the models' inner products: the same merge at every scale, summed in double or past its range",
          "[merge][multislerp][karcher][model_stock][sce][adversarial]") {
  // Multi-SLERP and Karcher are homogeneous of degree 1 in the models' vectors, so inputs scaled by
  // 2^k merge to the result scaled by 2^k (eps and tol far below every norm here); so is Model Stock
  // at scales where its guard (|a| |b| at least 1e-6, mergekit's) leaves its angles alone: k > 0;
  // and SCE, whose weights are ratios of the models' sums of squares (its kept scalars too: ranked by
  // the spread, which scales with them).
  // The inner products are summed in double while the vectors' squared norms lie in [2^-800, 2^800]
  // (scales 2^-390 and 2^390), in long double past that: at 2^-600 every square underflows
  // double's range (a Gram matrix of zeros), at 2^600 overflows it.
  const std::vector<std::vector<double>> xs = {
      {1, 0.5, -0.25, 2, 0.75, -1}, {0.5, 1, 1.5, -0.5, 0.25, 1}, {-0.75, 0.5, 1, 1, 2, 0.5}};
  const auto scaled = [](std::vector<double> x, int k) {
    for (double& v : x) v = std::ldexp(v, k);
    return x;
  };
  const auto models_at = [&](int k) {
    std::vector<StateDict> models;
    for (const auto& x : xs) models.push_back(f64_of(scaled(x, k)));
    return models;
  };
  MergeOptions karcher = method(MergeMethod::Karcher), multislerp = method(MergeMethod::MultiSlerp);
  karcher.tol = 1e-250;
  multislerp.eps = 1e-300;
  const std::vector<double> karcher_at_1 = merged_without_base(models_at(0), nullptr, karcher);
  const std::vector<double> multislerp_at_1 = merged_without_base(models_at(0), nullptr, multislerp);
  const std::vector<double> base_x = {0.25, -0.5, 0.125, 1, -1, 0.5};
  const StateDict base_at_1 = f64_of(base_x);
  const std::vector<double> stock_at_1 = merge_of(models_at(0), base_at_1, method(MergeMethod::ModelStock));
  MergeOptions sce = method(MergeMethod::Sce);
  sce.select_topk = 0.5;
  const std::vector<double> sce_at_1 = merge_of(models_at(0), base_at_1, sce);
  // Model Stock's rows (filter_wise): row 0 at 1, row 1 at 2^k; each row its own t.
  const auto stock_rows_at = [&](int k) {
    std::vector<StateDict> models;
    for (const auto& x : xs) {
      std::vector<double> rows = x;
      for (const double v : scaled(x, k)) rows.push_back(v);
      StateDict sd;
      sd.insert("w", rows.data(), {2, static_cast<std::int64_t>(x.size())});
      models.push_back(std::move(sd));
    }
    std::vector<double> base_rows = base_x;
    for (const double v : scaled(base_x, k)) base_rows.push_back(v);
    StateDict base;
    base.insert("w", base_rows.data(), {2, static_cast<std::int64_t>(xs[0].size())});
    MergeOptions rows = method(MergeMethod::ModelStock);
    rows.filter_wise = true;
    return merge_of(models, base, rows);
  };
  for (const int k : {-600, -390, 390, 600}) {
    INFO("scale 2^" << k);
    const std::vector<double> karcher_at_k = merged_without_base(models_at(k), nullptr, karcher);
    const std::vector<double> multislerp_at_k = merged_without_base(models_at(k), nullptr, multislerp);
    const std::vector<double> stock_at_k =
        merge_of(models_at(k), f64_of(scaled(base_x, k)), method(MergeMethod::ModelStock));
    const std::vector<double> rows_at_k = stock_rows_at(k);
    const std::vector<double> sce_at_k = merge_of(models_at(k), f64_of(scaled(base_x, k)), sce);
    for (std::size_t j = 0; j < xs[0].size(); ++j) {
      CHECK(std::ldexp(sce_at_k[j], -k) == Approx(sce_at_1[j]).epsilon(1e-12));
      CHECK(std::ldexp(karcher_at_k[j], -k) == Approx(karcher_at_1[j]).epsilon(1e-12));
      CHECK(std::ldexp(multislerp_at_k[j], -k) == Approx(multislerp_at_1[j]).epsilon(1e-12));
      if (k < 0) continue;
      CHECK(std::ldexp(stock_at_k[j], -k) == Approx(stock_at_1[j]).epsilon(1e-12));
      CHECK(rows_at_k[j] == Approx(stock_at_1[j]).epsilon(1e-12));
      CHECK(std::ldexp(rows_at_k[xs[0].size() + j], -k) == Approx(stock_at_1[j]).epsilon(1e-12));
    }
  }
}

TEST_CASE("the models' inner products are summed with each addition's rounding carried",
          "[merge][model_stock]") {
  // Products 2^70, 1, -2^70, 1 (x = (2^35, 1, -2^35, 1), y = (2^35, 1, 2^35, 1)): their sum is 2,
  // where a double or a long double summed in order keeps 1 (2^70 + 1 rounds to 2^70 in both); the
  // four products added at once (in four interleaved sums), or one at a time.
  const double big = std::ldexp(1.0, 35);
  const std::vector<double> x = {big, 1, -big, 1}, y = {big, 1, big, 1};
  for (const std::size_t count : {std::size_t{4}, std::size_t{1}}) {
    polyak::detail::ProductSums sums(2);
    for (std::size_t j = 0; j < 4; j += count) {
      const double* v[] = {x.data() + j, y.data() + j};
      sums.add(v, count);
    }
    CHECK(sums.at(0, 1) == 2);
    CHECK(sums.in_range());
    polyak::detail::ProductSums total(2);
    total.add(sums);
    CHECK(total.at(0, 1) == 2);
  }
  // A vector of zeros holds (its Gram entries are 0); one whose squares underflow does not.
  polyak::detail::ProductSums zeros(2);
  const std::vector<double> zero = {0.0, -0.0}, tiny = {1e-200, 0};
  const double* v[] = {zero.data(), tiny.data()};
  zeros.add(v, 2);
  CHECK_FALSE(zeros.in_range());
  const double* w[] = {zero.data(), zero.data()};
  polyak::detail::ProductSums all_zero(2);
  all_zero.add(w, 2);
  CHECK(all_zero.in_range());
  CHECK(all_zero.at(0, 1) == 0);
}

TEST_CASE("SCE's sums of squares take each square exactly: its weights are the exact ones, rounded once",
          "[merge][sce][adversarial]") {
  // (1 + 2^-30)^2 = 1 + 2^-29 + 2^-60, whose last term a square rounded to double loses; five of
  // them (four interleaved sums and one left over) sum to 5 + 5 2^-29 + 5 2^-60, in long double's 64
  // bits exactly.
  const double x = 1 + std::ldexp(1.0, -30);
  const std::vector<double> five(5, x);
  const long double square = 1 + std::ldexp(1.0L, -29) + std::ldexp(1.0L, -60);
  polyak::detail::ProductSums sums(1);
  const double* v[] = {five.data()};
  sums.add_squares(v, 5);
  CHECK(sums.at(0, 0) == 5 * square);
  // The reviewer's case: two F64 models of one scalar against a zero base, both kept; the weights
  // x_m^2 / (x_0^2 + x_1^2) taken exactly give 0x1.ecba16767e2ccp-2 (Python's fractions), where
  // squares rounded to double gave the weight of model 1 an ulp low and the merge 0x1.ecba16767e2cbp-2.
  const std::vector<StateDict> models = {f64_of({0x1.1243418e643edp-1}), f64_of({0x1.7245f95ced1e6p-2})};
  MergeOptions sce = method(MergeMethod::Sce);
  CHECK(merge_of(models, f64_of({0.0}), sce) == std::vector<double>{0x1.ecba16767e2ccp-2});
}

TEST_CASE("NuSLERP of antipodal vectors is the linear mix: its cosine is exactly -1",
          "[merge][nuslerp][adversarial]") {
  // The helper's case: a cosine one rounding from -1 (2^-53: products rounded to double) makes
  // sin(theta) 1.5e-8, past NuSLERP's colinear guard (1e-8), and the merge some 10^7 times too large.
  MergeOptions o = method(MergeMethod::NuSlerp);
  CHECK(merged_without_base({f64_of({0.1}), f64_of({-0.3})}, nullptr, o)[0] == Approx(-0.1).epsilon(1e-12));
  const std::vector<double> x = {0.1, 0.7, 1.3, -0.45, 2.2};
  std::vector<double> minus;
  for (const double v : x) minus.push_back(-0.3 * v);
  auto r = merged_without_base({f64_of(x), f64_of(minus)}, nullptr, o);
  for (std::size_t j = 0; j < x.size(); ++j)
    CHECK(r[j] == Approx(0.5 * x[j] + 0.5 * minus[j]).epsilon(1e-12));
  // Rows of one column (nuslerp_flatten false): each row's two scalars are parallel or antipodal,
  // so each row is the linear mix.
  const std::size_t rows = 1000;
  std::vector<double> a(rows), b(rows);
  for (std::size_t i = 0; i < rows; ++i) {
    a[i] = std::sin(0.7 * static_cast<double>(i) + 1) * static_cast<double>(1 + i % 7);
    b[i] = std::cos(1.3 * static_cast<double>(i)) * static_cast<double>(1 + i % 5);
  }
  StateDict sa, sb;
  sa.insert("w", a.data(), {static_cast<std::int64_t>(rows), 1});
  sb.insert("w", b.data(), {static_cast<std::int64_t>(rows), 1});
  o.nuslerp_flatten = false;
  r = merged_without_base({sa, sb}, nullptr, o);
  std::size_t off = 0;
  for (std::size_t i = 0; i < rows; ++i)
    off += !(std::abs(r[i] - (0.5 * a[i] + 0.5 * b[i])) <= 1e-12 * (std::abs(a[i]) + std::abs(b[i])));
  CHECK(off == 0);
}
