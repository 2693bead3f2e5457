// SPDX-License-Identifier: MIT
// Model averaging over ThreadCommunicator: four threads stand for four ranks.
#include "polyak/model_averaging.hpp"

#include <catch2/catch.hpp>

#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

using polyak::HierarchicalModelAverager;
using polyak::ParameterList;
using polyak::PeriodicModelAverager;
using polyak::ThreadCommunicator;

namespace {

/// Runs body(member) on `size` threads; returns each thread's exception message ("" if none).
/// (Catch2's assertions are not thread-safe: bodies record, the test checks after the join.)
std::vector<std::string> on_threads(int size, const std::function<void(ThreadCommunicator&)>& body) {
  auto members = ThreadCommunicator::create(size);
  std::vector<std::string> errors(static_cast<std::size_t>(size));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(members[static_cast<std::size_t>(r)]);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

/// A rank's model: a matrix and a vector.
struct Model {
  Eigen::MatrixXf weight = Eigen::MatrixXf::Zero(3, 2);
  Eigen::VectorXf bias = Eigen::VectorXf::Zero(4);
  ParameterList<float> list() {
    ParameterList<float> out;
    out.add("weight", weight).add("bias", bias);
    return out;
  }
};

}  // namespace

TEST_CASE("ThreadCommunicator sums in place and gives every member the same result", "[communicator]") {
  std::vector<std::vector<double>> results(4);
  const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
    std::vector<double> data(1001);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = comm.rank() * 10.0 + static_cast<double>(i);
    comm.allreduce_sum(data.data(), data.size());
    results[static_cast<std::size_t>(comm.rank())] = data;
  });
  CHECK(errors == std::vector<std::string>(4));
  for (std::size_t i = 0; i < 1001; ++i) CHECK(results[0][i] == 60.0 + 4.0 * static_cast<double>(i));
  for (int r = 1; r < 4; ++r) CHECK(results[static_cast<std::size_t>(r)] == results[0]);
}

TEST_CASE("ThreadCommunicator refuses members that pass different lengths, on every member",
          "[communicator]") {
  const auto errors = on_threads(3, [](ThreadCommunicator& comm) {
    std::vector<float> data(comm.rank() == 1 ? 5 : 4, 1.0f);
    comm.allreduce_sum(data.data(), data.size());
  });
  for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("elements"));
}

TEST_CASE("split groups members by color and ranks them by key", "[communicator]") {
  std::vector<std::pair<int, int>> seen(4);  // per parent rank: (new rank, new size)
  std::vector<float> sums(4);
  on_threads(4, [&](ThreadCommunicator& comm) {
    ThreadCommunicator part = comm.split(comm.rank() % 2, -comm.rank());  // evens and odds, reversed
    seen[static_cast<std::size_t>(comm.rank())] = {part.rank(), part.size()};
    float value = static_cast<float>(comm.rank());
    part.allreduce_sum(&value, 1);
    sums[static_cast<std::size_t>(comm.rank())] = value;
  });
  CHECK(seen == std::vector<std::pair<int, int>>{{1, 2}, {1, 2}, {0, 2}, {0, 2}});
  CHECK(sums == std::vector<float>{2, 4, 2, 4});  // 0 + 2 and 1 + 3
}

TEST_CASE("average_parameters replaces every tensor by its mean over the group", "[model_averaging]") {
  std::vector<Model> models(4);
  const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
    Model& m = models[static_cast<std::size_t>(comm.rank())];
    for (Eigen::Index i = 0; i < m.weight.size(); ++i)
      m.weight.data()[i] = static_cast<float>(comm.rank() * i);
    m.bias.setConstant(static_cast<float>(comm.rank() + 1));
    for (int repeat = 0; repeat < 2; ++repeat) polyak::average_parameters(m.list(), comm);  // idempotent
  });
  CHECK(errors == std::vector<std::string>(4));
  for (const auto& m : models) {
    for (Eigen::Index i = 0; i < m.weight.size(); ++i)
      CHECK(m.weight.data()[i] == 1.5f * static_cast<float>(i));
    CHECK((m.bias.array() == 2.5f).all());
  }
}

TEST_CASE("16-bit and mixed-type lists are averaged in float or double and rounded once",
          "[model_averaging]") {
  std::vector<Eigen::Matrix<Eigen::half, Eigen::Dynamic, 1>> halves(4, Eigen::Matrix<Eigen::half, -1, 1>(3));
  std::vector<Eigen::VectorXd> doubles(4, Eigen::VectorXd(2));
  std::vector<Eigen::VectorXf> floats(4, Eigen::VectorXf(2));
  on_threads(4, [&](ThreadCommunicator& comm) {
    const auto r = static_cast<std::size_t>(comm.rank());
    halves[r].setConstant(Eigen::half(static_cast<float>(r) + 0.25f));
    doubles[r].setConstant(1.0 / 3.0 + static_cast<double>(r));
    floats[r].setConstant(static_cast<float>(r));
    ParameterList<Eigen::half> h;
    h.add("h", halves[r]);
    polyak::average_parameters(h, comm);
    ParameterList<double> d;
    d.add("d", doubles[r]);
    ParameterList<float> f;
    f.add("f", floats[r]);
    PeriodicModelAverager averager(1, 0, comm);
    averager.average_parameters(d, f);  // one allreduce in double for both
  });
  for (std::size_t r = 0; r < 4; ++r) {
    CHECK(static_cast<float>(halves[r][0]) == 1.75f);
    CHECK(doubles[r][0] == Approx(1.0 / 3.0 + 1.5).epsilon(1e-15));
    CHECK(floats[r][0] == 1.5f);
  }
}

