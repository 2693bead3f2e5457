// SPDX-License-Identifier: MIT
// What the paired benchmarks across processes share (bench_mpi, bench_c10d): the median of the
// per-pair ratios they report, and the reporter the processes other than the first run with, so
// that one table is printed.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <vector>

/// The median of `values` (the mean of the two middle ones for an even count).
inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

/// Reports nothing: every process runs every case (collectives must pair up), one prints.
class SilentReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};
