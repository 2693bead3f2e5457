// SPDX-License-Identifier: MIT
// Model averaging over ThreadCommunicator: four threads stand for four ranks.
#include "polyak/core/model_averaging.hpp"

#include "average_parameters_members.hpp"
#include "reference_file.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <pmmintrin.h>  // _MM_SET_DENORMALS_ZERO_MODE
#include <xmmintrin.h>  // _MM_SET_FLUSH_ZERO_MODE
#endif

using polyak::HierarchicalModelAverager;
using polyak::ParameterList;
using polyak::PeriodicModelAverager;
using polyak::ThreadCommunicator;

namespace {

using polyak_test::on_threads;

using polyak_test::RankModel;

}  // namespace

TEST_CASE("average_parameters replaces every tensor by its mean over the group", "[model_averaging]") {
  std::vector<RankModel> models(4);
  const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
    RankModel& m = models[static_cast<std::size_t>(comm.rank())];
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
  std::vector<RankModel> models(4);
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

TEST_CASE("a tensor in two lists of one call, or lists of other types on one member, are refused by all",
          "[model_averaging][adversarial]") {
  // Two lists that share a tensor would average it twice (beyond one chunk, silently); a member
  // whose extra list is empty but of another type would send its values in another wire type.
  const std::size_t n = (std::size_t{1} << 18) + 1000;  // (more than one chunk)
  SECTION("one list passed twice") {
    std::vector<std::vector<float>> w(3, std::vector<float>(n));
    const auto errors = on_threads(3, [&](ThreadCommunicator& comm) {
      const auto r = static_cast<std::size_t>(comm.rank());
      std::fill(w[r].begin(), w[r].end(), static_cast<float>(r));
      ParameterList<float> list;
      list.add("w", polyak::TensorView<float>(w[r].data(), {static_cast<std::int64_t>(n)}));
      PeriodicModelAverager<ThreadCommunicator> averager(1, 0, comm);
      averager.average_parameters(list, list);
    });
    for (const auto& e : errors) {
      CHECK_THAT(e, Catch::Contains("nothing was averaged"));
      CHECK_THAT(e, Catch::Contains("tensor 'w' of list 2 shares memory with tensor 'w' of list 1"));
    }
    for (std::size_t r = 0; r < 3; ++r)
      CHECK(std::count(w[r].begin(), w[r].end(), static_cast<float>(r)) == n);
  }
  SECTION("an empty list of doubles on one member only") {
    std::vector<std::vector<float>> w(2, std::vector<float>(n));
    const auto errors = on_threads(2, [&](ThreadCommunicator& comm) {
      const auto r = static_cast<std::size_t>(comm.rank());
      std::fill(w[r].begin(), w[r].end(), 2.0f);
      ParameterList<float> list;
      list.add("w", polyak::TensorView<float>(w[r].data(), {static_cast<std::int64_t>(n)}));
      PeriodicModelAverager<ThreadCommunicator> averager(1, 0, comm);
      if (r == 0) {
        averager.average_parameters(list, ParameterList<double>());
      } else {
        averager.average_parameters(list);
      }
    });
    for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("the list of rank 1 differs from rank 0's"));
    CHECK_THAT(errors[1], Catch::Contains("rank 1 passed lists of F32 where rank 0 passed lists of "
                                          "F32, F64"));
    for (std::size_t r = 0; r < 2; ++r) CHECK(std::count(w[r].begin(), w[r].end(), 2.0f) == n);
  }
}

TEST_CASE("a zero's sign survives the average: -0 stays -0, alone and summed", "[model_averaging]") {
  // PyTorch (and MPI) leave a group of one alone and sum -0 + -0 to -0; a sum from +0 would not.
  for (const int members : {1, 2, 3}) {
    std::vector<std::vector<float>> w(static_cast<std::size_t>(members),
                                      std::vector<float>{-0.0f, 0.0f, -1.0f});
    const auto errors = on_threads(members, [&](ThreadCommunicator& comm) {
      ParameterList<float> list;
      list.add("w", polyak::TensorView<float>(w[static_cast<std::size_t>(comm.rank())].data(), {3}));
      polyak::average_parameters(list, comm);
    });
    REQUIRE(errors == std::vector<std::string>(static_cast<std::size_t>(members)));
    for (const auto& values : w) {
      CAPTURE(members);
      CHECK(std::signbit(values[0]));
      CHECK(values[0] == 0.0f);
      CHECK_FALSE(std::signbit(values[1]));
      CHECK(values[2] == -1.0f);
    }
  }
}

