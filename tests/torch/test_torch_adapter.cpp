// SPDX-License-Identifier: MIT
// polyak/torch.hpp: views of a libtorch module, update_bn over its batch-norm layers, SWALR over a
// torch::optim optimizer; polyak/torch/averaged_model.hpp: the average kept on the module's device.
// Expected values from closed forms, from libtorch's own reductions and from polyak::AveragedModel.
// The device average runs on CPU tensors here (polyak's kernel on the tensors' memory, the staging
// and background fold of Placement::Host, the checkpoint bridge); the CUDA cases, which run torch's
// kernels, run where a GPU is present and say they were skipped otherwise.
#include "polyak/torch.hpp"
#include "polyak/torch/averaged_model.hpp"
#include "polyak/torch/checkpoint.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include <unistd.h>  // getpid

#include "polyak/core/averaged_model.hpp"

namespace nn = torch::nn;

TEST_CASE("tensors() views a module's tensors under Python's names", "[torch]") {
  nn::Sequential model(nn::Linear(3, 2), nn::BatchNorm1d(2));
  const auto params = polyak::libtorch::tensors<float>(*model);
  REQUIRE(params.size() == 6);  // num_batches_tracked (int64) is a counter: left out
  const char* names[] = {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"};
  for (std::size_t i = 0; i < 6; ++i) CHECK(params[i].name() == names[i]);
  CHECK(params[0].shape() == std::vector<std::int64_t>{2, 3});
  CHECK(params[0].data() == model[0]->as<nn::Linear>()->weight.data_ptr<float>());
  CHECK_FALSE(params[3].is_buffer());
  CHECK(params[4].is_buffer());
  CHECK(polyak::libtorch::parameters<float>(*model).size() ==
        4);  // the parameters alone, as PyTorch lists them

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

TEST_CASE("tensors() refuses tensors it cannot view, naming them", "[torch]") {
  nn::Linear wide(3, 2);
  wide->to(torch::kDouble);
  CHECK_THROWS_WITH(polyak::libtorch::tensors<float>(*wide),
                    Catch::Contains("'weight'") && Catch::Contains("Double") && Catch::Contains("not Float"));
  CHECK(polyak::libtorch::tensors<double>(*wide).size() == 2);

  struct Strided : nn::Module {
    Strided() { register_parameter("w", torch::ones({3, 4}).t()); }
  };
  Strided strided;
  CHECK_THROWS_WITH(polyak::libtorch::tensors<float>(strided),
                    Catch::Contains("'w'") && Catch::Contains("not contiguous"));

  struct Counting : nn::Module {
    Counting() { register_parameter("count", torch::zeros({2}, torch::kLong), /*requires_grad=*/false); }
  };
  Counting counting;
  CHECK_THROWS_WITH(polyak::libtorch::tensors<float>(counting),
                    Catch::Contains("'count'") && Catch::Contains("Long"));
}

TEST_CASE("tensors() views half and bfloat16 modules", "[torch]") {
  nn::Linear half(4, 2), brain(4, 2);
  half->to(torch::kHalf);
  brain->to(torch::kBFloat16);
  torch::NoGradGuard no_grad;
  const auto h = polyak::libtorch::tensors<Eigen::half>(*half);
  const auto b = polyak::libtorch::tensors<Eigen::bfloat16>(*brain);
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
  const auto params = polyak::libtorch::tensors<float>(model);
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
  const auto in_float = polyak::libtorch::tensors<float>(*model);
  model->to(torch::kFloat64);
  const auto in_double = polyak::libtorch::tensors<double>(*model);
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
  const auto params = polyak::libtorch::tensors<float>(*model);
  polyak::AveragedModel<float, polyak::EMA> ema(params, polyak::EMA{0.5});
  ema.update_parameters(params);
  const float before = ema.tensors()[0].data()[0];

  torch::load(model, path);  // the resume: every parameter gets new storage
  CHECK_THROWS_WITH(ema.update_parameters(params),
                    Catch::Contains("tensor '0.weight' was resized, moved or replaced"));
  CHECK(ema.n_averaged() == 1);
  CHECK(ema.tensors()[0].data()[0] == before);
  const auto fresh = polyak::libtorch::tensors<float>(*model);  // what the message asks for
  CHECK_NOTHROW(ema.update_parameters(fresh));

  model->to(torch::kFloat64);
  CHECK_THROWS_WITH(ema.copy_to(fresh), Catch::Contains("'0.weight' was resized, moved or replaced"));
  std::filesystem::remove(path);
}

namespace {

/// A module whose every parameter and buffer holds `value`.
void fill(nn::Module& module, double value) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters()) p.fill_(value);
  for (auto& b : module.buffers()) {
    if (b.is_floating_point()) b.fill_(value);
  }
}

double value_of(const torch::Tensor& t) { return t.flatten()[0].item<double>(); }

/// Runs `check` on CUDA when a GPU is present; otherwise says it was skipped.
template <class Check>
void on_cuda(const char* what, Check&& check) {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device: " << what << " skipped");
    return;
  }
  check(torch::Device(torch::kCUDA));
}

}  // namespace

