// SPDX-License-Identifier: MIT
#include "polyak/core/averaged_model.hpp"

#include <catch2/catch.hpp>
#include <unsupported/Eigen/CXX11/Tensor>  // the tensors viewed below (polyak does not include it)

#include <atomic>
#include <cmath>
#include <random>
#include <vector>

#include "polyak/core/ema_schedules.hpp"
#include "test_types.hpp"

using polyak::AveragedModel;
using polyak::ParameterList;
using polyak_test::close;
using polyak_test::tolerance_v;

namespace {

/// A small model: a column-major matrix, a vector, a 3-D tensor and a buffer, all of scalar T.
template <class T>
struct MixedModel {
  // Zero first: Eigen leaves new storage uninitialized.
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> weight =
      Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>::Zero(3, 4);
  Eigen::Matrix<T, Eigen::Dynamic, 1> bias = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(3);
  Eigen::Tensor<T, 3, Eigen::RowMajor> kernel = Eigen::Tensor<T, 3, Eigen::RowMajor>(2, 2, 3).setZero();
  Eigen::Matrix<T, Eigen::Dynamic, 1> running_mean = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(5);

  ParameterList<T> list() {
    ParameterList<T> out;
    out.add("weight", weight)
        .add("bias", bias)
        .add("kernel", kernel)
        .add_buffer("running_mean", running_mean);
    return out;
  }

  /// Every scalar, parameters and buffers, in list order, as double.
  std::vector<double> values() {
    std::vector<double> out;
    for (const auto& entry : list()) {
      for (std::size_t i = 0; i < entry.numel(); ++i) out.push_back(static_cast<double>(entry.data()[i]));
    }
    return out;
  }

  void randomize(std::mt19937& rng) {
    std::normal_distribution<float> normal;
    for (const auto& entry : list()) {
      for (std::size_t i = 0; i < entry.numel(); ++i) entry.data()[i] = T(normal(rng));
    }
  }
};

template <class S>
std::vector<double> values_of(const ParameterList<S>& list) {
  std::vector<double> out;
  for (const auto& entry : list) {
    for (std::size_t i = 0; i < entry.numel(); ++i) out.push_back(static_cast<double>(entry.data()[i]));
  }
  return out;
}

/// Number of parameter scalars (the buffer is last in MixedModel).
constexpr std::size_t parameter_scalars = 12 + 3 + 12;

}  // namespace

TEMPLATE_TEST_CASE("SWA of k snapshots is their mean", "[averaged_model]", POLYAK_SCALAR_TYPES) {
  using Acc = polyak::accumulator_t<TestType>;
  std::mt19937 rng(7);
  MixedModel<TestType> model;
  const auto list = model.list();
  AveragedModel<TestType> swa(list);
  CHECK(swa.n_averaged() == 0);

  const int k = 9;
  std::vector<double> sum(model.values().size(), 0.0);
  for (int step = 0; step < k; ++step) {
    model.randomize(rng);
    const auto snapshot = model.values();
    for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += snapshot[i];
    swa.update_parameters(list);
  }
  CHECK(swa.n_averaged() == k);

  const auto averaged = values_of(swa.tensors());
  const auto last = model.values();
  for (std::size_t i = 0; i < parameter_scalars; ++i) {
    INFO("scalar " << i);
    CHECK(close(averaged[i], sum[i] / k, 4 * tolerance_v<Acc>));
  }
  for (std::size_t i = parameter_scalars; i < averaged.size(); ++i) {
    CHECK(averaged[i] == last[i]);  // use_buffers == false: the buffer is the model's latest
  }

  // copy_to writes the average into the model, rounded once to T.
  swa.copy_to(list);
  const auto copied = model.values();
  for (std::size_t i = 0; i < averaged.size(); ++i) {
    CHECK(copied[i] == static_cast<double>(TestType(static_cast<Acc>(averaged[i]))));
  }
}

TEMPLATE_TEST_CASE("EMA matches its closed form, and averages buffers with use_buffers", "[averaged_model]",
                   POLYAK_SCALAR_TYPES) {
  using Acc = polyak::accumulator_t<TestType>;
  const double decay = 0.8;
  std::mt19937 rng(11);
  MixedModel<TestType> model;
  const auto list = model.list();
  AveragedModel<TestType, polyak::EMA> ema(list, polyak::EMA{decay}, /*use_buffers=*/true);

  // avg_n = decay^(n-1) x_1 + sum_{k=2..n} (1 - decay) decay^(n-k) x_k, summed here in double.
  std::vector<double> expected;
  const int n = 12;
  for (int step = 1; step <= n; ++step) {
    model.randomize(rng);
    const auto x = model.values();
    if (step == 1) {
      expected = x;
    } else {
      for (std::size_t i = 0; i < x.size(); ++i) expected[i] = decay * expected[i] + (1 - decay) * x[i];
    }
    ema.update_parameters(list);
  }
  const auto averaged = values_of(ema.tensors());
  for (std::size_t i = 0; i < averaged.size(); ++i) {
    INFO("scalar " << i);
    CHECK(close(averaged[i], expected[i], 8 * tolerance_v<Acc>));
  }
  CHECK(ema.buffers().size() == 1);
  CHECK(ema.parameters().size() == 3);
  CHECK(ema.buffers()[0].name() == "running_mean");
}

