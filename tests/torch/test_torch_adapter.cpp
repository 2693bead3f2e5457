// SPDX-License-Identifier: MIT
// polyak/torch.hpp: views of a libtorch module, update_bn over its batch-norm layers, SWALR over a
// torch::optim optimizer; expected values from closed forms and from libtorch's own reductions.
#include "polyak/torch.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <stdexcept>

#include "polyak/averaged_model.hpp"

namespace nn = torch::nn;

TEST_CASE("parameters() views a module's tensors under Python's names", "[torch]") {
  nn::Sequential model(nn::Linear(3, 2), nn::BatchNorm1d(2));
  const auto params = polyak::libtorch::parameters<float>(*model);
  REQUIRE(params.size() == 6);  // num_batches_tracked (int64) is a counter: left out
  const char* names[] = {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"};
  for (std::size_t i = 0; i < 6; ++i) CHECK(params[i].name() == names[i]);
  CHECK(params[0].shape() == std::vector<std::int64_t>{2, 3});
  CHECK(params[0].data() == model[0]->as<nn::Linear>()->weight.data_ptr<float>());
  CHECK_FALSE(params[3].is_buffer());
  CHECK(params[4].is_buffer());
  CHECK(polyak::libtorch::parameters<float>(*model, polyak::libtorch::Buffers::Exclude).size() == 4);

  SECTION("writes through the views reach the module") {
    polyak::AveragedModel<float> swa(params);
    torch::NoGradGuard no_grad;
    auto weight = model[0]->as<nn::Linear>()->weight;
    for (const float value : {1.0f, 2.0f, 6.0f}) {
      weight.fill_(value);
      swa.update_parameters(params);
    }
    weight.fill_(0.0f);
    swa.copy_to(params);
    CHECK(weight.eq(3.0f).all().item<bool>());  // (1 + 2 + 6) / 3
  }
}

TEST_CASE("parameters() refuses tensors it cannot view, naming them", "[torch]") {
  nn::Linear wide(3, 2);
  wide->to(torch::kDouble);
  CHECK_THROWS_WITH(polyak::libtorch::parameters<float>(*wide),
                    Catch::Contains("'weight'") && Catch::Contains("Double") && Catch::Contains("not Float"));
  CHECK(polyak::libtorch::parameters<double>(*wide).size() == 2);

  struct Strided : nn::Module {
    Strided() { register_parameter("w", torch::ones({3, 4}).t()); }
  };
  Strided strided;
  CHECK_THROWS_WITH(polyak::libtorch::parameters<float>(strided),
                    Catch::Contains("'w'") && Catch::Contains("not contiguous"));

  struct Counting : nn::Module {
    Counting() { register_parameter("count", torch::zeros({2}, torch::kLong), /*requires_grad=*/false); }
  };
  Counting counting;
  CHECK_THROWS_WITH(polyak::libtorch::parameters<float>(counting),
                    Catch::Contains("'count'") && Catch::Contains("Long"));
}

TEST_CASE("parameters() views half and bfloat16 modules", "[torch]") {
  nn::Linear half(4, 2), brain(4, 2);
  half->to(torch::kHalf);
  brain->to(torch::kBFloat16);
  torch::NoGradGuard no_grad;
  const auto h = polyak::libtorch::parameters<Eigen::half>(*half);
  const auto b = polyak::libtorch::parameters<Eigen::bfloat16>(*brain);
  polyak::AveragedModel<Eigen::half> h_avg(h);
  polyak::AveragedModel<Eigen::bfloat16> b_avg(b);
  for (const float value : {0.5f, 1.5f, 4.0f}) {  // exact in both types
    half->weight.fill_(value);
    brain->weight.fill_(value);
    h_avg.update_parameters(h);
    b_avg.update_parameters(b);
  }
  h_avg.copy_to(h);
  b_avg.copy_to(b);
  CHECK(half->weight.to(torch::kFloat).eq(2.0f).all().item<bool>());
  CHECK(brain->weight.to(torch::kFloat).eq(2.0f).all().item<bool>());
}

TEST_CASE("update_bn recomputes BatchNorm1d/2d/3d statistics as the average of the batches' moments",
          "[torch]") {
  torch::manual_seed(3);
  // Each layer is fed the batches directly: its statistics are then libtorch's own reductions of them.
  struct Net : nn::Module {
    nn::BatchNorm1d bn1{nn::BatchNorm1dOptions(3).momentum(0.3)};
    nn::BatchNorm2d bn2{2};
    nn::BatchNorm3d bn3{nn::BatchNorm3dOptions(2).momentum(c10::nullopt)};
    Net() {
      register_module("bn1", bn1);
      register_module("bn2", bn2);
      register_module("bn3", bn3);
    }
  };
  Net net;
  net.eval();
  struct Batch {
    torch::Tensor x1, x2, x3;
  };
  std::vector<Batch> batches;
  for (const int n : {5, 8, 3}) {
    batches.push_back(
        {torch::randn({n, 3}) * 2 + 1, torch::randn({n, 2, 3, 4}) - 3, torch::randn({n, 2, 2, 3, 2}) * 0.5});
  }
  {  // stale statistics to be replaced
    torch::NoGradGuard no_grad;
    net.bn2->running_mean.fill_(7.0f);
    net.bn2->num_batches_tracked.fill_(99);
  }
  polyak::libtorch::update_bn(
      batches,
      [&](const Batch& b) {
        net.bn1->forward(b.x1);
        net.bn2->forward(b.x2);
        net.bn3->forward(b.x3);
      },
      net);

  auto expected = [&](auto member, std::vector<std::int64_t> dims) {
    torch::Tensor mean = torch::zeros({member(batches[0]).size(1)}), var = torch::zeros_like(mean);
    for (const auto& b : batches) {
      mean += member(b).mean(dims);
      var += member(b).var(dims, /*unbiased=*/true);
    }
    return std::make_pair(mean / 3.0, var / 3.0);
  };
  const auto [mean1, var1] = expected([](const Batch& b) { return b.x1; }, {0});
  const auto [mean2, var2] = expected([](const Batch& b) { return b.x2; }, {0, 2, 3});
  const auto [mean3, var3] = expected([](const Batch& b) { return b.x3; }, {0, 2, 3, 4});
  CHECK(torch::allclose(net.bn1->running_mean, mean1, 1e-5, 1e-6));
  CHECK(torch::allclose(net.bn1->running_var, var1, 1e-5, 1e-6));
  CHECK(torch::allclose(net.bn2->running_mean, mean2, 1e-5, 1e-6));
  CHECK(torch::allclose(net.bn2->running_var, var2, 1e-5, 1e-6));
  CHECK(torch::allclose(net.bn3->running_mean, mean3, 1e-5, 1e-6));
  CHECK(torch::allclose(net.bn3->running_var, var3, 1e-5, 1e-6));
  CHECK(net.bn2->num_batches_tracked.item<std::int64_t>() == 3);
  // momenta and the mode come back
  CHECK(net.bn1->options.momentum().value() == 0.3);
  CHECK(net.bn2->options.momentum().value() == 0.1);
  CHECK_FALSE(net.bn3->options.momentum().has_value());
  CHECK_FALSE(net.is_training());

  SECTION("also when forward throws") {
    net.train();
    CHECK_THROWS_AS(polyak::libtorch::update_bn(
                        batches, [](const Batch&) { throw std::runtime_error("data loader failed"); }, net),
                    std::runtime_error);
    CHECK(net.bn1->options.momentum().value() == 0.3);
    CHECK(net.is_training());
  }
  SECTION("a model without batch norm is left alone") {
    nn::Linear plain(2, 2);
    int calls = 0;
    polyak::libtorch::update_bn(
        batches, [&](const Batch&) { ++calls; }, *plain);
    CHECK(calls == 0);
  }
}

TEST_CASE("SWALR anneals a torch::optim optimizer's groups to swa_lr", "[torch]") {
  nn::Linear a(2, 2), b(2, 2);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(a->parameters(), std::make_unique<torch::optim::SGDOptions>(0.5));
  groups.emplace_back(b->parameters(), std::make_unique<torch::optim::SGDOptions>(0.1));
  torch::optim::SGD optimizer(groups, torch::optim::SGDOptions(0.5));
  polyak::SWALR scheduler(optimizer, std::vector<double>{0.1, 0.3}, /*anneal_epochs=*/4,
                          polyak::AnnealStrategy::Cos);
  auto lr = [&](std::size_t g) { return optimizer.param_groups()[g].options().get_lr(); };
  CHECK(lr(0) == 0.5);  // step 0 of the anneal: unchanged
  scheduler.step();
  scheduler.step();
  // Halfway through a cosine anneal alpha = (1 - cos(pi / 2)) / 2 = 1/2: the midpoint.
  CHECK(lr(0) == Approx(0.3).epsilon(1e-12));
  CHECK(lr(1) == Approx(0.2).epsilon(1e-12));
  for (int i = 0; i < 3; ++i) scheduler.step();
  CHECK(lr(0) == Approx(0.1).epsilon(1e-12));
  CHECK(lr(1) == Approx(0.3).epsilon(1e-12));
  CHECK_THROWS_WITH(polyak::SWALR(optimizer, std::vector<double>{0.1}),
                    Catch::Contains("2 parameter groups"));
}