TEST_CASE("PeriodicModelAverager averages at PyTorch's steps", "[model_averaging]") {
  // period 3, warm-up 2: steps 2, 5, 8 average (step >= 2 and (step - 2) % 3 == 0).
  std::vector<std::vector<bool>> averaged(4);
  std::vector<RankModel> models(4);
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

TEST_CASE("HierarchicalModelAverager picks the largest dividing period, subgroups touch only themselves",
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

namespace {

/// Counts a communicator's allreduce calls.
struct CountingCommunicator {
  ThreadCommunicator inner;
  int* calls;
  int rank() const { return inner.rank(); }
  int size() const { return inner.size(); }
  template <class T>
  void allreduce_sum(T* data, std::size_t n) {
    ++*calls;
    inner.allreduce_sum(data, n);
  }
  CountingCommunicator split(int color, int key) const { return {inner.split(color, key), calls}; }
};

}  // namespace

TEST_CASE(
    "tensors in one allocation and tensors apart reduce to the same bits, in the bare collective's calls",
    "[model_averaging]") {
  // Chunks are 2^18 floats: these sizes put a chunk boundary inside a tensor (at 262144) and one
  // between two (at 524288), and chunks that hold several tensors.
  const std::vector<std::size_t> sizes = {300000, 5, 224283, 70000, 1};
  std::size_t total = 0;
  for (const std::size_t n : sizes) total += n;
  const std::size_t chunk = polyak::detail::default_average_chunk_bytes / sizeof(float);
  std::vector<std::vector<float>> results(4);
  std::vector<int> calls(4, 0);
  const auto errors = on_threads(4, [&](ThreadCommunicator& member) {
    const int r = member.rank();
    // Ranks 0 and 2 hold the tensors in one allocation, ranks 1 and 3 apart: the calls must pair
    // all the same.
    std::vector<float> arena(total);
    std::vector<std::vector<float>> apart;
    ParameterList<float> list;
    std::size_t at = 0;
    for (std::size_t k = 0; k < sizes.size(); ++k) {
      float* data = nullptr;
      if (r % 2 == 0) {
        data = arena.data() + at;
      } else {
        apart.emplace_back(sizes[k]);
        data = apart.back().data();
      }
      for (std::size_t i = 0; i < sizes[k]; ++i) data[i] = static_cast<float>((r + 1) * ((at + i) % 1013));
      list.add("t" + std::to_string(k),
               polyak::TensorView<float>(data, {static_cast<std::int64_t>(sizes[k])}));
      at += sizes[k];
    }
    CountingCommunicator comm{member, &calls[static_cast<std::size_t>(r)]};
    polyak::average_parameters(list, comm);
    std::vector<float>& out = results[static_cast<std::size_t>(r)];
    for (const auto& tensor : list) out.insert(out.end(), tensor.data(), tensor.data() + tensor.numel());
  });
  CHECK(errors == std::vector<std::string>(4));
  // The mean of (r + 1) * k over r = 0..3 is 2.5 k, exactly (x / 4 is exact).
  std::size_t wrong = 0;
  for (const auto& out : results) {
    REQUIRE(out.size() == total);
    for (std::size_t i = 0; i < total; ++i) wrong += out[i] != 2.5f * static_cast<float>(i % 1013);
  }
  CHECK(wrong == 0);
  // One call for the layout check, then one a chunk of the concatenated scalars.
  const int expected_calls = 1 + static_cast<int>((total + chunk - 1) / chunk);
  CHECK(calls == std::vector<int>(4, expected_calls));
}

TEST_CASE("bfloat16 comes off the wire rounded as Eigen rounds it, NaN and infinity included",
          "[model_averaging]") {
  std::vector<std::uint32_t> patterns = {0u,          0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                         0xffc00001u, 0x7f800001u, 0xff812345u, 0x7f7fffffu, 0x00000001u,
                                         0x00008000u, 0x00018000u, 0x3f808000u, 0x3f818000u, 0x3f807fffu};
  for (std::uint64_t bits = 0; bits <= 0xffffffffu; bits += 65521)
    patterns.push_back(static_cast<std::uint32_t>(bits));
  std::vector<float> in(patterns.size());
  std::memcpy(in.data(), patterns.data(), patterns.size() * sizeof(float));
  std::vector<Eigen::bfloat16> out(in.size());
  polyak::detail::narrow(in.data(), out.data(), in.size());
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < in.size(); ++i) {
    wrong += Eigen::numext::bit_cast<std::uint16_t>(out[i]) !=
             Eigen::numext::bit_cast<std::uint16_t>(static_cast<Eigen::bfloat16>(in[i]));
  }
  CHECK(wrong == 0);
  CHECK(in.size() > 65000);
}

TEST_CASE(
    "average_parameters gives PyTorch's bits, divided by the group size then summed, for 2, 3, 4 and 8 "
    "members",
    "[model_averaging][reference]") {
  // tests/reference/average_parameters.py: torch divides each member's scalars by n, the sum runs in
  // rank order (ThreadCommunicator's). 300001 and 4.5 million (18 MB) scalars, with and without
  // extremes (where summing first and scaling after, even by an exact 2^-k, would change a bit).
  // Odd members hold their tensors apart, even ones in one run.
  const auto records = polyak_test::read_records("average_parameters.txt");
  int cases = 0;
  for (std::size_t c = 0; c < records.size(); ++c) {
    if (records[c].kind != "case") continue;
    ++cases;
    const auto& record = records[c];
    const int n = static_cast<int>(record.integer(0));
    const auto scalars = static_cast<std::size_t>(record.integer(1));
    const bool extremes = record.integer(2) != 0;
    const std::uint64_t expected = std::stoull(record.words.at(3), nullptr, 16);
    INFO(n << " members, " << scalars << " scalars, extremes " << extremes);
    // The golden file shows what this case tells apart: multiplying by 1 / 3 misses PyTorch's bits,
    // and so does scaling after the sum without the range check where extremes are held.
    if (n == 3) CHECK(record.integer(4) > 0);
    if (extremes) CHECK(record.integer(5) > 0);
    std::vector<std::vector<float>> results(static_cast<std::size_t>(n));
    const auto errors = on_threads(n, [&](ThreadCommunicator& comm) {
      const int r = comm.rank();
      const std::vector<std::size_t> sizes = {scalars / 3, 7, scalars - scalars / 3 - 7};
      std::vector<float> arena(scalars);
      std::vector<std::vector<float>> apart;
      ParameterList<float> list;
      std::size_t at = 0;
      for (std::size_t k = 0; k < sizes.size(); ++k) {
        float* data = arena.data() + at;
        if (r % 2 == 1) {
          apart.emplace_back(sizes[k]);
          data = apart.back().data();
        }
        for (std::size_t i = 0; i < sizes[k]; ++i)
          data[i] = polyak_test::average_parameters_scalar(r, at + i, extremes);
        list.add("t" + std::to_string(k),
                 polyak::TensorView<float>(data, {static_cast<std::int64_t>(sizes[k])}));
        at += sizes[k];
      }
      polyak::average_parameters(list, comm);
      std::vector<float>& out = results[static_cast<std::size_t>(r)];
      for (const auto& tensor : list) out.insert(out.end(), tensor.data(), tensor.data() + tensor.numel());
    });
    REQUIRE(errors == std::vector<std::string>(static_cast<std::size_t>(n)));
    CHECK(polyak_test::fnv1a_words(results[0]) == expected);
    for (int r = 1; r < n; ++r)
      CHECK(std::memcmp(results[0].data(), results[static_cast<std::size_t>(r)].data(),
                        scalars * sizeof(float)) == 0);
    for (std::size_t v = c + 1; v < records.size() && records[v].kind == "value"; ++v) {
      const auto at = static_cast<std::size_t>(records[v].integer(0));
      const auto want = static_cast<float>(records[v].number(1));
      INFO("scalar " << at << ": " << results[0][at] << " against PyTorch's " << want);
      CHECK(std::memcmp(&results[0][at], &want, sizeof want) == 0);
    }
  }
  CHECK(cases == 16);
}

#if defined(__x86_64__) || defined(__i386__)
TEST_CASE("members that flush subnormals to zero still get the divide-first bits, and all the same ones",
          "[model_averaging][adversarial]") {
  // torch.set_flush_denormal(True) and -ffast-math set FTZ / DAZ, per thread. Summed first, these
  // scalars would make a subnormal partial sum that flushes; divided first, each quotient is normal.
  const auto set_flush = [](bool on) {
    _MM_SET_FLUSH_ZERO_MODE(on ? _MM_FLUSH_ZERO_ON : _MM_FLUSH_ZERO_OFF);
    _MM_SET_DENORMALS_ZERO_MODE(on ? _MM_DENORMALS_ZERO_ON : _MM_DENORMALS_ZERO_OFF);
  };
  const std::size_t total = std::size_t{4} << 20, at = 5;
  const float x[4] = {0x1p-123f, -1.75f * 0x1p-124f, 0x1p-124f, 0.0f};
  for (const int flushing : {0xf, 0x1}) {  // every member, or member 0 alone
    INFO("members flushing: mask " << flushing);
    std::vector<std::vector<float>> data(4);
    const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
      const auto r = static_cast<std::size_t>(comm.rank());
      set_flush(((flushing >> r) & 1) != 0);
      data[r].assign(total, 0.0f);
      data[r][at] = x[r];
      ParameterList<float> list;
      list.add("w", polyak::TensorView<float>(data[r].data(), {static_cast<std::int64_t>(total)}));
      polyak::average_parameters(list, comm);
      set_flush(false);
    });
    REQUIRE(errors == std::vector<std::string>(4));
    // Divided first (x / 4 is exact and normal for each) and summed in rank order: 2^-126 + 2^-127 *
    // ... = 2^-125 / 4 * (2 - 1.75 + 1) ... worked out: (2^-123 - 1.75 2^-124 + 2^-124) / 4 = 2^-126.
    CHECK(data[0][at] == 0x1p-126f);
    for (std::size_t r = 1; r < 4; ++r) CHECK(std::memcmp(&data[0][at], &data[r][at], sizeof(float)) == 0);
  }
}
#endif

