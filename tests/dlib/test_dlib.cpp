// SPDX-License-Identifier: MIT
// polyak/dlib.hpp: views of a dlib net's parameters, kept in step with dnn_trainer's thread; SWALR on
// the trainer's learning rate; update_bn over bn_ layers. Expected values from closed forms worked
// out here (the mean of the snapshots, SWALR's cosine, batch norm's normalisation) and from polyak's
// Eigen path on copies of the same values.
#include "polyak/dlib.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <vector>

#include <Eigen/Core>

namespace {

using Sample = dlib::matrix<float, 0, 1>;
using Net = dlib::loss_multiclass_log<dlib::fc<3, dlib::relu<dlib::bn_fc<dlib::fc<5, dlib::input<Sample>>>>>>;

/// `count` samples of `dims` features, deterministic and varied, and labels 0..2.
std::vector<Sample> samples(int count, long dims, float shift = 0) {
  std::vector<Sample> xs;
  for (int i = 0; i < count; ++i) {
    Sample x(dims);
    for (long j = 0; j < dims; ++j)
      x(j) = std::sin(0.7f * static_cast<float>(i) + 1.3f * static_cast<float>(j)) + shift;
    xs.push_back(x);
  }
  return xs;
}

std::vector<unsigned long> labels(int count) {
  std::vector<unsigned long> ys;
  for (int i = 0; i < count; ++i) ys.push_back(static_cast<unsigned long>(i % 3));
  return ys;
}

/// A copy of every parameter tensor of `net`, in visiting order.
std::vector<std::vector<float>> copy_of(Net& net) {
  std::vector<std::vector<float>> copy;
  dlib::visit_layer_parameters(net, [&](dlib::tensor& t) {
    if (t.size() != 0) copy.emplace_back(t.begin(), t.end());
  });
  return copy;
}

}  // namespace

TEST_CASE("parameters() is refused before dlib has made them", "[dlib]") {
  Net net;
  CHECK_THROWS_AS(polyak::dlib_dnn::parameters(net), std::invalid_argument);
  CHECK_THROWS_WITH(polyak::dlib_dnn::parameters(net),
                    Catch::Contains("has no parameters") && Catch::Contains("first forward pass"));
}

TEST_CASE("parameters() views each layer's tensor under its index and kind", "[dlib]") {
  Net net;
  dlib::dnn_trainer<Net> trainer(net, dlib::sgd());
  trainer.train_one_step(samples(8, 4), labels(8));
  Net& trained = trainer.get_net(dlib::force_flush_to_disk::no);
  REQUIRE(&trained == &net);
  const auto params = polyak::dlib_dnn::parameters(net);
  REQUIRE(params.size() == 3);  // relu has no parameters
  CHECK(params[0].name() == "1.fc");
  CHECK(params[1].name() == "3.bn_fc");
  CHECK(params[2].name() == "4.fc");
  CHECK(params[0].data() == dlib::layer<1>(net).layer_details().get_layer_params().host());
  CHECK(params[1].data() == dlib::layer<3>(net).layer_details().get_layer_params().host());
  CHECK(params[2].data() == dlib::layer<4>(net).layer_details().get_layer_params().host());
  CHECK(params[0].shape() == std::vector<std::int64_t>{6, 3, 1, 1});   // 5 inputs and a bias, 3 outputs
  CHECK(params[1].shape() == std::vector<std::int64_t>{10, 1, 1, 1});  // gamma and beta of 5 features
  CHECK(params[2].shape() == std::vector<std::int64_t>{5, 5, 1, 1});   // 4 inputs and a bias, 5 outputs
}

