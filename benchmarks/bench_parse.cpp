// SPDX-License-Identifier: MIT
// Opening checkpoints of many tensors: the time to read and check a safetensors header, and a Hugging
// Face index with its shard's header, against the time to read the same bytes (the I/O bound) in the
// same iteration. Linear in the tensor count since issue 21 (a 100k-tensor header took 117 s).
//
//   parse/header/<tensors>   read_safetensors_header of one file of <tensors> one-float tensors named as
//                            Llama's layers are; bytes_ratio: reading the header's bytes alone over it
//   parse/index/<tensors>    CheckpointReader of a folder whose model.safetensors.index.json names the
//                            same tensors in that file; bytes_ratio: reading both texts alone over it
//
//   usage: bench_parse [--polyak_max_size=TENSORS, default 1e5] [Google Benchmark flags]
#include <benchmark/benchmark.h>

#include <polyak/checkpoint/sharded_checkpoint.hpp>

#include <algorithm>  // std::sort: the median ratio
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>  // getpid

#include "max_size_flag.hpp"

namespace {

/// A folder holding model.safetensors with `tensors` one-float tensors, and the index naming them.
std::string make_checkpoint(std::size_t tensors) {
  const std::string folder =
      (std::filesystem::temp_directory_path() /
       ("polyak_bench_parse_" + std::to_string(::getpid()) + "_" + std::to_string(tensors)))
          .string();
  if (std::filesystem::exists(folder + "/model.safetensors.index.json")) return folder;
  std::filesystem::create_directories(folder);
  std::vector<polyak::detail::TensorWriter> writers;
  std::string index =
      "{\"metadata\": {\"total_size\": " + std::to_string(4 * tensors) + "}, \"weight_map\": {";
  for (std::size_t i = 0; i < tensors; ++i) {
    const std::string name =
        "model.layers." + std::to_string(i / 9) + ".mlp.w" + std::to_string(i % 9) + ".weight";
    writers.push_back({name, polyak::DType::F32, {1}, 4, [](int fd, const std::string& path) {
                         const float one = 1.0f;
                         polyak::detail::write_all(fd, &one, sizeof one, path);
                       }});
    index += (i == 0 ? "\"" : ", \"") + name + "\": \"model.safetensors\"";
  }
  index += "}}\n";
  polyak::detail::write_safetensors(folder + "/model.safetensors", {{"format", "pt"}}, writers);
  polyak::detail::write_atomically(folder + "/model.safetensors.index.json",
                                   [&](int fd, const std::string& path) {
                                     polyak::detail::write_all(fd, index.data(), index.size(), path);
                                   });
  return folder;
}

/// Seconds to read `bytes` bytes of `path` from its start (the header's text, warm in the page cache).
double read_seconds(const std::string& path, std::size_t bytes) {
  std::vector<char> buffer(bytes);
  const auto start = std::chrono::steady_clock::now();
  std::FILE* file = std::fopen(path.c_str(), "rb");
  const std::size_t got = file != nullptr ? std::fread(buffer.data(), 1, bytes, file) : 0;
  if (file != nullptr) std::fclose(file);
  benchmark::DoNotOptimize(buffer.data());
  benchmark::DoNotOptimize(got);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void header(benchmark::State& state) {
  const std::string folder = make_checkpoint(static_cast<std::size_t>(state.range(0)));
  const std::string file = folder + "/model.safetensors";
  const std::size_t header_bytes = static_cast<std::size_t>(polyak::read_safetensors_header(file).data_start);
  std::vector<double> ratios;
  for (auto _ : state) {
    const double bare = read_seconds(file, header_bytes);
    const auto start = std::chrono::steady_clock::now();
    const polyak::SafetensorsHeader index = polyak::read_safetensors_header(file);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    benchmark::DoNotOptimize(index.entries.data());
    state.SetIterationTime(seconds);
    ratios.push_back(bare / seconds);
  }
  std::sort(ratios.begin(), ratios.end());
  state.counters["bytes_ratio"] = ratios[ratios.size() / 2];
  state.counters["header_MB"] = static_cast<double>(header_bytes) / 1e6;
}

void index(benchmark::State& state) {
  const std::string folder = make_checkpoint(static_cast<std::size_t>(state.range(0)));
  const std::string index_file = folder + "/model.safetensors.index.json";
  const std::size_t index_bytes = std::filesystem::file_size(index_file);
  const std::size_t header_bytes =
      static_cast<std::size_t>(polyak::read_safetensors_header(folder + "/model.safetensors").data_start);
  std::vector<double> ratios;
  for (auto _ : state) {
    const double bare =
        read_seconds(index_file, index_bytes) + read_seconds(folder + "/model.safetensors", header_bytes);
    const auto start = std::chrono::steady_clock::now();
    const polyak::CheckpointReader reader(folder);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    benchmark::DoNotOptimize(reader.tensors().data());
    state.SetIterationTime(seconds);
    ratios.push_back(bare / seconds);
  }
  std::sort(ratios.begin(), ratios.end());
  state.counters["bytes_ratio"] = ratios[ratios.size() / 2];
  state.counters["index_MB"] = static_cast<double>(index_bytes) / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  const double max_tensors = take_max_size_flag(argc, argv, 1e5);
  for (const double tensors : {1e3, 1e4, 1e5, 1e6}) {
    if (tensors > max_tensors) break;
    const std::string size = std::to_string(static_cast<long>(tensors));
    benchmark::RegisterBenchmark(("parse/header/" + size).c_str(), header)
        ->Arg(static_cast<long>(tensors))
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("parse/index/" + size).c_str(), index)
        ->Arg(static_cast<long>(tensors))
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  for (const double tensors : {1e3, 1e4, 1e5, 1e6}) {
    std::filesystem::remove_all(std::filesystem::temp_directory_path() /
                                ("polyak_bench_parse_" + std::to_string(::getpid()) + "_" +
                                 std::to_string(static_cast<long>(tensors))));
  }
  return 0;
}