TEST_CASE("the device average: SWA and EMA as closed forms, first update a copy", "[torch][device]") {
  nn::Sequential model(nn::Linear(3, 2), nn::BatchNorm1d(2));
  polyak::libtorch::AveragedModel<> swa(*model);
  polyak::libtorch::AveragedModel<polyak::EMA> ema(*model, polyak::EMA{0.75});
  const double values[] = {1, 2, 6, 3};
  double ema_expected = 0;
  for (std::size_t k = 0; k < 4; ++k) {
    fill(*model, values[k]);
    swa.update_parameters(*model);
    ema.update_parameters(*model);
    ema_expected = k == 0 ? values[k] : ema_expected + 0.25 * (values[k] - ema_expected);
  }
  CHECK(swa.n_averaged() == 4);
  REQUIRE(swa.parameters().size() == 4);
  REQUIRE(swa.buffers().size() == 2);  // num_batches_tracked is a counter: left out
  for (const auto& item : swa.parameters()) CHECK(item.value().eq(3.0).all().item<bool>());  // (1+2+6+3)/4
  for (const auto& item : ema.parameters())
    CHECK(value_of(item.value()) == Approx(ema_expected).epsilon(1e-7));
  // use_buffers == false: the buffers follow the model.
  for (const auto& item : swa.buffers()) CHECK(value_of(item.value()) == 3.0);

  fill(*model, 0);
  swa.copy_to(*model);
  for (const auto& p : model->parameters()) CHECK(p.eq(3.0).all().item<bool>());
}

TEST_CASE("the device average keeps every built-in rule's numbers", "[torch][device]") {
  // ScheduledEMA with a delayed start and sparse compounded updates, PowerEMA, and the multi-tensor
  // EMA: each against the scalar recurrence of its definition.
  nn::Linear model(2, 2);
  const polyak::ScheduledEMA<polyak::WarmupDecay> scheduled{polyak::WarmupDecay{0.9},
                                                            polyak::EmaCadence{2, 3, true}};
  const polyak::PowerEMA power{6.94};
  polyak::libtorch::AveragedModel<polyak::ScheduledEMA<polyak::WarmupDecay>> a(*model, scheduled);
  polyak::libtorch::AveragedModel<polyak::PowerEMA> b(*model, power);
  polyak::libtorch::AveragedModel<polyak::ForEachTensor<polyak::EMA>> c(*model,
                                                                        polyak::get_ema_multi_avg_fn(0.5));
  double ea = 0, eb = 0, ec = 0;
  for (std::int64_t n = 0; n < 20; ++n) {
    const double x = std::sin(static_cast<double>(n)) * 4;
    fill(*model, x);
    a.update_parameters(*model);
    b.update_parameters(*model);
    c.update_parameters(*model);
    if (n == 0) {
      ea = eb = ec = x;
      continue;
    }
    if (n % 3 == 0) {  // ScheduledEMA: only every 3rd call, with the product of the window's decays
      double decay = 1;
      for (std::int64_t t = n - 2 - 3 + 1; t <= n - 2; ++t) {
        decay *=
            t <= 0 ? 0.0 : std::min(0.9, (1.0 + static_cast<double>(t)) / (10.0 + static_cast<double>(t)));
      }
      ea += (1 - decay) * (x - ea);
    }
    eb += (1 - std::pow(1.0 - 1.0 / static_cast<double>(n + 1), 6.94 + 1)) * (x - eb);  // beta_t, t = n + 1
    ec += 0.5 * (x - ec);
  }
  CHECK(value_of(a.parameters()["weight"]) == Approx(ea).epsilon(1e-5));
  CHECK(value_of(b.parameters()["weight"]) == Approx(eb).epsilon(1e-5));
  CHECK(value_of(c.parameters()["bias"]) == Approx(ec).epsilon(1e-5));
}

