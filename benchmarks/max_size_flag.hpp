// SPDX-License-Identifier: MIT
// The benchmarks' one flag of their own: --polyak_max_size=N limits the model sizes (CI's smoke runs
// pass 1e5). Taken out of argv before Google Benchmark reads the rest.
#pragma once

#include <string>
#include <vector>

/// Removes --polyak_max_size=N from argv (argc updated) and returns N, `absent` when not given.
inline double take_max_size_flag(int& argc, char** argv, double absent = 1e8) {
  double max_size = absent;
  std::vector<char*> kept;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--polyak_max_size=", 0) == 0) {
      max_size = std::stod(arg.substr(18));
    } else {
      kept.push_back(argv[i]);
    }
  }
  argc = static_cast<int>(kept.size());
  for (int i = 0; i < argc; ++i) argv[i] = kept[static_cast<std::size_t>(i)];
  return max_size;
}