TEST_CASE("members whose parameter lists differ all get an error, and nothing changes", "[model_averaging]") {
  std::vector<Model> models(4);
  std::vector<Eigen::VectorXf> extra(4, Eigen::VectorXf::Zero(2));
  SECTION("a tensor more on one rank") {
    const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
      const auto r = static_cast<std::size_t>(comm.rank());
      models[r].bias.setConstant(static_cast<float>(r));
      auto list = models[r].list();
      if (r == 2) list.add("extra", extra[r]);
      polyak::average_parameters(list, comm);
    });
    for (const auto& e : errors)
      CHECK_THAT(e, Catch::Contains("list of rank 2 differs") && Catch::Contains("nothing was averaged"));
    CHECK_THAT(errors[2], Catch::Contains("rank 2 has 3 tensors, rank 0 2: the first extra one is 'extra'"));
  }
  SECTION("a tensor of another size on one rank") {
    const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
      const auto r = static_cast<std::size_t>(comm.rank());
      models[r].bias.setConstant(static_cast<float>(r));
      if (r == 3) models[r].weight.resize(2, 3);  // same count of scalars, same count of tensors
      if (r == 1) models[r].weight.resize(2, 2);
      PeriodicModelAverager averager(2, 0, comm);
      averager.average_parameters(models[r].list());
    });
    for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("differ"));
  }
  for (std::size_t r = 0; r < 4; ++r) CHECK((models[r].bias.array() == static_cast<float>(r)).all());
}

TEST_CASE("PeriodicModelAverager averages at PyTorch's steps", "[model_averaging]") {
  // period 3, warm-up 2: steps 2, 5, 8 average (step >= 2 and (step - 2) % 3 == 0).
  std::vector<std::vector<bool>> averaged(4);
  std::vector<Model> models(4);
  std::vector<std::int64_t> steps(4);
  on_threads(4, [&](ThreadCommunicator& comm) {
    const auto r = static_cast<std::size_t>(comm.rank());
    PeriodicModelAverager averager(3, 2, comm);
    for (int step = 0; step < 10; ++step) {
      models[r].bias.array() += static_cast<float>(r + 1);  // local "training": rank r moves by r + 1
      averaged[r].push_back(averager.average_parameters(models[r].list()));
    }
    steps[r] = averager.step();
  });
  CHECK(steps == std::vector<std::int64_t>(4, 10));
  const std::vector<bool> expected{false, false, true, false, false, true, false, false, true, false};
  for (const auto& a : averaged) CHECK(a == expected);
  // After step 8 all ranks hold the mean of 9 moves each, (1 + 2 + 3 + 4) / 4 * 9 = 22.5; step 9 adds r + 1.
  for (std::size_t r = 0; r < 4; ++r)
    CHECK((models[r].bias.array() == 22.5f + static_cast<float>(r + 1)).all());
}

TEST_CASE("HierarchicalModelAverager picks the largest dividing period; subgroups touch only themselves",
          "[model_averaging]") {
  // {2: pairs, 4: all four}, warm-up 1. Step 0 is warm-up; 2 and 6 average pairs; 4 and 8 the world.
  std::vector<std::vector<std::int64_t>> used(4);
  std::vector<std::vector<float>> values(4);
  on_threads(4, [&](ThreadCommunicator& comm) {
    const auto r = static_cast<std::size_t>(comm.rank());
    HierarchicalModelAverager averager({{2, 2}, {4, 4}}, 1, comm);
    Eigen::VectorXf w = Eigen::VectorXf::Zero(1);
    ParameterList<float> list;
    list.add("w", w);
    for (int step = 0; step < 9; ++step) {
      w[0] += static_cast<float>(1 << r);  // rank r moves by 2^r
      used[r].push_back(averager.average_parameters(list));
      values[r].push_back(w[0]);
    }
  });
  const std::vector<std::int64_t> expected{0, 0, 2, 0, 4, 0, 2, 0, 4};
  for (const auto& u : used) CHECK(u == expected);
  // Step 2: three moves each; pair {0, 1} holds (3 + 6) / 2 = 4.5, pair {2, 3} (12 + 24) / 2 = 18.
  CHECK(values[0][2] == 4.5f);
  CHECK(values[1][2] == 4.5f);
  CHECK(values[2][2] == 18.0f);
  CHECK(values[3][2] == 18.0f);
  // Step 4: the world; five moves of the mean 15 / 4 = 3.75 each: 18.75.
  for (std::size_t r = 0; r < 4; ++r) CHECK(values[r][4] == 18.75f);
}