TEST_CASE("on the CPU the device average has polyak::AveragedModel's numbers, bit for bit",
          "[torch][device]") {
  // Same rules, same kernel: the device average over the module and the Eigen path over its views
  // agree exactly, for float and bf16 modules, EMA and SWA, on random values. Large enough (2^19
  // scalars) that torch's intra-op threads split the update.
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    CAPTURE(c10::toString(dtype));
    nn::Sequential model(nn::Linear(1024, 512), nn::BatchNorm1d(512));
    model->to(dtype);
    polyak::libtorch::AveragedModel<polyak::EMA> device_ema(*model, polyak::EMA{0.9}, true);
    polyak::libtorch::AveragedModel<> device_swa(*model);
    const auto check = [&](auto zero) {
      using T = decltype(zero);
      const auto views = polyak::libtorch::tensors<T>(*model);
      polyak::AveragedModel<T, polyak::EMA> eigen_ema(views, polyak::EMA{0.9}, true);
      polyak::AveragedModel<T> eigen_swa(views);
      for (int k = 0; k < 4; ++k) {
        torch::NoGradGuard no_grad;
        for (auto& p : model->parameters()) p.uniform_(-1, 1);
        for (auto& b : model->buffers()) {
          if (b.is_floating_point()) b.uniform_(0, 1);
        }
        device_ema.update_parameters(*model);
        device_swa.update_parameters(*model);
        eigen_ema.update_parameters(views);
        eigen_swa.update_parameters(views);
      }
      const auto same = [](const auto& eigen, const torch::Tensor& device, std::size_t i) {
        const auto& view = eigen.tensors()[i];
        return torch::from_blob(const_cast<float*>(view.data()), {static_cast<std::int64_t>(view.numel())},
                                torch::kFloat)
            .equal(device.flatten());
      };
      std::size_t i = 0;
      for (const auto& item : device_ema.parameters()) CHECK(same(eigen_ema, item.value(), i++));
      for (const auto& item : device_ema.buffers()) CHECK(same(eigen_ema, item.value(), i++));
      i = 0;
      for (const auto& item : device_swa.parameters()) CHECK(same(eigen_swa, item.value(), i++));
    };
    if (dtype == torch::kFloat) {
      check(float{});
    } else {
      check(Eigen::bfloat16{});
    }
  }
}

TEST_CASE("a 16-bit module is averaged in float and rounded once by copy_to", "[torch][device]") {
  nn::Linear model(4, 1);
  model->to(torch::kBFloat16);
  polyak::libtorch::AveragedModel<polyak::EMA> ema(*model, polyak::EMA{0.999});
  REQUIRE(ema.parameters()["weight"].scalar_type() == torch::kFloat);
  // From 1, then 1000 steps at 2 (exact in bf16): the float EMA is 2 - 0.999^1000 = 1.63230...;
  // averaged in bf16, each step's 0.001 increment is below half an ulp of 1.x and the average
  // would stay at 1.
  fill(*model, 1);
  ema.update_parameters(*model);
  fill(*model, 2);
  for (int k = 0; k < 1000; ++k) ema.update_parameters(*model);
  const double expected = 2 - std::pow(0.999, 1000);
  CHECK(value_of(ema.parameters()["weight"]) == Approx(expected).epsilon(1e-4));
  ema.copy_to(*model);
  CHECK(value_of(model->weight) ==
        static_cast<double>(static_cast<float>(c10::BFloat16(static_cast<float>(expected)))));
  CHECK_THROWS_WITH(ema.swap(*model), Catch::Contains("swapping would round the average"));
}