TEST_CASE("SWA and EMA over a dnn_trainer equal the mean of the snapshots and the Eigen path", "[dlib]") {
  Net net;
  dlib::dnn_trainer<Net> trainer(net, dlib::sgd(0.0005f, 0.9f));
  trainer.set_learning_rate(0.05);
  const auto xs = samples(12, 4);
  const auto ys = labels(12);
  trainer.train_one_step(xs, ys);
  polyak::dlib_dnn::TrainerParameters params(trainer);
  polyak::AveragedModel<float> swa(params.synced());
  polyak::AveragedModel<float, polyak::EMA> ema(params.synced(), polyak::EMA{0.9});

  // The Eigen path: copies of the same values after each step, averaged by views of Eigen vectors.
  const std::vector<std::vector<float>> shapes = copy_of(net);
  std::vector<Eigen::VectorXf> copies;
  polyak::ParameterList<float> eigen_list;
  copies.reserve(shapes.size());
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    copies.push_back(Eigen::VectorXf::Zero(static_cast<Eigen::Index>(shapes[i].size())));
    eigen_list.add(std::to_string(i), copies.back());
  }
  polyak::AveragedModel<float> eigen_swa(eigen_list);
  polyak::AveragedModel<float, polyak::EMA> eigen_ema(eigen_list, polyak::EMA{0.9});

  std::vector<std::vector<double>> sums, emas;
  const int steps = 7;
  for (int step = 0; step < steps; ++step) {
    trainer.train_one_step(xs, ys);
    swa.update_parameters(params.synced());
    ema.update_parameters(params.synced());
    const auto snapshot = copy_of(net);
    sums.resize(snapshot.size());
    for (std::size_t i = 0; i < snapshot.size(); ++i) {
      sums[i].resize(snapshot[i].size());
      for (std::size_t j = 0; j < snapshot[i].size(); ++j) {
        sums[i][j] += snapshot[i][j];
        if (emas.size() <= i) emas.resize(snapshot.size());
        if (emas[i].size() < snapshot[i].size()) emas[i].assign(snapshot[i].size(), 0.0);
        emas[i][j] = step == 0 ? snapshot[i][j] : 0.9 * emas[i][j] + 0.1 * snapshot[i][j];
        copies[i](static_cast<Eigen::Index>(j)) = snapshot[i][j];
      }
    }
    eigen_swa.update_parameters(eigen_list);
    eigen_ema.update_parameters(eigen_list);
  }
  REQUIRE(copy_of(net) != shapes);  // the trainer moved the weights

  swa.copy_to(params.synced());
  const auto averaged = copy_of(net);
  eigen_swa.copy_to(eigen_list);
  for (std::size_t i = 0; i < averaged.size(); ++i) {
    for (std::size_t j = 0; j < averaged[i].size(); ++j) {
      CHECK(averaged[i][j] == copies[i](static_cast<Eigen::Index>(j)));  // bit for bit
      CHECK(averaged[i][j] == Approx(sums[i][j] / steps).epsilon(1e-6).margin(1e-7));
    }
  }
  ema.copy_to(params.synced());
  eigen_ema.copy_to(eigen_list);
  const auto ema_values = copy_of(net);
  for (std::size_t i = 0; i < ema_values.size(); ++i) {
    for (std::size_t j = 0; j < ema_values[i].size(); ++j) {
      CHECK(ema_values[i][j] == copies[i](static_cast<Eigen::Index>(j)));
      CHECK(ema_values[i][j] == Approx(emas[i][j]).epsilon(1e-5).margin(1e-6));  // closed form, in double
    }
  }
}

TEST_CASE("views of a net whose tensors dlib gave new storage are refused", "[dlib]") {
  Net net, wider;
  {
    dlib::dnn_trainer<Net> trainer(net, dlib::sgd());
    trainer.train_one_step(samples(4, 4), labels(4));
    dlib::dnn_trainer<Net> other(wider, dlib::sgd());
    other.train_one_step(samples(4, 40), labels(4));  // 40 inputs: a larger first layer
  }
  const auto params = polyak::dlib_dnn::parameters(net);
  polyak::AveragedModel<float> swa(params);
  std::stringstream bytes;
  dlib::serialize(wider, bytes);
  dlib::deserialize(net, bytes);
  CHECK_THROWS_AS(swa.update_parameters(params), std::invalid_argument);
  CHECK_THROWS_WITH(swa.copy_to(params), Catch::Contains("4.fc"));
  CHECK(polyak::dlib_dnn::parameters(net)[2].shape()[0] == 41);  // views made again see the new net
}