TEST_CASE("the averagers refuse settings PyTorch refuses, and ones that make no hierarchy",
          "[model_averaging]") {
  auto members = ThreadCommunicator::create(4);  // refused before any collective call: one thread will do
  ThreadCommunicator& comm = members[0];
  CHECK_THROWS_WITH(PeriodicModelAverager(0, 0, comm), Catch::Contains("period must be >= 1"));
  CHECK_THROWS_WITH(PeriodicModelAverager(2, -1, comm), Catch::Contains("warmup_steps"));
  using H = HierarchicalModelAverager<ThreadCommunicator>;
  CHECK_THROWS_WITH(H({}, 0, comm), Catch::Contains("empty"));
  CHECK_THROWS_WITH(H({{0, 2}, {4, 4}}, 0, comm), Catch::Contains("period 0"));
  CHECK_THROWS_WITH(H({{4, 2}, {2, 4}}, 0, comm), Catch::Contains("periods must increase"));
  CHECK_THROWS_WITH(H({{2, 4}, {4, 4}}, 0, comm), Catch::Contains("group sizes must increase"));
  CHECK_THROWS_WITH(H({{2, 3}, {4, 4}}, 0, comm), Catch::Contains("group size 3 does not divide"));
  CHECK_THROWS_WITH(H({{2, 1}, {4, 2}}, 0, comm), Catch::Contains("must be the whole group's size, 4"));
  CHECK_THROWS_WITH(H({{2, 2}, {4, 4}}, -3, comm), Catch::Contains("warmup_steps"));
  CHECK_THROWS_WITH(ThreadCommunicator::create(0), Catch::Contains("size 0"));
}

// Issue 12, item 4: the cross-member check compared only element counts and scalar types, so lists in
// another order, or a matrix stored column-major on one member and row-major on another, were
// averaged element by element: wrong values, no error.
TEST_CASE("members whose lists differ in names or order or storage order all get an error naming it",
          "[model_averaging]") {
  std::vector<Eigen::VectorXf> w(4, Eigen::VectorXf::Zero(3)), b(4, Eigen::VectorXf::Zero(3));
  std::vector<Eigen::Matrix<float, 2, 3>> col(4);
  std::vector<Eigen::Matrix<float, 2, 3, Eigen::RowMajor>> row(4);
  auto run = [&](const std::function<ParameterList<float>(std::size_t)>& list_of) {
    for (std::size_t r = 0; r < 4; ++r) {
      w[r].setConstant(static_cast<float>(r));
      b[r].setConstant(static_cast<float>(10 * r));
      col[r].setConstant(static_cast<float>(r));
      row[r].setConstant(static_cast<float>(r));
    }
    const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
      polyak::average_parameters(list_of(static_cast<std::size_t>(comm.rank())), comm);
    });
    for (std::size_t r = 0; r < 4; ++r) {  // nothing moved
      CHECK((w[r].array() == static_cast<float>(r)).all());
      CHECK((b[r].array() == static_cast<float>(10 * r)).all());
      CHECK((col[r].array() == static_cast<float>(r)).all());
    }
    return errors;
  };
  SECTION("another order on one member") {
    const auto errors = run([&](std::size_t r) {
      ParameterList<float> list;
      if (r == 1) {
        list.add("b", b[r]).add("w", w[r]);
      } else {
        list.add("w", w[r]).add("b", b[r]);
      }
      return list;
    });
    for (const auto& e : errors)
      CHECK_THAT(e, Catch::Contains("rank 1") && Catch::Contains("nothing was averaged"));
    CHECK_THAT(errors[1], Catch::Contains("tensor 0 'w' is named 'b' where rank 0 has 'w'"));
  }
  SECTION("another storage order on one member") {
    const auto errors = run([&](std::size_t r) {
      ParameterList<float> list;
      if (r == 2) {
        list.add("m", row[r]);
      } else {
        list.add("m", col[r]);
      }
      return list;
    });
    for (const auto& e : errors)
      CHECK_THAT(e, Catch::Contains("rank 2") && Catch::Contains("nothing was averaged"));
    CHECK_THAT(errors[2], Catch::Contains("'m' has another storage order"));
  }
  SECTION("another name on two members") {
    const auto errors = run([&](std::size_t r) {
      ParameterList<float> list;
      list.add(r >= 2 ? "weight" : "w", w[r]);
      return list;
    });
    for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("ranks 2, 3"));
    CHECK_THAT(errors[3], Catch::Contains("is named 'weight' where rank 0 has 'w'"));
  }
  SECTION("a stale view on one member") {
    std::vector<Eigen::VectorXf> grown(4, Eigen::VectorXf::Zero(3));
    const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
      const auto r = static_cast<std::size_t>(comm.rank());
      ParameterList<float> list;
      list.add("g", grown[r]);
      if (r == 3) grown[r].resize(100);  // the view now points at freed memory
      polyak::average_parameters(list, comm);
    });
    for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("nothing was averaged"));
    CHECK_THAT(errors[3], Catch::Contains("tensor 'g' was resized, moved or replaced"));
  }
}