namespace {

/// The contract's minimum: in-place blocking sums only (no iallreduce_sum, no out-of-place form).
struct BlockingOnly {
  ThreadCommunicator inner;
  int rank() const { return inner.rank(); }
  int size() const { return inner.size(); }
  template <class T>
  void allreduce_sum(T* data, std::size_t n) {
    inner.allreduce_sum(data, n);
  }
  BlockingOnly split(int color, int key) const { return {inner.split(color, key)}; }
};
static_assert(polyak::is_communicator_v<BlockingOnly> && !polyak::has_iallreduce_v<BlockingOnly>);

}  // namespace

TEST_CASE("the blocking averagers work over a communicator without iallreduce_sum or an out-of-place sum",
          "[model_averaging]") {
  const auto errors = on_threads(4, [&](ThreadCommunicator& member) {
    BlockingOnly comm{member};
    Eigen::VectorXf w = Eigen::VectorXf::Constant(5, static_cast<float>(comm.rank()));
    ParameterList<float> list;
    list.add("w", w);
    PeriodicModelAverager<BlockingOnly> periodic(/*period=*/1, /*warmup_steps=*/0, comm);
    CHECK(periodic.average_parameters(list));
    CHECK((w.array() == 1.5f).all());  // (0 + 1 + 2 + 3) / 4
    w.setConstant(static_cast<float>(comm.rank()));
    HierarchicalModelAverager<BlockingOnly> hierarchical({{1, 2}, {2, 4}}, /*warmup_steps=*/0, comm);
    w.setConstant(static_cast<float>(comm.rank()));
    CHECK(hierarchical.average_parameters(list) == 2);  // step 0: the whole group
    CHECK((w.array() == 1.5f).all());
    w.setConstant(static_cast<float>(comm.rank()));
    CHECK(hierarchical.average_parameters(list) == 1);  // step 1: pairs
    CHECK((w.array() == (comm.rank() < 2 ? 0.5f : 2.5f)).all());
  });
  CHECK(errors == std::vector<std::string>(4));
}