TEMPLATE_TEST_CASE("construction copies the model, the first update copies it again", "[averaged_model]",
                   POLYAK_SCALAR_TYPES) {
  std::mt19937 rng(3);
  MixedModel<TestType> model;
  model.randomize(rng);
  const auto list = model.list();
  AveragedModel<TestType, polyak::EMA> ema(list, polyak::EMA{0.5});
  CHECK(values_of(ema.tensors()) == model.values());
  model.randomize(rng);
  ema.update_parameters(list);
  CHECK(values_of(ema.tensors()) == model.values());
  CHECK(ema.n_averaged() == 1);
}

TEST_CASE("a 16-bit model is averaged in float, where a 16-bit average would stall", "[averaged_model]") {
  // Each EMA step moves the average by 0.001 * 2^-8, far below half's spacing near 1 (2^-10): an
  // average kept in half (as PyTorch keeps it) would never leave 1.
  Eigen::Matrix<Eigen::half, Eigen::Dynamic, 1> w(4);
  w.setConstant(Eigen::half(1.0f));
  ParameterList<Eigen::half> list;
  list.add("w", w);
  AveragedModel<Eigen::half, polyak::EMA> ema(list, polyak::EMA{0.999});
  ema.update_parameters(list);
  w.setConstant(Eigen::half(1.0f + 1.0f / 256));
  const int steps = 1000;
  for (int k = 0; k < steps; ++k) ema.update_parameters(list);
  const double expected = 1.0 + (1.0 / 256) * (1.0 - std::pow(0.999, steps));
  CHECK(static_cast<double>(ema.parameters()[0].data()[0]) == Approx(expected).epsilon(1e-6));
}

TEMPLATE_TEST_CASE("swap exchanges averaged and live values in place", "[averaged_model]", float, double) {
  std::mt19937 rng(5);
  MixedModel<TestType> model;
  const auto list = model.list();
  AveragedModel<TestType> swa(list);
  for (int k = 0; k < 3; ++k) {
    model.randomize(rng);
    swa.update_parameters(list);
  }
  const auto live = model.values();
  const auto averaged = values_of(swa.tensors());
  swa.swap(list);
  CHECK(model.values() == averaged);
  CHECK(values_of(swa.tensors()) == live);
  swa.swap(list);
  CHECK(model.values() == live);
  CHECK(values_of(swa.tensors()) == averaged);
}

TEST_CASE("a model that differs is refused, naming the first differing tensor, and nothing changes",
          "[averaged_model]") {
  std::mt19937 rng(9);
  MixedModel<float> model;
  model.randomize(rng);
  const auto list = model.list();
  AveragedModel<float> swa(list);
  swa.update_parameters(list);
  const auto before = values_of(swa.tensors());

  MixedModel<float> other;
  other.randomize(rng);
  auto check_refused = [&](const ParameterList<float>& bad, const std::string& fragment) {
    CHECK_THROWS_WITH(swa.update_parameters(bad), Catch::Contains(fragment));
    CHECK_THROWS_AS(swa.update_parameters(bad), std::invalid_argument);
    CHECK_THROWS_WITH(swa.copy_to(bad), Catch::Contains(fragment));
    CHECK_THROWS_WITH(swa.swap(bad), Catch::Contains(fragment));
    CHECK(values_of(swa.tensors()) == before);
    CHECK(swa.n_averaged() == 1);
  };

  SECTION("another name") {
    ParameterList<float> bad;
    bad.add("weight", other.weight).add("bias_renamed", other.bias).add("kernel", other.kernel);
    bad.add_buffer("running_mean", other.running_mean);
    check_refused(bad, "tensor 1 'bias' is named 'bias_renamed'");
  }
  SECTION("another order") {
    ParameterList<float> bad;
    bad.add("bias", other.bias).add("weight", other.weight).add("kernel", other.kernel);
    bad.add_buffer("running_mean", other.running_mean);
    check_refused(bad, "tensor 0 'weight'");
  }
  SECTION("another shape") {
    Eigen::MatrixXf wide(4, 3);
    ParameterList<float> bad;
    bad.add("weight", wide).add("bias", other.bias).add("kernel", other.kernel);
    bad.add_buffer("running_mean", other.running_mean);
    check_refused(bad, "'weight' has shape [4, 3] where the averaged copy has [3, 4]");
  }
  SECTION("a buffer passed as a parameter") {
    ParameterList<float> bad;
    bad.add("weight", other.weight).add("bias", other.bias).add("kernel", other.kernel);
    bad.add("running_mean", other.running_mean);
    check_refused(bad, "'running_mean' is a parameter in the model and a buffer");
  }
  SECTION("another storage order") {
    Eigen::Matrix<float, 3, 4, Eigen::RowMajor> row_major;
    ParameterList<float> bad;
    bad.add("weight", row_major).add("bias", other.bias).add("kernel", other.kernel);
    bad.add_buffer("running_mean", other.running_mean);
    check_refused(bad, "'weight' has another storage order");
  }
  SECTION("a tensor too few") {
    ParameterList<float> bad;
    bad.add("weight", other.weight).add("bias", other.bias).add("kernel", other.kernel);
    check_refused(bad, "the first missing one is 'running_mean'");
  }
  SECTION("a tensor too many") {
    Eigen::VectorXf extra(2);
    auto bad = other.list();
    bad.add("extra", extra);
    check_refused(bad, "the first extra one is 'extra'");
  }
}