TEST_CASE("the device average refuses a module that differs, and changes nothing",
          "[torch][device][adversarial]") {
  nn::Sequential model(nn::Linear(3, 2));
  polyak::libtorch::AveragedModel<> swa(*model);
  fill(*model, 5);
  swa.update_parameters(*model);
  const auto before = swa.parameters()["0.weight"].clone();

  nn::Sequential wider(nn::Linear(3, 4));
  CHECK_THROWS_WITH(swa.update_parameters(*wider), Catch::Contains("'0.weight' has shape [4, 3]"));
  nn::Sequential deeper(nn::Linear(3, 2), nn::Linear(2, 2));
  CHECK_THROWS_AS(swa.update_parameters(*deeper), polyak::InvalidArgument);
  model->to(torch::kDouble);
  CHECK_THROWS_WITH(swa.update_parameters(*model),
                    Catch::Contains("'0.weight' is Double where the average has Float"));
  CHECK_THROWS_AS(swa.copy_to(*model), std::invalid_argument);
  CHECK(swa.n_averaged() == 1);
  CHECK(swa.parameters()["0.weight"].equal(before));
}

// What issue 12 fixed in the adapter holds for the device path: counters are left out whatever
// their dtype, and a module whose tensors were replaced (torch::load) or converted (module->to) is
// read afresh at each call, never through a stale pointer: new tensors of the same kind are
// averaged, converted ones refused.
TEST_CASE("the device average: counters left out whatever their dtype, replaced tensors read afresh",
          "[torch][device][adversarial]") {
  nn::Sequential model(nn::Linear(3, 2), nn::BatchNorm1d(2));
  model->to(torch::kDouble);  // num_batches_tracked becomes a double too
  polyak::libtorch::AveragedModel<> swa(*model, polyak::SWA{}, /*use_buffers=*/true);
  CHECK(swa.buffers().size() == 2);  // running_mean, running_var: not num_batches_tracked

  fill(*model, 1);
  swa.update_parameters(*model);
  const std::string path = "polyak_device_reload_" + std::to_string(::getpid()) + ".pt";
  fill(*model, 3);
  torch::save(model, path);
  nn::Sequential reloaded(nn::Linear(3, 2), nn::BatchNorm1d(2));
  reloaded->to(torch::kDouble);
  torch::load(reloaded, path);  // new storages under the same names
  swa.update_parameters(*reloaded);
  CHECK(value_of(swa.parameters()["0.weight"]) == 2.0);  // (1 + 3) / 2
  std::filesystem::remove(path);
}

