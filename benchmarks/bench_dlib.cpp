// SPDX-License-Identifier: MIT
// The dlib adapter's per-step cost (polyak/dlib.hpp) next to one plain copy of the same net's
// parameters, in one run. The net: fc<1024> over inputs sized so that the net holds about N
// parameters, then bn_fc and fc<10>, set up by one forward pass.
//
//   dlib/copy/<N>         std::copy of every parameter tensor into a buffer as large: the bound
//   dlib/ema/<N>          AveragedModel<float, EMA>::update_parameters on parameters(net)
//   dlib/ema_synced/<N>   the same through TrainerParameters::synced() of an idle dnn_trainer: what
//                         waiting for the trainer's thread adds when it has finished
//   dlib/views/<N>        parameters(net): making the views (once, not each step)
// bytes_per_second counts the bytes each must move: 8 a scalar for the copy, 12 for the EMA (read
// the net, read and write the average).
//
//   usage: bench_dlib [--polyak_max_size=1e7] [Google Benchmark flags]
//   paired:  bench_dlib --benchmark_repetitions=9 --benchmark_enable_random_interleaving=true
//            --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <polyak/core/averaged_model.hpp>
#include <polyak/dlib.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "max_size_flag.hpp"

namespace {

using Sample = dlib::matrix<float, 0, 1>;
using Net = dlib::loss_multiclass_log<dlib::fc<10, dlib::bn_fc<dlib::fc<1024, dlib::input<Sample>>>>>;

/// A net of about `size` parameters, set up by a trainer's first step (the trainer kept for synced()).
struct Setup {
  Net net;
  std::unique_ptr<dlib::dnn_trainer<Net>> trainer;
  std::size_t parameters = 0;

  explicit Setup(double size) {
    const long inputs = std::max(1L, static_cast<long>(size / 1024.0) - 1);
    std::vector<Sample> xs(2, Sample(inputs));
    for (auto& x : xs) x = 0.5f;
    trainer = std::make_unique<dlib::dnn_trainer<Net>>(net, dlib::sgd());
    trainer->train_one_step(xs, std::vector<unsigned long>{0, 1});
    trainer->get_net(dlib::force_flush_to_disk::no);
    dlib::visit_layer_parameters(net, [&](dlib::tensor& t) { parameters += t.size(); });
  }
};

Setup& setup_for(double size) {
  static std::unique_ptr<Setup> cached;
  static double cached_size = 0;
  if (!cached || cached_size != size) {
    cached.reset();
    cached = std::make_unique<Setup>(size);
    cached_size = size;
  }
  return *cached;
}

void count_bytes(benchmark::State& state, std::size_t scalars, double bytes_per_scalar) {
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) *
                                                    static_cast<double>(scalars) * bytes_per_scalar));
  state.counters["parameters"] = static_cast<double>(scalars);
}

void copy_bound(benchmark::State& state, double size) {
  Setup& s = setup_for(size);
  std::vector<float> buffer(s.parameters);
  for (auto _ : state) {
    float* out = buffer.data();
    dlib::visit_layer_parameters(s.net, [&](dlib::tensor& t) { out = std::copy(t.begin(), t.end(), out); });
    benchmark::DoNotOptimize(buffer.data());
    benchmark::ClobberMemory();
  }
  count_bytes(state, s.parameters, 8.0);
}

void ema(benchmark::State& state, double size) {
  Setup& s = setup_for(size);
  const auto params = polyak::dlib_dnn::parameters(s.net);
  polyak::AveragedModel<float, polyak::EMA> averaged(params, polyak::EMA{0.999});
  for (auto _ : state) averaged.update_parameters(params);
  count_bytes(state, s.parameters, 12.0);
}

void ema_synced(benchmark::State& state, double size) {
  Setup& s = setup_for(size);
  polyak::dlib_dnn::TrainerParameters params(*s.trainer);
  polyak::AveragedModel<float, polyak::EMA> averaged(params.synced(), polyak::EMA{0.999});
  for (auto _ : state) averaged.update_parameters(params.synced());
  count_bytes(state, s.parameters, 12.0);
}

void views(benchmark::State& state, double size) {
  Setup& s = setup_for(size);
  for (auto _ : state) benchmark::DoNotOptimize(polyak::dlib_dnn::parameters(s.net));
  state.counters["parameters"] = static_cast<double>(s.parameters);
}

}  // namespace

int main(int argc, char** argv) {
  const double max_size = take_max_size_flag(argc, argv, 1e7);
  for (const double size : {1e5, 1e6, 1e7}) {
    if (size > max_size) continue;
    char name[16];
    std::snprintf(name, sizeof name, "1e%d", static_cast<int>(std::round(std::log10(size))));
    benchmark::RegisterBenchmark((std::string("dlib/copy/") + name).c_str(), copy_bound, size);
    benchmark::RegisterBenchmark((std::string("dlib/ema/") + name).c_str(), ema, size);
    benchmark::RegisterBenchmark((std::string("dlib/ema_synced/") + name).c_str(), ema_synced, size);
    benchmark::RegisterBenchmark((std::string("dlib/views/") + name).c_str(), views, size);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