TEST_CASE("views of a tensor dlib reshaped in place are refused (from the hostile pass)", "[dlib]") {
  // Two nets whose first layer holds 30 parameters, (5, 6) and (6, 5): dlib's deserialize keeps the
  // storage of a tensor whose size stays, so only the extents tell the two apart.
  using Six = dlib::loss_multiclass_log<dlib::fc<6, dlib::input<Sample>>>;
  Six a, b;
  dlib::layer<1>(b).layer_details().set_num_outputs(5);
  a(samples(1, 4));
  b(samples(1, 5));
  const auto params = polyak::dlib_dnn::parameters(a);
  REQUIRE(params[0].shape() == std::vector<std::int64_t>{5, 6, 1, 1});
  polyak::AveragedModel<float> swa(params);
  std::stringstream bytes;
  dlib::serialize(b, bytes);
  dlib::deserialize(a, bytes);
  REQUIRE(dlib::layer<1>(a).layer_details().get_layer_params().num_samples() == 6);
  CHECK_THROWS_AS(swa.update_parameters(params), std::invalid_argument);
}

TEST_CASE("views of a net another was assigned to are refused, not read through freed layers (review)",
          "[dlib]") {
  // dlib's assignment moves the layers under the top one to new objects and frees the old ones;
  // under the sanitizers a view that kept a layer's tensor would read freed memory here.
  Net net, other;
  {
    dlib::dnn_trainer<Net> trainer(net, dlib::sgd());
    trainer.train_one_step(samples(4, 4), labels(4));
    dlib::dnn_trainer<Net> second(other, dlib::sgd());
    second.train_one_step(samples(4, 4), labels(4));
  }
  const auto params = polyak::dlib_dnn::parameters(net);
  polyak::AveragedModel<float> swa(params);
  net = other;
  CHECK_THROWS_AS(swa.update_parameters(params), std::invalid_argument);
  const auto again = polyak::dlib_dnn::parameters(net);
  CHECK_NOTHROW(swa.update_parameters(again));
}

TEST_CASE("parameters() refuses a net whose layers have none", "[dlib]") {
  dlib::relu<dlib::input<Sample>> net;
  net(samples(1, 3)[0]);
  CHECK_THROWS_WITH(polyak::dlib_dnn::parameters(net), Catch::Contains("has none to average"));
}

TEST_CASE("SWALR anneals a dnn_trainer's learning rate as PyTorch's does", "[dlib]") {
  Net net;
  dlib::dnn_trainer<Net> trainer(net, dlib::sgd());
  trainer.set_learning_rate(0.1);
  polyak::SWALR scheduler(trainer, 0.01, 3, polyak::AnnealStrategy::Cos);
  CHECK(trainer.get_learning_rate() == Approx(0.1));  // the constructor's step: alpha 0
  const double pi = std::acos(-1.0);
  for (int step = 1; step <= 4; ++step) {
    scheduler.step();
    const double alpha = (1 - std::cos(pi * std::min(step, 3) / 3.0)) / 2;
    CHECK(trainer.get_learning_rate() == Approx(0.01 * alpha + 0.1 * (1 - alpha)));
  }

  SECTION("a rate dlib refuses leaves the trainer and the scheduler as they were") {
    polyak::SWALR to_zero(trainer, 0.0, 1, polyak::AnnealStrategy::Linear);  // its first step keeps the rate
    const double lr = trainer.get_learning_rate();
    const auto epoch = to_zero.last_epoch();
    CHECK_THROWS_WITH(to_zero.step(), Catch::Contains("positive learning rate"));
    CHECK(trainer.get_learning_rate() == lr);
    CHECK(to_zero.last_epoch() == epoch);
  }
}

namespace {

using BnNet = dlib::bn_fc<dlib::input<Sample>>;

/// The net's output on one sample: dlib's bn_ then normalises with its running statistics,
/// (x - mean) / sqrt(var + eps) with gamma 1 and beta 0.
std::vector<float> infer(BnNet& net, const Sample& x) {
  const dlib::tensor& out = net(x);
  return std::vector<float>(out.begin(), out.end());
}

std::vector<std::vector<Sample>> batches_of(const std::vector<Sample>& xs, std::vector<std::size_t> sizes) {
  std::vector<std::vector<Sample>> batches;
  std::size_t at = 0;
  for (const std::size_t size : sizes) {
    batches.emplace_back(xs.begin() + static_cast<long>(at), xs.begin() + static_cast<long>(at + size));
    at += size;
  }
  return batches;
}

}  // namespace

