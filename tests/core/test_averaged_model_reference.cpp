// SPDX-License-Identifier: MIT
// AveragedModel against golden values from PyTorch's torch.optim.swa_utils.AveragedModel, written by
// tests/reference/averaged_model.py (see its docstring for the cases and the file's format).
#include <catch2/catch.hpp>

#include <cmath>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "polyak/core/averaged_model.hpp"
#include "reference_file.hpp"

namespace {

struct ReferenceTensor {
  std::string name;
  bool is_buffer = false;
  std::vector<std::int64_t> shape;
};

struct ReferenceStep {
  std::map<std::string, std::vector<double>> model, averaged;
};

struct ReferenceCase {
  std::string function, dtype;
  bool use_buffers = false;
  double decay = 0;
  std::vector<ReferenceTensor> tensors;
  std::vector<ReferenceStep> steps;
};

std::vector<ReferenceCase> read_reference() {
  std::vector<ReferenceCase> cases;
  for (const auto& record : polyak_test::read_records("averaged_model.txt")) {
    if (record.kind == "case") {
      ReferenceCase c;
      c.function = record.words.at(0);
      c.dtype = record.words.at(1);
      c.use_buffers = record.words.at(2) == "1";
      c.decay = record.words.at(3) == "-" ? 0.0 : record.number(3);
      cases.push_back(c);
    } else if (record.kind == "tensor") {
      ReferenceTensor t;
      t.name = record.words.at(0);
      t.is_buffer = record.words.at(1) == "buffer";
      for (std::size_t i = 3; i < record.words.size(); ++i) t.shape.push_back(record.integer(i));
      cases.back().tensors.push_back(t);
    } else if (record.kind == "step") {
      cases.back().steps.emplace_back();
    } else if (record.kind == "model" || record.kind == "averaged") {
      auto& step = cases.back().steps.back();
      (record.kind == "model" ? step.model : step.averaged)[record.words.at(0)] = record.numbers(1);
    }
  }
  return cases;
}

/// Runs one reference case through polyak and returns the largest relative error over all steps and
/// tensors, in the max norm: max |ours - PyTorch's| / max |PyTorch's| for each tensor. (Element by
/// element, values near zero would turn rounding into large ratios: PyTorch 1.13's lerp computes
/// fma(weight, end - self, self), rounding once where polyak rounds twice.)
template <class T, class AvgFn>
double run_case(const ReferenceCase& c, AvgFn avg_fn) {
  // The model's storage: row-major, as PyTorch's. The first tensor goes through a row-major Eigen
  // matrix, the rest through raw-pointer views, as a libtorch user would make them.
  std::vector<std::vector<T>> storage;
  for (const auto& t : c.tensors) storage.emplace_back(c.steps[0].model.at(t.name).size());
  Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> first(
      storage[0].data(), c.tensors[0].shape[0], c.tensors[0].shape[1]);
  polyak::ParameterList<T> list;
  list.add(c.tensors[0].name, first);
  for (std::size_t i = 1; i < c.tensors.size(); ++i) {
    const polyak::TensorView<T> view(storage[i].data(), c.tensors[i].shape);
    if (c.tensors[i].is_buffer) {
      list.add_buffer(c.tensors[i].name, view);
    } else {
      list.add(c.tensors[i].name, view);
    }
  }

  polyak::AveragedModel<T, AvgFn> averaged(list, avg_fn, c.use_buffers);
  double worst = 0;
  for (const auto& step : c.steps) {
    for (std::size_t i = 0; i < c.tensors.size(); ++i) {
      const auto& values = step.model.at(c.tensors[i].name);
      for (std::size_t j = 0; j < values.size(); ++j) storage[i][j] = static_cast<T>(values[j]);
    }
    averaged.update_parameters(list);
    for (std::size_t i = 0; i < c.tensors.size(); ++i) {
      const auto& expected = step.averaged.at(c.tensors[i].name);
      const T* ours = averaged.tensors()[i].data();
      double difference = 0, scale = 0;
      for (std::size_t j = 0; j < expected.size(); ++j) {
        difference = std::max(difference, std::abs(static_cast<double>(ours[j]) - expected[j]));
        scale = std::max(scale, std::abs(expected[j]));
      }
      worst = std::max(worst, difference / scale);
    }
  }
  CHECK(averaged.n_averaged() == static_cast<std::int64_t>(c.steps.size()));
  return worst;
}

template <class T>
double run_case(const ReferenceCase& c) {
  if (c.function == "swa") return run_case<T>(c, polyak::SWA{});
  return run_case<T>(c, polyak::EMA{c.decay});
}

}  // namespace

TEST_CASE("AveragedModel agrees with PyTorch's AveragedModel", "[reference][averaged_model]") {
  const auto cases = read_reference();
  REQUIRE(cases.size() == 12);
  double worst_float = 0, worst_double = 0;
  for (const auto& c : cases) {
    INFO("case " << c.function << " decay " << c.decay << " " << c.dtype << " use_buffers " << c.use_buffers);
    REQUIRE(c.steps.size() >= 20);
    REQUIRE(c.tensors.size() >= 4);
    if (c.dtype == "float32") {
      const double worst = run_case<float>(c);
      CHECK(worst <= 1e-6);
      worst_float = std::max(worst_float, worst);
    } else {
      const double worst = run_case<double>(c);
      CHECK(worst <= 1e-12);
      worst_double = std::max(worst_double, worst);
    }
  }
  std::cout << "reference AveragedModel: largest relative error float32 " << worst_float << ", float64 "
            << worst_double << " (over " << cases.size() << " cases)\n";
}