TEST_CASE("user averaging functions: in place, PyTorch-style returning, and multi-tensor",
          "[averaged_model]") {
  std::mt19937 rng(13);
  MixedModel<double> model;
  const auto list = model.list();

  // "Keep a quarter of the old average", written three ways by a user and once by the library.
  auto in_place = [](auto&& averaged, const auto& current, std::int64_t) {
    averaged = 0.25 * averaged + 0.75 * current;
  };
  auto returning = [](const auto& averaged, const auto& current, std::int64_t) {
    return 0.25 * averaged + 0.75 * current;
  };
  std::int64_t multi_calls = 0;
  auto multi =
      polyak::multi_tensor([&multi_calls](const auto& averaged, const auto& current, std::int64_t n) {
        ++multi_calls;
        CHECK(n == multi_calls);  // num_averaged counts the models already folded in
        for (std::size_t i = 0; i < averaged.size(); ++i)
          averaged[i] = 0.25 * averaged[i] + 0.75 * current[i];
      });
  AveragedModel a(list, in_place);
  AveragedModel b(list, returning);
  AveragedModel c(list, multi);
  AveragedModel d(list, polyak::get_ema_multi_avg_fn(0.25));  // the same rule from the library

  std::vector<double> expected;
  for (int step = 0; step < 5; ++step) {
    model.randomize(rng);
    const auto x = model.values();
    if (step == 0) {
      expected = x;
    } else {
      for (std::size_t i = 0; i < parameter_scalars; ++i) expected[i] = 0.25 * expected[i] + 0.75 * x[i];
      for (std::size_t i = parameter_scalars; i < x.size(); ++i) expected[i] = x[i];
    }
    a.update_parameters(list);
    b.update_parameters(list);
    c.update_parameters(list);
    d.update_parameters(list);
  }
  CHECK(multi_calls == 4);
  for (const auto& values :
       {values_of(a.tensors()), values_of(b.tensors()), values_of(c.tensors()), values_of(d.tensors())}) {
    for (std::size_t i = 0; i < expected.size(); ++i) CHECK(close(values[i], expected[i], 1e-14));
  }
}

TEST_CASE("an AveragedModel can be moved and keeps working", "[averaged_model]") {
  std::mt19937 rng(17);
  MixedModel<float> model;
  model.randomize(rng);
  const auto list = model.list();
  AveragedModel<float> first(list);
  first.update_parameters(list);
  AveragedModel<float> moved(std::move(first));
  model.randomize(rng);
  const auto x = model.values();
  const auto before = values_of(moved.tensors());
  moved.update_parameters(list);
  const auto after = values_of(moved.tensors());
  for (std::size_t i = 0; i < parameter_scalars; ++i) CHECK(close(after[i], (before[i] + x[i]) / 2, 1e-6));
  CHECK(moved.n_averaged() == 2);
}

