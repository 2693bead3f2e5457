// SPDX-License-Identifier: MIT
#include "polyak/core/thread_pool.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "polyak/core/averaged_model.hpp"
#include "support.hpp"

TEST_CASE("ThreadPool runs each part once, part 0 on the calling thread", "[thread_pool]") {
  for (const int threads : {1, 2, 3, 5}) {
    polyak::ThreadPool pool(threads);
    REQUIRE(pool.size() == threads);
    for (int job = 0; job < 20; ++job) {  // the same workers serve job after job
      std::vector<int> runs(static_cast<std::size_t>(threads), 0);
      std::thread::id part0;
      pool.run([&](int part) {
        ++runs[static_cast<std::size_t>(part)];
        if (part == 0) part0 = std::this_thread::get_id();
      });
      CHECK(runs == std::vector<int>(static_cast<std::size_t>(threads), 1));
      CHECK(part0 == std::this_thread::get_id());
    }
  }
}

TEST_CASE("ThreadPool refuses fewer than one thread", "[thread_pool]") {
  CHECK_THROWS_AS(polyak::ThreadPool(0), polyak::InvalidArgument);
  CHECK_THROWS_WITH(polyak::ThreadPool(0), Catch::Contains("threads 0 < 1"));
  CHECK_THROWS_WITH(polyak::ThreadPool(-3), Catch::Contains("threads -3 < 1"));
}

TEST_CASE("a pool the system starts fewer workers for throws, its started workers joined", "[thread_pool]") {
  // Two threads for the user: the process's own and one worker of the three asked for. Before, the
  // started worker, still joinable when the constructor threw, ended the process (std::terminate).
  const polyak_test::Limited result = polyak_test::with_thread_limit(2, [] {
    try {
      polyak::ThreadPool pool(4);
      return false;  // (a limit that did not bind)
    } catch (const polyak::RuntimeError& e) {
      return std::string(e.what()).find("of 3 worker threads") != std::string::npos;
    }
  });
  if (result == polyak_test::Limited::not_limited) {
    WARN("skipped: no limit on threads could be imposed here (root that cannot become nobody)");
    return;
  }
  CHECK(result == polyak_test::Limited::passed);
}

TEST_CASE("a part's exception is rethrown by run, after every part has finished, and the pool goes on",
          "[thread_pool]") {
  polyak::ThreadPool pool(3);
  for (const int failing : {0, 1, 2}) {
    std::atomic<int> finished{0};
    const auto job = [&](int part) {
      if (part == failing) throw std::runtime_error("part " + std::to_string(part) + " failed");
      ++finished;
    };
    CHECK_THROWS_WITH(pool.run(job), "part " + std::to_string(failing) + " failed");
    CHECK(finished == 2);  // run returned only after the other parts were done
  }
  std::atomic<int> ran{0};
  pool.run([&](int) { ++ran; });  // still usable after a failure
  CHECK(ran == 3);
}

TEST_CASE("an AveragedModel on a pool gives the bits it gives on one thread", "[thread_pool]") {
  Eigen::VectorXf a(1000), b(37);
  polyak::ParameterList<float> model;
  model.add("a", a).add("b", b);
  polyak::AveragedModel<float, polyak::EMA> alone(model, polyak::EMA{0.9});
  polyak::AveragedModel<float, polyak::EMA> pooled(model, polyak::EMA{0.9});
  polyak::ThreadPool pool(3);
  pooled.set_thread_pool(&pool);
  for (int t = 0; t < 5; ++t) {
    a.setRandom();
    b.setRandom();
    alone.update_parameters(model);
    pooled.update_parameters(model);
  }
  for (std::size_t i = 0; i < 2; ++i) {
    CHECK((alone.tensors()[i].flat() == pooled.tensors()[i].flat()).all());
  }
}
