// SPDX-License-Identifier: MIT
// The device average (polyak/torch/averaged_model.hpp) against torch's own ways of doing the same
// EMA step on the same tensors, and the device's copy bandwidth, in one run: on the CPU always, on
// CUDA where a GPU is present.
//
//   torch/copy_/...            dst.copy_(src) of one tensor as large as the model: the bound
//   torch/polyak/...           libtorch::AveragedModel<EMA>::update_parameters on the module
//   torch/polyak_host/cuda/... the same with Placement::Host (average in pinned host memory)
//   torch/lerp_/...            one lerp_ a tensor (what PyTorch's EMA avg_fn does)
//   torch/foreach_mul_add/...  torch::_foreach_mul_ + torch::_foreach_add_ (a fused multi-tensor EMA)
//   torch/foreach_lerp/...     torch::_foreach_lerp_ (libtorch 2.x only)
// Names: torch/<what>/<device>/<model dtype>/<layout>/<scalars>. bytes_per_second counts the bytes
// the step must move: 12 a float scalar (read the model, read and write the average), 10 a bf16 one
// averaged in float, 8 for the copy. On CUDA each iteration ends with torch::cuda::synchronize().
//
//   usage: bench_torch [--polyak_max_size=1e8] [Google Benchmark flags]
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <polyak/torch/averaged_model.hpp>

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "layouts.hpp"
#include "max_size_flag.hpp"

