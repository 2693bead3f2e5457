// SPDX-License-Identifier: MIT
// The C++ side of the Python interop tests:
//   interop_tool write PATH   writes the tensors that check_cpp_file.py expects
//   interop_tool check PATH   checks the file write_python_file.py wrote
// Both sides compute the values from the same formulas: value i of tensor t is (i - 3) / 4 + t.
#include <polyak/checkpoint/safetensors.hpp>

#include <cstdio>
#include <string>
#include <vector>

namespace {

double expected(std::size_t i, int t) { return (static_cast<double>(i) - 3.0) / 4.0 + t; }

template <class T>
void insert(polyak::StateDict& sd, const std::string& name, std::vector<std::int64_t> shape, int t,
            polyak::StorageOrder order = polyak::StorageOrder::RowMajor) {
  std::size_t n = 1;
  for (const auto e : shape) n *= static_cast<std::size_t>(e);
  std::vector<T> values(n);
  // Fill in memory order so that the row-major value at logical index i is expected(i, t).
  polyak::detail::for_each_row_major(shape, order, [&](std::size_t i, std::size_t at) {
    values[at] = static_cast<T>(static_cast<float>(expected(i, t)));
    if constexpr (std::is_same_v<T, double>) values[at] = expected(i, t);
  });
  sd.insert(name, polyak::TensorView<T>(values.data(), shape, order));
}

template <class T>
bool check(const polyak::StateDict& sd, const std::string& name, polyak::DType dtype, int t) {
  const auto& stored = sd.at(name);
  if (stored.dtype != dtype) return std::fprintf(stderr, "%s: wrong dtype\n", name.c_str()), false;
  std::vector<T> values(stored.numel());
  std::memcpy(values.data(), stored.bytes.data(), stored.bytes.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    const double want = std::is_same_v<T, double>
                            ? expected(i, t)
                            : static_cast<double>(static_cast<T>(static_cast<float>(expected(i, t))));
    if (static_cast<double>(values[i]) != want) {
      std::fprintf(stderr, "%s[%zu] = %g, expected %g\n", name.c_str(), i, static_cast<double>(values[i]),
                   want);
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return std::fprintf(stderr, "usage: interop_tool write|check PATH\n"), 2;
  const std::string mode = argv[1], path = argv[2];
  if (mode == "write") {
    polyak::StateDict sd;
    insert<float>(sd, "f32", {3, 4}, 0);
    insert<float>(sd, "f32_colmajor", {2, 3, 4}, 1, polyak::StorageOrder::ColMajor);
    insert<double>(sd, "f64", {5}, 2);
    insert<Eigen::half>(sd, "f16", {2, 2}, 3);
    insert<Eigen::bfloat16>(sd, "bf16", {6}, 4);
    sd.insert_scalar<std::int64_t>("n_averaged", 7);
    sd.metadata["written_by"] = "polyak";
    polyak::save_safetensors(path, sd);
    return 0;
  }
  const polyak::StateDict sd = polyak::load_safetensors(path);
  const bool ok = check<float>(sd, "f32", polyak::DType::F32, 0) &&
                  check<double>(sd, "f64", polyak::DType::F64, 2) &&
                  check<Eigen::half>(sd, "f16", polyak::DType::F16, 3) &&
                  check<Eigen::bfloat16>(sd, "bf16", polyak::DType::BF16, 4) &&
                  sd.scalar<std::int64_t>("n_averaged") == 7 && sd.metadata.at("written_by") == "numpy" &&
                  sd.at("f32").shape == std::vector<std::int64_t>{3, 4};
  std::printf("interop: C++ read the Python-written file: %s\n", ok ? "all values equal" : "MISMATCH");
  return ok ? 0 : 1;
}