TEST_CASE("the device average's state: polyak::AveragedModel's keys, refused whole when it does not fit",
          "[torch][device][checkpoint]") {
  nn::Sequential model(nn::Linear(3, 2), nn::BatchNorm1d(2));
  polyak::libtorch::AveragedModel<polyak::EMA> ema(*model, polyak::EMA{0.5}, /*use_buffers=*/true);
  for (const double x : {1.0, 3.0}) {
    fill(*model, x);
    ema.update_parameters(*model);
  }
  const polyak::StateDict sd = ema.state_dict();
  CHECK(sd.scalar<std::int64_t>("n_averaged") == 2);
  CHECK(sd.metadata.at("decay") == "0.5");
  CHECK(polyak::to_doubles(sd.at("module.0.weight"))[0] == 2.0);

  // The same state loads into the Eigen path's AveragedModel over the same module, and back.
  const auto views = polyak::libtorch::tensors<float>(*model);
  polyak::AveragedModel<float, polyak::EMA> eigen(views, polyak::EMA{0.5}, /*use_buffers=*/true);
  eigen.load_state_dict(sd);
  CHECK(eigen.n_averaged() == 2);
  polyak::libtorch::AveragedModel<polyak::EMA> back(*model, polyak::EMA{0.5}, true);
  back.load_state_dict(eigen.state_dict());
  CHECK(back.parameters()["0.weight"].equal(ema.parameters()["0.weight"]));
  CHECK(back.n_averaged() == 2);

  // Hostile states: each refused, nothing changed.
  polyak::libtorch::AveragedModel<polyak::EMA> other_decay(*model, polyak::EMA{0.9}, true);
  const auto untouched = other_decay.parameters()["0.weight"].clone();
  CHECK_THROWS_WITH(other_decay.load_state_dict(sd), Catch::Contains("decay '0.5'"));
  polyak::StateDict missing;
  for (const auto& [name, tensor] : sd) {
    if (name != "module.0.bias") missing.insert(name, tensor);
  }
  missing.metadata = sd.metadata;
  CHECK_THROWS_AS(back.load_state_dict(missing), polyak::FormatError);
  polyak::libtorch::AveragedModel<polyak::EMA> no_buffers(*model, polyak::EMA{0.5}, false);
  CHECK_THROWS_WITH(no_buffers.load_state_dict(sd), Catch::Contains("use_buffers true"));
  CHECK(other_decay.parameters()["0.weight"].equal(untouched));
  CHECK(other_decay.n_averaged() == 0);
}

#if TORCH_VERSION_MAJOR < 2
namespace {

/// Counts the CPU allocator's allocations of tensor memory (the 1.x Allocator interface).
struct CountingAllocator final : c10::Allocator {
  c10::Allocator* inner = nullptr;
  mutable std::size_t count = 0;
  c10::DataPtr allocate(std::size_t n) const override {
    ++count;
    return inner->allocate(n);
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner->raw_deleter(); }
};

}  // namespace

TEST_CASE("a device average step allocates no tensor memory", "[torch][device][allocation]") {
  nn::Sequential model(nn::Linear(8, 4), nn::BatchNorm1d(4));
  model->to(torch::kBFloat16);                               // widening goes through the scratch buffer
  polyak::libtorch::AveragedModel<> swa(*model);             // Divide: the difference in scratch
  polyak::libtorch::AveragedModel<polyak::EMA> ema(*model);  // Lerp from bf16: widened in scratch
  swa.update_parameters(*model);
  ema.update_parameters(*model);
  polyak::libtorch::AveragedModel<polyak::EMA> offloaded(*model, polyak::EMA{}, false,
                                                         polyak::libtorch::Placement::Host);
  offloaded.update_parameters(*model);
  offloaded.wait();
  CountingAllocator counting;
  counting.inner = c10::GetAllocator(c10::DeviceType::CPU);
  c10::SetAllocator(c10::DeviceType::CPU, &counting, /*priority=*/100);
  for (int k = 0; k < 5; ++k) {
    swa.update_parameters(*model);
    ema.update_parameters(*model);
    offloaded.update_parameters(*model);  // staged, folded on a background thread
  }
  offloaded.wait();
  const std::size_t during = counting.count;
  const torch::Tensor probe = torch::empty({16});  // the counter sees allocations at all
  const std::size_t probed = counting.count;
  c10::SetAllocator(c10::DeviceType::CPU, counting.inner, /*priority=*/101);
  CHECK(during == 0);
  CHECK(probed == during + 1);
}
#endif