namespace {

constexpr double decay = 0.999;

/// A module laid out as `layout` scaled to `size` scalars, every parameter filled.
struct LayoutModule : torch::nn::Module {
  LayoutModule(const std::string& layout, double size, torch::Device device, torch::Dtype dtype) {
    const auto sizes = scaled_layout(layout, size);
    for (std::size_t k = 0; k < sizes.size(); ++k) {
      register_parameter("t" + std::to_string(k),
                         torch::full({static_cast<std::int64_t>(sizes[k])}, 0.25,
                                     torch::TensorOptions().device(device).dtype(dtype)));
    }
  }
};

void finish_iteration(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

void count_bytes(benchmark::State& state, double scalars, double bytes_per_scalar) {
  state.SetBytesProcessed(
      static_cast<std::int64_t>(static_cast<double>(state.iterations()) * scalars * bytes_per_scalar));
}

/// The last module built, reused by the cases that follow (a 1e8 module is 400 MB).
LayoutModule& module_for(const std::string& layout, double size, torch::Device device, torch::Dtype dtype) {
  static std::unique_ptr<LayoutModule> cached;
  static std::string key;
  const std::string wanted =
      layout + "/" + std::to_string(size) + "/" + device.str() + "/" + std::string(c10::toString(dtype));
  if (!cached || key != wanted) {
    cached.reset();
    cached = std::make_unique<LayoutModule>(layout, size, device, dtype);
    key = wanted;
  }
  return *cached;
}

void copy_bound(benchmark::State& state, double size, torch::Device device) {
  torch::NoGradGuard no_grad;
  const auto options = torch::TensorOptions().device(device);
  torch::Tensor src = torch::full({static_cast<std::int64_t>(size)}, 0.25, options);
  torch::Tensor dst = torch::empty_like(src);
  for (auto _ : state) {
    dst.copy_(src);
    finish_iteration(device);
  }
  count_bytes(state, size, 8.0);
}

void polyak_update(benchmark::State& state, const std::string& layout, double size, torch::Device device,
                   torch::Dtype dtype, polyak::libtorch::Placement placement) {
  LayoutModule& module = module_for(layout, size, device, dtype);
  polyak::libtorch::AveragedModel<polyak::EMA> ema(module, polyak::EMA{decay}, false, placement);
  ema.update_parameters(module);  // past the first copy
  for (auto _ : state) {
    ema.update_parameters(module);
    if (placement == polyak::libtorch::Placement::Host) ema.wait();
    finish_iteration(device);
  }
  double scalars = 0;
  for (const auto& p : module.parameters()) scalars += static_cast<double>(p.numel());
  count_bytes(state, scalars, dtype == torch::kFloat ? 12.0 : 10.0);
}

/// An average of `module`'s parameters as a framework's EMA keeps it: one tensor each, float.
std::vector<torch::Tensor> averages_of(LayoutModule& module) {
  std::vector<torch::Tensor> out;
  for (const auto& p : module.parameters()) out.push_back(p.detach().clone().fill_(0.5));
  return out;
}

template <class Step>
void torch_update(benchmark::State& state, const std::string& layout, double size, torch::Device device,
                  Step step) {
  torch::NoGradGuard no_grad;
  LayoutModule& module = module_for(layout, size, device, torch::kFloat);
  std::vector<torch::Tensor> averages = averages_of(module);
  std::vector<torch::Tensor> current;
  for (const auto& p : module.parameters()) current.push_back(p.detach());
  for (auto _ : state) {
    step(averages, current);
    finish_iteration(device);
  }
  double scalars = 0;
  for (const auto& t : current) scalars += static_cast<double>(t.numel());
  count_bytes(state, scalars, 12.0);
}

std::string size_name(double size) {
  char text[16];
  std::snprintf(text, sizeof text, "1e%d", static_cast<int>(std::round(std::log10(size))));
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  const double max_size = take_max_size_flag(argc, argv);
  benchmark::Initialize(&argc, argv);

  std::vector<torch::Device> devices{torch::Device(torch::kCPU)};
  if (torch::cuda::is_available()) devices.emplace_back(torch::kCUDA);
  std::printf("bench_torch: libtorch %s, %d CPU threads, CUDA %s\n", TORCH_VERSION, torch::get_num_threads(),
              torch::cuda::is_available() ? "available" : "not available");
  const std::string layout = "resnet50";
  for (const double size : {1e5, 1e6, 1e7, 1e8}) {
    if (size > max_size || (size < 1e6 && max_size >= 1e6)) continue;
    for (const torch::Device& device : devices) {
      const std::string tail = device.str() + "/float/" + layout + "/" + size_name(size);
      const std::string tail16 = device.str() + "/bf16/" + layout + "/" + size_name(size);
      benchmark::RegisterBenchmark(("torch/copy_/" + device.str() + "/float/one/" + size_name(size)).c_str(),
                                   copy_bound, size, device)
          ->UseRealTime();
      benchmark::RegisterBenchmark(("torch/polyak/" + tail).c_str(), polyak_update, layout, size, device,
                                   torch::kFloat, polyak::libtorch::Placement::WithModule)
          ->UseRealTime();
      benchmark::RegisterBenchmark(("torch/polyak/" + tail16).c_str(), polyak_update, layout, size, device,
                                   torch::kBFloat16, polyak::libtorch::Placement::WithModule)
          ->UseRealTime();
      if (device.is_cuda()) {
        benchmark::RegisterBenchmark(("torch/polyak_host/" + tail).c_str(), polyak_update, layout, size,
                                     device, torch::kFloat, polyak::libtorch::Placement::Host)
            ->UseRealTime();
      }
      benchmark::RegisterBenchmark(("torch/lerp_/" + tail).c_str(), [=](benchmark::State& state) {
        torch_update(state, layout, size, device, [](auto& averages, const auto& current) {
          for (std::size_t i = 0; i < averages.size(); ++i) averages[i].lerp_(current[i], 1 - decay);
        });
      })->UseRealTime();
      benchmark::RegisterBenchmark(("torch/foreach_mul_add/" + tail).c_str(), [=](benchmark::State& state) {
        torch_update(state, layout, size, device, [](auto& averages, const auto& current) {
          torch::_foreach_mul_(averages, decay);
          torch::_foreach_add_(averages, current, 1 - decay);
        });
      })->UseRealTime();
#if TORCH_VERSION_MAJOR >= 2
      benchmark::RegisterBenchmark(("torch/foreach_lerp/" + tail).c_str(), [=](benchmark::State& state) {
        torch_update(state, layout, size, device, [](auto& averages, const auto& current) {
          torch::_foreach_lerp_(averages, current, 1 - decay);
        });
      })->UseRealTime();
#endif
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