TEST_CASE("update_bn makes bn_'s statistics the mean of the batches' statistics", "[dlib]") {
  BnNet net;
  const auto run = [&](const std::vector<Sample>& batch) { net(batch.begin(), batch.end()); };
  for (int i = 0; i < 5; ++i) run(samples(6, 3, 4.0f));  // statistics of other data, five batches in
  const long window = static_cast<long>(dlib::layer<0>(net).layer_details().get_running_stats_window_size());

  const auto xs = samples(9, 3);
  const auto batches = batches_of(xs, {2, 3, 4});
  const auto views = polyak::dlib_dnn::parameters(net);
  polyak::dlib_dnn::update_bn(batches, run, net);

  // Closed form: per feature, the mean over the batches of each batch's mean, and of its variance
  // (population or sample: which one dlib records is read off the output below).
  Sample probe(3);
  probe = 0.25f, -0.5f, 1.0f;
  const std::vector<float> out = infer(net, probe);
  REQUIRE(out.size() == 3);
  const double eps = dlib::layer<0>(net).layer_details().get_eps();
  for (long f = 0; f < 3; ++f) {
    double mean = 0, population = 0, sample = 0;
    for (const auto& batch : batches) {
      const double n = static_cast<double>(batch.size());
      double m = 0, squares = 0;
      for (const auto& x : batch) m += x(f);
      m /= n;
      for (const auto& x : batch) squares += (x(f) - m) * (x(f) - m);
      mean += m / static_cast<double>(batches.size());
      population += squares / n / static_cast<double>(batches.size());
      sample += squares / (n - 1) / static_cast<double>(batches.size());
    }
    const double with_sample = (probe(f) - mean) / std::sqrt(sample + eps);
    const double with_population = (probe(f) - mean) / std::sqrt(population + eps);
    INFO("feature " << f << ": dlib " << out[static_cast<std::size_t>(f)] << ", sample variance "
                    << with_sample << ", population variance " << with_population);
    CHECK(out[static_cast<std::size_t>(f)] == Approx(with_sample).epsilon(1e-5));
  }
  // The counter is left at the batch count: one more training-mode batch weighs 1/(3+1).
  const auto extra = samples(5, 3, 1.5f);
  run(extra);
  const std::vector<float> after_extra = infer(net, probe);
  {
    double m = 0, squares = 0, mean = 0, sample = 0;
    const long f = 0;
    for (const auto& x : extra) m += x(f);
    m /= 5;
    for (const auto& x : extra) squares += (x(f) - m) * (x(f) - m);
    for (const auto& batch : batches) {
      const double n = static_cast<double>(batch.size());
      double bm = 0, bs = 0;
      for (const auto& x : batch) bm += x(f);
      bm /= n;
      for (const auto& x : batch) bs += (x(f) - bm) * (x(f) - bm);
      mean += bm / 3;
      sample += bs / (n - 1) / 3;
    }
    mean = 0.75 * mean + 0.25 * m;
    sample = 0.75 * sample + 0.25 * squares / 4;
    CHECK(after_extra[0] == Approx((probe(0) - mean) / std::sqrt(sample + eps)).epsilon(1e-5));
  }
  // The window is the layer's again, and the views made before still hold.
  CHECK(static_cast<long>(dlib::layer<0>(net).layer_details().get_running_stats_window_size()) == window);
  polyak::AveragedModel<float> swa(views);
  CHECK_NOTHROW(swa.copy_to(views));
}

