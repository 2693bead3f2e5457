// SPDX-License-Identifier: MIT
// The per-step path allocates nothing: update_parameters, copy_to, swap and average_parameters, with
// and without threads, for every averaging function; and a post-hoc EMA snapshot streams its profile
// to disk without copying it. This binary replaces the global operator new to count calls, so it stands
// apart from the other tests (its main is polyak_test_main's, compiled once for every test binary).
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <random>
#include <vector>

#include "polyak/checkpoint.hpp"
#include "polyak/core/averaged_model.hpp"
#include "polyak/core/ema_schedules.hpp"
#include "polyak/core/model_averaging.hpp"
#include "polyak/checkpoint/post_hoc_ema.hpp"
#include "polyak/core/swag.hpp"

namespace {
std::atomic<long> allocations{0};
std::atomic<std::size_t> allocated_bytes{0};
}  // namespace

void* operator new(std::size_t size) {
  ++allocations;
  allocated_bytes += size;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

/// Allocations made while running `body`.
template <class Body>
long allocations_in(Body&& body) {
  const long before = allocations.load();
  body();
  return allocations.load() - before;
}

struct Model {
  Eigen::MatrixXf weight = Eigen::MatrixXf::Random(700, 900);
  Eigen::VectorXf bias = Eigen::VectorXf::Random(700);
  Eigen::VectorXf running_mean = Eigen::VectorXf::Random(700);
  polyak::ParameterList<float> list() {
    polyak::ParameterList<float> out;
    out.add("weight", weight).add("bias", bias).add_buffer("running_mean", running_mean);
    return out;
  }
};

template <class Averaged>
void check_steps_do_not_allocate(Averaged& averaged, const polyak::ParameterList<float>& list) {
  averaged.update_parameters(list);  // the first update copies
  CHECK(allocations_in([&] {
          for (int step = 0; step < 5; ++step) averaged.update_parameters(list);
        }) == 0);
  CHECK(allocations_in([&] { averaged.copy_to(list); }) == 0);
  CHECK(allocations_in([&] { averaged.swap(list); }) == 0);
}

}  // namespace

TEST_CASE("the counter sees allocations", "[allocation]") {
  CHECK(allocations_in([] { std::vector<float> v(10); }) == 1);
}

TEST_CASE("update_parameters, copy_to and swap allocate nothing", "[allocation]") {
  Model model;
  const auto list = model.list();
  polyak::ThreadPool pool(2);
  SECTION("SWA") {
    polyak::AveragedModel<float> averaged(list);
    check_steps_do_not_allocate(averaged, list);
  }
  SECTION("EMA with buffers, on two threads") {
    polyak::AveragedModel<float, polyak::EMA> averaged(list, polyak::EMA{0.99}, true);
    averaged.set_thread_pool(&pool);
    check_steps_do_not_allocate(averaged, list);
  }
  SECTION("multi-tensor EMA") {
    polyak::AveragedModel averaged(list, polyak::get_ema_multi_avg_fn(0.9));
    check_steps_do_not_allocate(averaged, list);
  }
  SECTION("scheduled EMA, compounded over update_every") {
    polyak::AveragedModel averaged(list, polyak::ScheduledEMA{polyak::InverseGammaDecay{}, {2, 3}});
    check_steps_do_not_allocate(averaged, list);
  }
  SECTION("power EMA") {
    polyak::AveragedModel averaged(list, polyak::PowerEMA::from_sigma_rel(0.1));
    check_steps_do_not_allocate(averaged, list);
  }
}

TEST_CASE("a post-hoc EMA snapshot streams its profiles to disk without copying them", "[allocation]") {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RowMatrix weight = RowMatrix::Random(700, 900);
  Eigen::VectorXf bias = Eigen::VectorXf::Random(700);
  polyak::ParameterList<float> list;
  list.add("weight", weight).add("bias", bias);
  const std::string folder = "polyak_no_allocation_snapshots";
  polyak::PostHocEMA<float> post_hoc(list, folder, 1000);
  post_hoc.update_parameters(list);
  CHECK(allocations_in([&] { post_hoc.update_parameters(list); }) == 0);  // not a snapshot step
  const std::size_t before = allocated_bytes.load();
  post_hoc.save_snapshots();
  const std::size_t bytes = allocated_bytes.load() - before;
  // Two profiles of 2.5 MB each: what a snapshot allocates is the header and file names.
  CHECK(bytes < 64 * 1024);
  std::filesystem::remove_all(folder);
}

// Issue 13: state_dict() borrows the average instead of copying it, and save_safetensors streams it,
// column-major matrices included (reordered through one 64 KiB buffer).
TEST_CASE("state_dict() copies no tensor and its save streams the average", "[allocation]") {
  Model model;  // 700 x 900 column-major weight: 2.5 MB, and two vectors
  const auto list = model.list();
  polyak::AveragedModel<float, polyak::EMA> ema(list, polyak::EMA{0.9}, true);
  ema.update_parameters(list);
  std::size_t before = allocated_bytes.load();
  const polyak::StateDict sd = ema.state_dict();
  CHECK(allocated_bytes.load() - before < 8 * 1024);  // names, shapes, metadata
  const std::string path = "polyak_no_allocation_state.safetensors";
  before = allocated_bytes.load();
  polyak::save_safetensors(path, sd);
  CHECK(allocated_bytes.load() - before < 128 * 1024);  // the header, the 64 KiB buffer, file names
  CHECK(polyak::load_safetensors(path).at("module.weight").bytes.size() == 700u * 900u * 4u);
  std::remove(path.c_str());
}

TEST_CASE("SWAG collects and samples without allocating", "[allocation]") {
  Model model;
  const auto list = model.list();
  polyak::SWAG<float> swag(list, 4);
  swag.update_parameters(list);
  swag.update_parameters(list);
  CHECK(allocations_in([&] {
          for (int step = 0; step < 5; ++step) swag.update_parameters(list);
        }) == 0);
  std::mt19937_64 rng(1);
  CHECK(allocations_in([&] { swag.sample(list, rng); }) == 0);
}

TEST_CASE("average_parameters reuses its buffer", "[allocation]") {
  Model model;
  const auto list = model.list();
  auto members = polyak::ThreadCommunicator::create(1);
  polyak::PeriodicModelAverager averager(1, 0, members[0]);
  averager.average_parameters(list);  // the first call sizes the buffer
  CHECK(allocations_in([&] {
          for (int step = 0; step < 5; ++step) averager.average_parameters(list);
        }) == 0);
}