namespace {

/// A communicator that asks for 1 KB calls and records the length of each float sum it makes.
struct SmallCalls {
  static constexpr std::size_t average_chunk_bytes = 1024;
  ThreadCommunicator inner;
  std::vector<std::size_t>* float_calls;
  int rank() const { return inner.rank(); }
  int size() const { return inner.size(); }
  template <class T>
  void allreduce_sum(T* data, std::size_t n) {
    if constexpr (std::is_same_v<T, float>) float_calls->push_back(n);
    inner.allreduce_sum(data, n);
  }
  SmallCalls split(int color, int key) const { return {inner.split(color, key), float_calls}; }
};
static_assert(polyak::average_chunk_bytes_v<SmallCalls> == 1024 &&
              polyak::average_chunk_bytes_v<BlockingOnly> == std::size_t{1} << 20);

}  // namespace

TEST_CASE("average_parameters calls the collective in the communicator's own chunk size",
          "[model_averaging]") {
  std::vector<std::vector<std::size_t>> calls(2);
  const auto errors = on_threads(2, [&](ThreadCommunicator& member) {
    SmallCalls comm{member, &calls[static_cast<std::size_t>(member.rank())]};
    Eigen::VectorXf w = Eigen::VectorXf::Constant(1000, static_cast<float>(comm.rank()));
    ParameterList<float> list;
    list.add("w", w);
    polyak::average_parameters(list, comm);
    CHECK((w.array() == 0.5f).all());
  });
  CHECK(errors == std::vector<std::string>(2));
  for (const auto& c : calls) CHECK(c == std::vector<std::size_t>{256, 256, 256, 232});  // 1 KB of floats
}