TEST_CASE("Placement::Host: the average kept in host memory, folded in the background, has the same numbers",
          "[torch][device][offload]") {
  // Every read waits for the last fold, so each one sees every update made before it: equal, bit for
  // bit, to the average kept with the module (same kernels, same torch ops, on the same CPU).
  nn::Sequential model(nn::Linear(5, 3), nn::BatchNorm1d(3));
  model->to(torch::kBFloat16);
  using Scheduled = polyak::ScheduledEMA<polyak::WarmupDecay>;
  const Scheduled rule{polyak::WarmupDecay{0.9}, polyak::EmaCadence{1, 2, true}};
  polyak::libtorch::AveragedModel<Scheduled> here(*model, rule, /*use_buffers=*/true);
  polyak::libtorch::AveragedModel<Scheduled> host(*model, rule, true, polyak::libtorch::Placement::Host);
  polyak::libtorch::AveragedModel<> swa_host(*model, polyak::SWA{}, false, polyak::libtorch::Placement::Host);
  CHECK(host.placement() == polyak::libtorch::Placement::Host);
  CHECK(host.device().is_cpu());
  double mean = 0;
  for (int n = 0; n < 9; ++n) {
    const double x = static_cast<double>(static_cast<float>(c10::BFloat16(static_cast<float>(std::cos(n)))));
    fill(*model, x);
    mean += (x - mean) / (n + 1);
    here.update_parameters(*model);
    host.update_parameters(*model);
    swa_host.update_parameters(*model);
    CHECK(host.n_averaged() == n + 1);
    for (const auto& item : here.parameters()) CHECK(host.parameters()[item.key()].equal(item.value()));
    for (const auto& item : here.buffers()) CHECK(host.buffers()[item.key()].equal(item.value()));
  }
  CHECK(value_of(swa_host.parameters()["0.weight"]) == Approx(mean).epsilon(1e-6));
  // The state waits for the fold too, and loads into an average kept with the module.
  polyak::libtorch::AveragedModel<Scheduled> back(*model, rule, true);
  back.load_state_dict(host.state_dict());
  for (const auto& item : here.parameters()) CHECK(back.parameters()[item.key()].equal(item.value()));
  // A refused module changes nothing, also with a fold pending.
  host.update_parameters(*model);
  nn::Sequential other(nn::Linear(5, 4), nn::BatchNorm1d(4));
  other->to(torch::kBFloat16);
  CHECK_THROWS_WITH(host.update_parameters(*other), Catch::Contains("'0.weight' has shape [4, 5]"));
  CHECK(host.n_averaged() == 10);
}

TEST_CASE("libtorch::PostHocEMA writes the snapshots polyak::PostHocEMA writes, byte for byte",
          "[torch][device][post_hoc]") {
  const std::string folder = "polyak_torch_post_hoc_" + std::to_string(::getpid());
  nn::Sequential model(nn::Linear(6, 4), nn::BatchNorm1d(4));
  polyak::libtorch::PostHocEMA device(*model, folder + "/device", 5);
  const auto views = polyak::libtorch::tensors<float>(*model);
  polyak::PostHocEMA<float> eigen(views, folder + "/eigen", 5);
  for (int t = 1; t <= 20; ++t) {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.uniform_(-1, 1);
    device.update_parameters(*model);
    eigen.update_parameters(views);
  }
  const auto read = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  for (std::size_t profile = 0; profile < 2; ++profile) {
    for (const std::int64_t step : {5, 10, 15, 20}) {
      const std::string a = device.snapshot_path(profile, step), b = eigen.snapshot_path(profile, step);
      CAPTURE(a);
      REQUIRE(std::filesystem::exists(a));
      CHECK(read(a) == read(b));
    }
  }
  // The post-hoc tools read them: a reconstruction loads into a device average of that width.
  const auto snapshots = polyak::find_power_ema_snapshots(folder + "/device");
  CHECK(snapshots.size() == 8);
  const polyak::StateDict rebuilt =
      polyak::reconstruct_power_ema(snapshots, polyak::sigma_rel_to_gamma(0.08));
  polyak::libtorch::AveragedModel<polyak::PowerEMA> target(*model, polyak::PowerEMA::from_sigma_rel(0.08));
  target.load_state_dict(rebuilt);
  CHECK(target.n_averaged() == 20);
  std::filesystem::remove_all(folder);
}