TEMPLATE_TEST_CASE("a thread pool splits large updates and gives the same bits", "[averaged_model][threads]",
                   float, Eigen::bfloat16) {
  // Three tensors of odd sizes, past the threshold for three threads.
  const std::size_t sizes[] = {300007, 5, 600011};
  std::mt19937 rng(23);
  std::normal_distribution<float> normal;
  std::vector<Eigen::Matrix<TestType, Eigen::Dynamic, 1>> tensors;
  ParameterList<TestType> list;
  for (std::size_t k = 0; k < 3; ++k) tensors.emplace_back(static_cast<Eigen::Index>(sizes[k]));
  for (std::size_t k = 0; k < 3; ++k) list.add("t" + std::to_string(k), tensors[k]);
  auto randomize = [&] {
    for (auto& t : tensors) {
      for (Eigen::Index i = 0; i < t.size(); ++i) t[i] = TestType(normal(rng));
    }
  };

  polyak::ThreadPool pool(3);
  AveragedModel<TestType, polyak::EMA> threaded(list, polyak::EMA{0.9}), alone(list, polyak::EMA{0.9});
  AveragedModel threaded_multi(list, polyak::get_swa_multi_avg_fn()),
      alone_multi(list, polyak::get_swa_multi_avg_fn());
  threaded.set_thread_pool(&pool);
  threaded_multi.set_thread_pool(&pool);
  REQUIRE(list.numel() >= AveragedModel<TestType>::min_scalars_per_thread * 3);

  std::vector<double> sum(list.numel(), 0.0);
  const int steps = 4;
  for (int step = 0; step < steps; ++step) {
    randomize();
    const auto x = values_of(list);
    for (std::size_t i = 0; i < x.size(); ++i) sum[i] += x[i];
    for (auto* m : {&threaded, &alone}) m->update_parameters(list);
    for (auto* m : {&threaded_multi, &alone_multi}) m->update_parameters(list);
  }
  CHECK(values_of(threaded.tensors()) == values_of(alone.tensors()));
  const auto mean = values_of(threaded_multi.tensors());
  CHECK(mean == values_of(alone_multi.tensors()));
  std::size_t off = 0;
  for (std::size_t i = 0; i < mean.size(); ++i, ++off) {
    if (!close(mean[i], sum[i] / steps, 4 * tolerance_v<float>)) {
      FAIL("scalar " << i << ": " << mean[i] << " vs " << sum[i] / steps);
    }
  }
  CHECK(off == list.numel());
}

// Issue 12, item 12: the update that read the freed storage of a resized Eigen vector is refused.
TEST_CASE("an update through a stale view is refused and changes nothing", "[averaged_model]") {
  Eigen::VectorXf w = Eigen::VectorXf::Constant(4, 1.0f);
  ParameterList<float> list;
  list.add("w", w);
  AveragedModel<float> swa(list);
  swa.update_parameters(list);
  w.resize(4096);  // another allocation: the view's pointer is freed
  w.setConstant(5.0f);
  CHECK_THROWS_WITH(swa.update_parameters(list),
                    Catch::Contains("update_parameters: tensor 'w' was resized, moved or replaced"));
  CHECK(swa.n_averaged() == 1);
  CHECK(swa.tensors()[0].data()[0] == 1.0f);
  CHECK_THROWS_AS(swa.copy_to(list), std::invalid_argument);
  CHECK_THROWS_AS(swa.swap(list), std::invalid_argument);
}

// Issue 13: every built-in rule computed its step's constant per block of 1,024 scalars (16-bit
// models) and per thread slice: a ScheduledEMA's schedule ran about 900 times an update here, a
// PowerEMA's exp/log1p as often. The step's kernel is now computed once per update_parameters.
TEST_CASE("a rule's step weight is computed once per update, over threads and 16-bit blocks",
          "[averaged_model][threads]") {
  using Vector = Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, 1>;
  std::vector<Vector> tensors{Vector::Zero(300007), Vector::Zero(5), Vector::Zero(600011)};
  ParameterList<Eigen::bfloat16> list;
  for (std::size_t k = 0; k < 3; ++k) list.add("t" + std::to_string(k), tensors[k]);
  polyak::ThreadPool pool(3);
  std::atomic<int> calls{0};
  const auto schedule = [counter = &calls](std::int64_t t) {
    ++*counter;
    return t < 3 ? 0.5 : 0.9;
  };
  AveragedModel every_step(list, polyak::ScheduledEMA{schedule});
  AveragedModel every_third(list, polyak::ScheduledEMA{schedule, {0, 3, true}});
  every_step.set_thread_pool(&pool);
  every_third.set_thread_pool(&pool);
  REQUIRE(list.numel() >= AveragedModel<Eigen::bfloat16>::min_scalars_per_thread * 3);
  every_step.update_parameters(list);  // the first update copies: no schedule
  every_third.update_parameters(list);
  CHECK(calls == 0);
  for (int step = 1; step <= 6; ++step) {
    for (auto& t : tensors) t.setConstant(Eigen::bfloat16(static_cast<float>(step)));
    calls = 0;
    every_step.update_parameters(list);
    CHECK(calls == 1);
    calls = 0;
    every_third.update_parameters(list);
    const bool updates = (every_third.n_averaged() - 1) % 3 == 0;  // the call with n_averaged = 3k
    CHECK(calls == (updates ? 3 : 0));                             // compounds the 3 decays
  }
}
