// SPDX-License-Identifier: MIT
// polyak/torch.hpp: views of a libtorch module, update_bn over its batch-norm layers, SWALR over a
// torch::optim optimizer; expected values from closed forms and from libtorch's own reductions.
#include "polyak/torch.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
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

// Issue 12, item 3: a tied weight (one tensor registered in two modules) was listed twice, so two
// updates, then swap and swap back, destroyed the live weight. Listed once, as Python's
// named_parameters() lists it.
TEST_CASE("a tied weight is viewed once, and swap keeps the live values", "[torch]") {
  struct Embedding : nn::Module {
    torch::Tensor weight = register_parameter("weight", torch::zeros({4, 4}));
  };
  struct Head : nn::Module {
    explicit Head(const torch::Tensor& tied) : weight(register_parameter("weight", tied)) {}
    torch::Tensor weight;
    torch::Tensor bias = register_parameter("bias", torch::zeros({4}));
  };
  struct LanguageModel : nn::Module {  // the output layer reuses the embedding's weight
    std::shared_ptr<Embedding> embed = register_module("embed", std::make_shared<Embedding>());
    std::shared_ptr<Head> head = register_module("head", std::make_shared<Head>(embed->weight));
  };
  LanguageModel model;
  torch::Tensor& live = model.embed->weight;
  const auto params = polyak::libtorch::parameters<float>(model);
  REQUIRE(params.size() == 2);  // embed.weight and head.bias: the tied weight once, first name kept
  CHECK(params[0].name() == "embed.weight");
  CHECK(params[1].name() == "head.bias");
  polyak::AveragedModel<float> swa(params);
  torch::NoGradGuard no_grad;
  live.fill_(2.0f);
  swa.update_parameters(params);
  live.fill_(6.0f);
  swa.update_parameters(params);  // the average is 4
  live.fill_(9.0f);
  swa.swap(params);
  CHECK(model.head->weight.eq(4.0f).all().item<bool>());
  swa.swap(params);
  CHECK(live.eq(9.0f).all().item<bool>());
  CHECK(model.head->weight.eq(9.0f).all().item<bool>());
}

// Issue 12, item 13: module->to(kFloat64) casts batch norm's int64 num_batches_tracked to double, and
// parameters<double> took them for weights (14 views instead of 12).
TEST_CASE("batch-norm counters are left out whatever their dtype", "[torch]") {
  nn::Sequential model(nn::Linear(3, 4), nn::BatchNorm1d(4), nn::ReLU(), nn::Linear(4, 2),
                       nn::BatchNorm1d(2));
  const auto in_float = polyak::libtorch::parameters<float>(*model);
  model->to(torch::kFloat64);
  const auto in_double = polyak::libtorch::parameters<double>(*model);
  CHECK(in_float.size() == 12);
  REQUIRE(in_double.size() == 12);
  for (std::size_t i = 0; i < 12; ++i) {
    CHECK(in_double[i].name() == in_float[i].name());
    CHECK(in_double[i].name().find("num_batches_tracked") == std::string::npos);
  }
}

// Issue 12, item 14: torch::load (how a libtorch trainer resumes) and module->to() replace the
// tensors' storage; views made before pointed at freed memory and the next update read it silently.
TEST_CASE("views made before torch::load or module->to() are refused at the next call", "[torch]") {
  const std::string path = (std::filesystem::temp_directory_path() / "polyak_torch_stale.pt").string();
  nn::Sequential model(nn::Linear(3, 2), nn::BatchNorm1d(2));
  torch::save(model, path);
  const auto params = polyak::libtorch::parameters<float>(*model);
  polyak::AveragedModel<float, polyak::EMA> ema(params, polyak::EMA{0.5});
  ema.update_parameters(params);
  const float before = ema.tensors()[0].data()[0];

  torch::load(model, path);  // the resume: every parameter gets new storage
  CHECK_THROWS_WITH(ema.update_parameters(params),
                    Catch::Contains("tensor '0.weight' was resized, moved or replaced"));
  CHECK(ema.n_averaged() == 1);
  CHECK(ema.tensors()[0].data()[0] == before);
  const auto fresh = polyak::libtorch::parameters<float>(*model);  // what the message asks for
  CHECK_NOTHROW(ema.update_parameters(fresh));

  model->to(torch::kFloat64);
  CHECK_THROWS_WITH(ema.copy_to(fresh), Catch::Contains("'0.weight' was resized, moved or replaced"));
  std::filesystem::remove(path);
}