TEST_CASE("on CUDA: the device average matches the CPU one, and its state loads on the CPU",
          "[torch][device][cuda]") {
  on_cuda("the CUDA device-average test", [](torch::Device cuda) {
    nn::Sequential cpu_model(nn::Linear(16, 8), nn::BatchNorm1d(8));
    nn::Sequential gpu_model(nn::Linear(16, 8), nn::BatchNorm1d(8));
    gpu_model->to(cuda);
    polyak::libtorch::AveragedModel<polyak::EMA> on_cpu(*cpu_model, polyak::EMA{0.9});
    polyak::libtorch::AveragedModel<polyak::EMA> on_gpu(*gpu_model, polyak::EMA{0.9});
    REQUIRE(on_gpu.device().is_cuda());
    for (int k = 0; k < 10; ++k) {
      fill(*cpu_model, k * 0.37);
      fill(*gpu_model, k * 0.37);
      on_cpu.update_parameters(*cpu_model);
      on_gpu.update_parameters(*gpu_model);
    }
    for (const auto& item : on_cpu.parameters()) {
      CHECK(torch::allclose(item.value(), on_gpu.parameters()[item.key()].cpu(), 1e-6, 1e-6));
    }
    polyak::libtorch::AveragedModel<polyak::EMA> loaded(*cpu_model, polyak::EMA{0.9});
    loaded.load_state_dict(on_gpu.state_dict());
    for (const auto& item : loaded.parameters()) {
      CHECK(item.value().equal(on_gpu.parameters()[item.key()].cpu()));  // same bytes
    }
    // And back onto the GPU: the same bytes again.
    polyak::libtorch::AveragedModel<polyak::EMA> again(*gpu_model, polyak::EMA{0.9});
    again.load_state_dict(loaded.state_dict());
    for (const auto& item : again.parameters()) {
      CHECK(item.value().cpu().equal(loaded.parameters()[item.key()]));
    }
  });
}

TEST_CASE("on CUDA: a bf16 module averaged in float on the GPU, and offloaded to pinned host memory",
          "[torch][device][cuda][offload]") {
  on_cuda("the CUDA mixed-precision and offload test", [](torch::Device cuda) {
    nn::Sequential model(nn::Linear(64, 32), nn::BatchNorm1d(32));
    model->to(cuda, torch::kBFloat16);
    polyak::libtorch::AveragedModel<polyak::EMA> on_gpu(*model, polyak::EMA{0.99});
    polyak::libtorch::AveragedModel<polyak::EMA> offloaded(*model, polyak::EMA{0.99}, false,
                                                           polyak::libtorch::Placement::Host);
    REQUIRE(on_gpu.device().is_cuda());
    REQUIRE(on_gpu.parameters()["0.weight"].scalar_type() == torch::kFloat);
    REQUIRE(offloaded.device().is_cpu());
    for (int k = 0; k < 50; ++k) {
      fill(*model, 1 + (k % 7) * 0.125);  // exact in bf16
      on_gpu.update_parameters(*model);
      offloaded.update_parameters(*model);
    }
    for (const auto& item : on_gpu.parameters()) {
      CHECK(torch::allclose(item.value().cpu(), offloaded.parameters()[item.key()], 1e-6, 1e-6));
    }
    on_gpu.copy_to(*model);
    CHECK(model->parameters()[0].scalar_type() == torch::kBFloat16);
  });
}

TEST_CASE("on CUDA: SWALR and update_bn work on a module on the GPU", "[torch][cuda]") {
  on_cuda("the CUDA SWALR and update_bn test", [](torch::Device cuda) {
    nn::Sequential model(nn::Linear(4, 3), nn::BatchNorm1d(3));
    model->to(cuda);
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
    polyak::SWALR scheduler(optimizer, /*swa_lr=*/0.05, /*anneal_epochs=*/1);
    scheduler.step();
    CHECK(optimizer.param_groups()[0].options().get_lr() == Approx(0.05));
    const torch::Tensor batch =
        torch::arange(0, 8, torch::TensorOptions().device(cuda)).view({2, 4}).to(torch::kFloat);
    polyak::libtorch::update_bn(
        std::vector<torch::Tensor>{batch}, [&](const torch::Tensor& x) { model->forward(x); }, *model);
    const auto expected = model[0]->as<nn::Linear>()->forward(batch).mean(0);
    auto* bn = model[1]->as<nn::BatchNorm1d>();
    CHECK(torch::allclose(bn->running_mean, expected, 1e-5, 1e-5));
    CHECK(bn->running_mean.is_cuda());
  });
}
