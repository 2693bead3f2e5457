// SPDX-License-Identifier: MIT
// The per-step cost of averaging, next to the machine's limit measured in the same run.
//
//   limit/fused_loop  the same EMA update as a plain fused loop over one contiguous array
//   limit/triad       STREAM's triad a = b + s * c (12 bytes a scalar, no write-allocate counted)
//   update/...        AveragedModel::update_parameters on models laid out as real ones
//   copy_to/..., swap/...
// Names: <what>/<function>/<scalar>/<layout>/<scalars>/threads:<n>. bytes_per_second counts the
// bytes the update must move: EMA and SWA 12 a float scalar (read current, read and write the
// average), 10 a bfloat16 one; copy_to 8; swap 16.
#include <benchmark/benchmark.h>

#include <polyak/core/averaged_model.hpp>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "layouts.hpp"
#include "max_size_flag.hpp"

namespace {

polyak::ThreadPool& pool() {
  static polyak::ThreadPool instance(2);
  return instance;
}

std::string size_name(double size) {
  char text[16];
  std::snprintf(text, sizeof text, "1e%d", static_cast<int>(std::round(std::log10(size))));
  return text;
}

template <class T>
const char* scalar_name() {
  return std::is_same_v<T, float> ? "float" : "bf16";
}

template <class T>
constexpr double update_bytes() {
  return std::is_same_v<T, float> ? 12.0 : 10.0;
}

/// The last model built, reused by the benchmarks that follow it (building a 1e8 model touches
/// 100k fresh pages, which costs a second here).
template <class T>
BenchModel<T>& model_for(const std::string& layout, double size) {
  static std::unique_ptr<BenchModel<T>> cached;
  static std::pair<std::string, double> key;
  if (!cached || key != std::make_pair(layout, size)) {
    cached.reset();
    cached = std::make_unique<BenchModel<T>>(layout, size);
    key = {layout, size};
  }
  return *cached;
}

template <class T, class Fn>
polyak::AveragedModel<T, Fn>& averaged_for(const std::string& layout, double size) {
  static std::unique_ptr<polyak::AveragedModel<T, Fn>> cached;
  static std::pair<std::string, double> key;
  BenchModel<T>& model = model_for<T>(layout, size);
  if (!cached || key != std::make_pair(layout, size)) {
    cached.reset();
    cached = std::make_unique<polyak::AveragedModel<T, Fn>>(model.list, Fn{});
    cached->update_parameters(model.list);  // past the first copy
    key = {layout, size};
  }
  return *cached;
}

template <class T, class Fn>
void update(benchmark::State& state, const std::string& layout, double size, int threads) {
  BenchModel<T>& model = model_for<T>(layout, size);
  auto& averaged = averaged_for<T, Fn>(layout, size);
  averaged.set_thread_pool(threads > 1 ? &pool() : nullptr);
  for (auto _ : state) {
    averaged.update_parameters(model.list);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) *
                                                    static_cast<double>(model.numel) * update_bytes<T>()));
  state.counters["tensors"] = static_cast<double>(model.list.size());
}

/// The timing loop of the limit kernels: kernel(begin, end) over n scalars, cut into one slice a
/// thread of the pool, or whole on this thread.
template <class Kernel>
void run_sliced(benchmark::State& state, int threads, std::size_t n, Kernel kernel) {
  auto part = [&](int p) {
    const auto parts = static_cast<std::size_t>(threads);
    kernel(n * static_cast<std::size_t>(p) / parts, n * (static_cast<std::size_t>(p) + 1) / parts);
  };
  for (auto _ : state) {
    if (threads > 1) {
      pool().run(part);
    } else {
      part(0);
    }
    benchmark::ClobberMemory();
  }
}