TEST_CASE("update_bn refuses and changes nothing", "[dlib]") {
  BnNet net;
  const auto run = [&](const std::vector<Sample>& batch) { net(batch.begin(), batch.end()); };
  for (int i = 0; i < 3; ++i) run(samples(5, 3, 2.0f));
  Sample probe(3);
  probe = 0.5f, 0.5f, -2.0f;
  const std::vector<float> before = infer(net, probe);
  // (the layer's own bytes: dlib's serialize of a net whose bottom layer is computational does not link)
  const auto bytes_of = [&] {
    std::ostringstream out;
    serialize(dlib::layer<0>(net).layer_details(), out);  // (a friend found by ADL)
    return out.str();
  };
  const std::string before_bytes = bytes_of();
  const auto unchanged = [&] {
    CHECK(infer(net, probe) == before);
    CHECK(bytes_of() == before_bytes);
  };
  const auto xs = samples(8, 3);

  SECTION("no batches") {
    CHECK_THROWS_WITH(polyak::dlib_dnn::update_bn(std::vector<std::vector<Sample>>{}, run, net),
                      Catch::Contains("no batches"));
    unchanged();
  }
  SECTION("a batch of one sample, which dlib's bn_ does not record") {
    CHECK_THROWS_WITH(polyak::dlib_dnn::update_bn(batches_of(xs, {3, 1, 4}), run, net),
                      Catch::Contains("batch 1") && Catch::Contains("two samples"));
    unchanged();
  }
  SECTION("a forward that runs the net twice") {
    const auto twice = [&](const std::vector<Sample>& batch) {
      run(batch);
      run(batch);
    };
    CHECK_THROWS_WITH(polyak::dlib_dnn::update_bn(batches_of(xs, {4, 4}), twice, net),
                      Catch::Contains("more than once"));
    unchanged();
  }
  SECTION("a forward that throws: its exception, every layer as it was") {
    int calls = 0;
    const auto failing = [&](const std::vector<Sample>& batch) {
      run(batch);
      if (++calls == 2) throw std::runtime_error("out of data");
    };
    CHECK_THROWS_WITH(polyak::dlib_dnn::update_bn(batches_of(xs, {4, 4}), failing, net),
                      Catch::Contains("out of data"));
    unchanged();
  }
}

TEST_CASE("update_bn refuses a net that has never run, calling nothing (from the hostile pass)", "[dlib]") {
  // dlib sets a net's layers up in its first forward pass; putting a bn_ layer back to its bytes
  // from before it left the net broken (every later forward failed).
  BnNet net;
  int calls = 0;
  const auto xs = samples(4, 3);
  CHECK_THROWS_WITH(
      polyak::dlib_dnn::update_bn(
          std::vector<std::vector<Sample>>{xs}, [&](const std::vector<Sample>&) { ++calls; }, net),
      Catch::Contains("never run"));
  CHECK(calls == 0);
  CHECK_NOTHROW(net(xs.begin(), xs.end()));
}

TEST_CASE("SWALR reads the rate a trainer's step still running has shrunk (from the hostile pass)",
          "[dlib]") {
  // A loss that rises on every step: the trainer's thread shrinks the rate tenfold on the fourth.
  using Regression = dlib::loss_mean_squared<dlib::fc<1, dlib::input<Sample>>>;
  Regression net;
  dlib::dnn_trainer<Regression> trainer(net, dlib::sgd());
  trainer.set_learning_rate(1e-9);
  trainer.set_iterations_without_progress_threshold(4);
  polyak::SWALR scheduler(trainer, 1e-10, 10, polyak::AnnealStrategy::Linear);
  const auto xs = samples(64, 3);
  for (int k = 1; k <= 4; ++k)
    trainer.train_one_step(xs, std::vector<float>(64, 1000.0f * static_cast<float>(k * k)));
  scheduler.step();  // reads 1e-10, after the shrink: the anneal from 1e-10 to 1e-10 stays there
  CHECK(trainer.get_learning_rate() == Approx(1e-10));
}

TEST_CASE("update_bn on a net without bn_ layers calls nothing", "[dlib]") {
  dlib::fc<2, dlib::input<Sample>> net;
  int calls = 0;
  polyak::dlib_dnn::update_bn(
      std::vector<int>{1, 2}, [&](int) { ++calls; }, net);
  CHECK(calls == 0);
}