/// bfloat16 to float as a vectorizable shift (Eigen's conversion is not vectorized).
float to_float(float x) { return x; }
float to_float(Eigen::bfloat16 x) {
  std::uint16_t low;
  std::memcpy(&low, &x, sizeof low);
  const std::uint32_t bits = static_cast<std::uint32_t>(low) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

/// The limit: the same EMA update, one plain loop over one contiguous array of the same size.
template <class T>
void fused_loop(benchmark::State& state, double size, int threads) {
  const auto n = static_cast<std::size_t>(size);
  std::vector<float> averaged(n, 0.5f);
  std::vector<T> current(n, T(0.25f));
  const float weight = 1.0f - 0.999f;
  run_sliced(state, threads, n, [&](std::size_t begin, std::size_t end) {
    float* a = averaged.data();
    const T* c = current.data();
    for (std::size_t i = begin; i < end; ++i) a[i] += weight * (to_float(c[i]) - a[i]);
  });
  state.SetBytesProcessed(
      static_cast<std::int64_t>(static_cast<double>(state.iterations()) * size * update_bytes<T>()));
}

/// STREAM's triad, for the bandwidth the machine reaches with a simple kernel.
void triad(benchmark::State& state, double size, int threads) {
  const auto n = static_cast<std::size_t>(size);
  std::vector<float> a(n, 0.0f), b(n, 1.0f), c(n, 2.0f);
  run_sliced(state, threads, n, [&](std::size_t begin, std::size_t end) {
    for (std::size_t i = begin; i < end; ++i) a[i] = b[i] + 3.0f * c[i];
  });
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * size * 12.0));
}

/// Runs `op(averaged, model)` (copy_to or swap) on a float EMA model; `bytes` a scalar.
template <class Op>
void whole_model(benchmark::State& state, const std::string& layout, double size, double bytes, Op op) {
  BenchModel<float>& model = model_for<float>(layout, size);
  auto& averaged = averaged_for<float, polyak::EMA>(layout, size);
  for (auto _ : state) {
    op(averaged, model.list);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * size * bytes));
}

void copy_to(benchmark::State& state, const std::string& layout, double size) {
  whole_model(state, layout, size, 8.0, [](auto& averaged, const auto& list) { averaged.copy_to(list); });
}

void swap(benchmark::State& state, const std::string& layout, double size) {
  whole_model(state, layout, size, 16.0, [](auto& averaged, const auto& list) { averaged.swap(list); });
}

}  // namespace

int main(int argc, char** argv) {
  // --polyak_max_size=1e5 limits the sizes (CI's smoke run).
  const double max_size = take_max_size_flag(argc, argv);
  benchmark::Initialize(&argc, argv);

  const std::vector<double> sizes{1e5, 1e6, 1e7, 1e8};
  const std::vector<std::string> layouts{"resnet50", "transformer", "large4"};
  auto name = [](const std::string& what, const std::string& fn, const char* scalar,
                 const std::string& layout, double size, int threads) {
    return what + "/" + fn + "/" + scalar + "/" + layout + "/" + size_name(size) +
           "/threads:" + std::to_string(threads);
  };
  for (const double size : sizes) {
    if (size > max_size) continue;
    for (const int threads : {1, 2}) {
      benchmark::RegisterBenchmark(name("limit/fused_loop", "EMA", "float", "one", size, threads).c_str(),
                                   fused_loop<float>, size, threads)
          ->UseRealTime();
      benchmark::RegisterBenchmark(name("limit/fused_loop", "EMA", "bf16", "one", size, threads).c_str(),
                                   fused_loop<Eigen::bfloat16>, size, threads)
          ->UseRealTime();
    }
    if (size >= 1e8 || size == max_size) {
      for (const int threads : {1, 2}) {
        benchmark::RegisterBenchmark(name("limit/triad", "-", "float", "one", size, threads).c_str(), triad,
                                     size, threads)
            ->UseRealTime();
      }
    }
    for (const auto& layout : layouts) {
      for (const int threads : {1, 2}) {
        benchmark::RegisterBenchmark(name("update", "EMA", "float", layout, size, threads).c_str(),
                                     update<float, polyak::EMA>, layout, size, threads)
            ->UseRealTime();
        benchmark::RegisterBenchmark(name("update", "SWA", "float", layout, size, threads).c_str(),
                                     update<float, polyak::SWA>, layout, size, threads)
            ->UseRealTime();
      }
      benchmark::RegisterBenchmark(name("copy_to", "-", "float", layout, size, 1).c_str(), copy_to, layout,
                                   size)
          ->UseRealTime();
      benchmark::RegisterBenchmark(name("swap", "-", "float", layout, size, 1).c_str(), swap, layout, size)
          ->UseRealTime();
    }
    for (const auto& layout : layouts) {
      for (const int threads : {1, 2}) {
        benchmark::RegisterBenchmark(name("update", "EMA", "bf16", layout, size, threads).c_str(),
                                     update<Eigen::bfloat16, polyak::EMA>, layout, size, threads)
            ->UseRealTime();
        benchmark::RegisterBenchmark(name("update", "SWA", "bf16", layout, size, threads).c_str(),
                                     update<Eigen::bfloat16, polyak::SWA>, layout, size, threads)
            ->UseRealTime();
      }
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
