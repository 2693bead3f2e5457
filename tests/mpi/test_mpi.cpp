// SPDX-License-Identifier: MIT
// Model averaging over MPI, run by CTest through mpirun on 2 and 4 ranks. Every rank runs every test
// case in the same order, so the collectives match; assertions are CHECKs (a REQUIRE that stopped
// one rank's test case early would leave the others waiting).
#define CATCH_CONFIG_RUNNER
#include "average_parameters_members.hpp"
#include "averaging_scenario.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>  // std::remove
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>  // getpid: a file name of this job's own

#include "polyak/core/averaged_model.hpp"
#include "polyak/checkpoint/distributed_checkpoint.hpp"
#include "polyak/core/model_averaging.hpp"
#include "polyak/mpi.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/core/shard_view.hpp"

using polyak::MpiCommunicator;
using polyak::ParameterList;

namespace {
using polyak_test::file_bytes;

MpiCommunicator world() { return MpiCommunicator(MPI_COMM_WORLD); }

/// A path in the temporary folder unique to this job (CTest may run the np2, np4 and np8 jobs at
/// once): rank 0's process id, which every rank learns.
std::string job_path(const std::string& name) {
  double pid = 0;
  MpiCommunicator comm = world();
  if (comm.rank() == 0) pid = static_cast<double>(::getpid());
  comm.allreduce_sum(&pid, 1);
  const auto folder = std::filesystem::temp_directory_path() / "polyak_mpi_tests";
  std::filesystem::create_directories(folder);
  return (folder / (std::to_string(static_cast<long>(pid)) + "_" + name)).string();
}

}  // namespace

TEST_CASE(
    "average_parameters over MPI equals each rank's x / size summed by the bare MPI_Allreduce, bit for bit",
    "[mpi]") {
  // PyTorch's semantics with MPI's own order of summation: the expected values divide first and sum
  // with MPI_Allreduce in place, in the pieces polyak's chunks make. 300001 and 4.5 million
  // scalars, with and without extremes (where summing first and scaling after would change a bit).
  // Odd ranks hold their tensors apart.
  MpiCommunicator comm = world();
  const int r = comm.rank(), n = comm.size();
  for (const std::size_t scalars : {std::size_t{300001}, std::size_t{4500000}}) {
    for (const bool extremes : {false, true}) {
      INFO(scalars << " scalars, extremes " << extremes);
      std::vector<float> expected(scalars);
      for (std::size_t i = 0; i < scalars; ++i)
        expected[i] = polyak_test::average_parameters_scalar(r, i, extremes) / static_cast<float>(n);
      constexpr std::size_t piece = polyak::average_chunk_bytes_v<MpiCommunicator> / sizeof(float);
      for (std::size_t done = 0; done < scalars; done += piece) {
        MPI_Allreduce(MPI_IN_PLACE, expected.data() + done, static_cast<int>(std::min(piece, scalars - done)),
                      MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      }
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
      std::size_t differ = 0;
      at = 0;
      for (const auto& tensor : list) {
        differ += static_cast<std::size_t>(
            std::memcmp(tensor.data(), expected.data() + at, tensor.numel() * sizeof(float)) != 0);
        at += tensor.numel();
      }
      CHECK(differ == 0);
    }
  }
}

TEST_CASE("MpiCommunicator sums in place and splits like MPI_Comm_split", "[mpi]") {
  MpiCommunicator comm = world();
  const int n = comm.size();
  std::vector<double> data(100);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = comm.rank() + static_cast<double>(i);
  comm.allreduce_sum(data.data(), data.size());
  for (std::size_t i = 0; i < data.size(); ++i)
    CHECK(data[i] == n * (n - 1) / 2.0 + n * static_cast<double>(i));

  MpiCommunicator part = comm.split(comm.rank() % 2, -comm.rank());  // evens and odds, reversed
  CHECK(part.size() == n / 2);
  CHECK(part.rank() == (n / 2 - 1) - comm.rank() / 2);
  float value = static_cast<float>(comm.rank());
  part.allreduce_sum(&value, 1);
  // evens: 0 + 2 + ...; odds: 1 + 3 + ...
  float expected = 0;
  for (int r = comm.rank() % 2; r < n; r += 2) expected += static_cast<float>(r);
  CHECK(value == expected);
}

TEST_CASE("average_parameters over MPI gives every rank the mean", "[mpi]") {
  MpiCommunicator comm = world();
  const int n = comm.size();
  Eigen::MatrixXf weight(3, 5);
  Eigen::Matrix<Eigen::half, Eigen::Dynamic, 1> half(4);
  for (Eigen::Index i = 0; i < weight.size(); ++i) weight.data()[i] = static_cast<float>(comm.rank() * i);
  half.setConstant(Eigen::half(static_cast<float>(comm.rank())));
  ParameterList<float> list;
  list.add("weight", weight);
  ParameterList<Eigen::half> halves;
  halves.add("half", half);
  polyak::average_parameters(list, comm);
  polyak::average_parameters(halves, comm);
  const float mean_rank = static_cast<float>(n - 1) / 2;
  for (Eigen::Index i = 0; i < weight.size(); ++i)
    CHECK(weight.data()[i] == mean_rank * static_cast<float>(i));
  CHECK(static_cast<float>(half[0]) == mean_rank);
}

TEST_CASE("PeriodicModelAverager over MPI averages at PyTorch's steps", "[mpi]") {
  MpiCommunicator comm = world();
  const int n = comm.size();
  Eigen::VectorXd w = Eigen::VectorXd::Zero(3);
  ParameterList<double> list;
  list.add("w", w);
  polyak::PeriodicModelAverager averager(4, 3, comm);  // steps 3, 7, 11 average
  std::vector<bool> averaged;
  for (int step = 0; step < 12; ++step) {
    w.array() += comm.rank() + 1.0;  // rank r moves by r + 1
    averaged.push_back(averager.average_parameters(list));
  }
  CHECK(averaged ==
        std::vector<bool>{false, false, false, true, false, false, false, true, false, false, false, true});
  CHECK(w[0] == Approx(12 * (n + 1) / 2.0).epsilon(1e-15));  // the mean of 12 moves each
}

TEST_CASE("HierarchicalModelAverager over MPI: sub-groups average only themselves", "[mpi]") {
  MpiCommunicator comm = world();
  const int n = comm.size();
  const int half_world = n / 2;
  polyak::HierarchicalModelAverager averager({{2, half_world}, {4, n}}, 0, comm);
  Eigen::VectorXd w = Eigen::VectorXd::Zero(1);
  ParameterList<double> list;
  list.add("w", w);
  std::vector<std::int64_t> used;
  std::vector<double> values;
  for (int step = 0; step < 7; ++step) {
    w[0] += comm.rank();  // rank r moves by r
    used.push_back(averager.average_parameters(list));
    values.push_back(w[0]);
  }
  // Step 0 is divided by 4: the world averages. Steps 2 and 6: the half of the world this rank is in.
  CHECK(used == std::vector<std::int64_t>{4, 0, 2, 0, 4, 0, 2});
  const double world_mean = (n - 1) / 2.0;
  const int first = comm.rank() / half_world * half_world;  // the first rank of this half
  const double half_mean = first + (half_world - 1) / 2.0;
  CHECK(values[0] == Approx(world_mean));
  CHECK(values[2] == Approx(world_mean + 2 * half_mean));
  CHECK(values[4] == Approx(5 * world_mean));
  CHECK(values[6] == Approx(5 * world_mean + 2 * half_mean));
}

TEST_CASE("ranks whose parameter lists differ all get an error, and nothing changes", "[mpi]") {
  MpiCommunicator comm = world();
  Eigen::VectorXf a = Eigen::VectorXf::Constant(4, static_cast<float>(comm.rank()));
  Eigen::VectorXf extra = Eigen::VectorXf::Zero(2);
  ParameterList<float> list;
  list.add("a", a);
  if (comm.rank() == 1) list.add("extra", extra);
  CHECK_THROWS_WITH(polyak::average_parameters(list, comm),
                    Catch::Contains("list of rank 1 differs") && Catch::Contains("nothing was averaged"));
  CHECK((a.array() == static_cast<float>(comm.rank())).all());

  // Same counts, another scalar type on one rank: the layout tells, naming it.
  Eigen::VectorXd d = Eigen::VectorXd::Zero(4);
  ParameterList<double> doubles;
  doubles.add("a", d);
  if (comm.rank() == 0) {
    CHECK_THROWS_WITH(polyak::average_parameters(doubles, comm), Catch::Contains("differ"));
  } else {
    ParameterList<float> floats;
    floats.add("a", a);
    CHECK_THROWS_WITH(polyak::average_parameters(floats, comm),
                      Catch::Contains("differ") && Catch::Contains("'a' is F32 where rank 0 has F64"));
  }
}

// Issue 12, item 4: rank 0 listing (w, b) and rank 1 (b, w) both ended with w = b = 50, and a matrix
// column-major on one rank and row-major on another was averaged element by element.
TEST_CASE("ranks whose lists differ in order or storage order all get an error naming it", "[mpi]") {
  MpiCommunicator comm = world();
  Eigen::VectorXf w = Eigen::VectorXf::Constant(3, 0.0f), b = Eigen::VectorXf::Constant(3, 100.0f);
  ParameterList<float> list;
  if (comm.rank() == 1) {
    list.add("b", b).add("w", w);
  } else {
    list.add("w", w).add("b", b);
  }
  CHECK_THROWS_WITH(polyak::average_parameters(list, comm),
                    Catch::Contains("rank 1") && Catch::Contains("nothing was averaged"));
  CHECK((w.array() == 0.0f).all());
  CHECK((b.array() == 100.0f).all());

  Eigen::Matrix<float, 2, 3> col = Eigen::Matrix<float, 2, 3>::Constant(static_cast<float>(comm.rank()));
  Eigen::Matrix<float, 2, 3, Eigen::RowMajor> row = col;
  ParameterList<float> matrices;
  if (comm.rank() == 0) {
    matrices.add("m", row);
  } else {
    matrices.add("m", col);
  }
  if (comm.rank() == 0) {
    CHECK_THROWS_WITH(polyak::average_parameters(matrices, comm),
                      Catch::Contains("from rank 0's") && Catch::Contains("nothing was averaged"));
  } else {
    CHECK_THROWS_WITH(
        polyak::average_parameters(matrices, comm),
        Catch::Contains("tensor 0 'm' has another storage order (row- vs column-major) than rank 0"));
  }
  CHECK((col.array() == static_cast<float>(comm.rank())).all());
  CHECK((row.array() == static_cast<float>(comm.rank())).all());
}

TEST_CASE("MpiCommunicator's non-blocking allreduce completes beside blocking calls, in 4 MB pieces",
          "[mpi][overlap]") {
  MpiCommunicator comm = world();
  const int n = comm.size();
  std::vector<float> big(2'500'000, static_cast<float>(comm.rank() + 1));  // 10 MB: three pieces
  auto request = comm.iallreduce_sum(big.data(), big.size());
  std::vector<double> small(3, 1.0);
  comm.allreduce_sum(small.data(), small.size());
  int tests = 0;
  while (!request.test()) ++tests;  // test() drives progress
  request.wait();                   // complete: a no-op
  const float expected = static_cast<float>(n * (n + 1) / 2);
  CHECK(big.front() == expected);
  CHECK(big.back() == expected);
  CHECK(big[1'234'567] == expected);
  CHECK(small[0] == n);
}

TEST_CASE("an overlapped PeriodicModelAverager over MPI holds the delayed average's closed form",
          "[mpi][overlap]") {
  MpiCommunicator comm = world();
  const int n = comm.size(), r = comm.rank();
  const std::int64_t warmup = 3, period = 4, steps = 19;
  for (const std::int64_t delay : {1, 4}) {
    CAPTURE(delay);
    Eigen::VectorXf w = Eigen::VectorXf::Zero(300'000);  // 1.2 MB
    ParameterList<float> list;
    list.add("w", w);
    polyak::PeriodicModelAverager averager(period, warmup, comm, polyak::Overlap{delay});
    std::size_t wrong = 0;
    for (std::int64_t t = 0; t < steps; ++t) {
      w.array() += static_cast<float>(r + 1);
      averager.average_parameters(list);
      // x_r after step t: mean(g) * (s + 1) + (t - s) * g_r, s the last average landed (see the
      // ThreadCommunicator test); (t + 1) * g_r before any.
      std::int64_t landed = -1;
      for (std::int64_t s = warmup; s + delay <= t; s += period) landed = s;
      const double g = r + 1, mean_g = (n + 1) / 2.0;
      const double expected =
          landed < 0 ? static_cast<double>(t + 1) * g
                     : mean_g * static_cast<double>(landed + 1) + static_cast<double>(t - landed) * g;
      wrong += w[0] != static_cast<float>(expected) || w[299'999] != static_cast<float>(expected);
    }
    CHECK(wrong == 0);
    averager.synchronize(list);
  }
}

namespace {

polyak::FlatLayout sharded_layout() {
  polyak::FlatLayout layout;
  layout.add("conv", {4, 3, 3}).add("bias", {5}).add("fc", {6, 7}).add("scale", {1});  // 36 + 5 + 42 + 1
  return layout;
}

float trained(int t, std::size_t i) {
  return static_cast<float>((static_cast<int>(i) * 29 + t * 13) % 89) / 16.0f;
}

/// Member r of `members`: an uneven cut of the flat model, the last member taking the rest.
std::pair<std::size_t, std::size_t> cut(std::size_t numel, int members, int r) {
  const auto begin = [&](int k) {
    return k == 0
               ? 0
               : std::min(numel, numel * static_cast<std::size_t>(k) / static_cast<std::size_t>(members) + 3);
  };
  return {begin(r), r + 1 == members ? numel : begin(r + 1)};
}

}  // namespace

TEST_CASE(
    "an EMA kept on every rank's shard is the one rank's EMA, saved on all and loaded on half and on one",
    "[mpi][shard]") {
  MpiCommunicator comm = world();
  const int n = comm.size(), r = comm.rank();
  const polyak::FlatLayout layout = sharded_layout();
  const int steps = 5;
  const std::string reference = job_path("whole.safetensors"), sharded = job_path("sharded.safetensors");

  if (r == 0) {  // the whole model in one process
    std::vector<float> flat(layout.numel());
    ParameterList<float> list;
    for (const auto& t : layout.tensors())
      list.add(t.name, polyak::TensorView<float>(flat.data() + t.offset, t.shape));
    polyak::AveragedModel<float, polyak::EMA> ema(list, polyak::EMA(0.9));
    for (int t = 0; t < steps; ++t) {
      for (std::size_t i = 0; i < flat.size(); ++i) flat[i] = trained(t, i);
      ema.update_parameters(list);
    }
    polyak::save_safetensors(reference, ema.state_dict());
  }

  const auto [begin, end] = cut(layout.numel(), n, r);
  std::vector<float> mine(end - begin);
  polyak::ShardView<float> shard(layout, mine.data(), begin, end, comm);
  polyak::AveragedModel<float, polyak::EMA> ema(shard.parameters(), polyak::EMA(0.9));
  for (int t = 0; t < steps; ++t) {
    for (std::size_t i = 0; i < mine.size(); ++i) mine[i] = trained(t, begin + i);
    ema.update_parameters(shard.parameters());
  }
  polyak::save_distributed(sharded, ema.state_dict(), shard, comm);
  if (r == 0) CHECK(file_bytes(sharded) == file_bytes(reference));

  // Half the ranks (at least one), then rank 0 alone, load it re-sliced and save it again.
  for (const int members : {std::max(1, n / 2), 1}) {
    CAPTURE(members);
    const std::string again = job_path("again_" + std::to_string(members) + ".safetensors");
    MpiCommunicator part = comm.split(r < members ? 0 : 1, r);
    if (r < members) {
      const auto [b, e] = cut(layout.numel(), members, r);
      std::vector<float> held(e - b, 0.0f);
      polyak::ShardView<float> other(layout, held.data(), b, e, part);
      polyak::AveragedModel<float, polyak::EMA> loaded(other.parameters(), polyak::EMA(0.9));
      polyak::load_distributed(loaded, sharded, other, part);
      CHECK(loaded.n_averaged() == steps);
      polyak::save_distributed(again, loaded.state_dict(), other, part);
      if (r == 0) CHECK(file_bytes(again) == file_bytes(reference));
      if (r == 0) std::remove(again.c_str());
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (r == 0) {
    std::remove(reference.c_str());
    std::remove(sharded.c_str());
  }
}

TEST_CASE("a shard layout that does not cover the model, or states that disagree, are refused on every rank",
          "[mpi][shard]") {
  MpiCommunicator comm = world();
  const int n = comm.size(), r = comm.rank();
  const polyak::FlatLayout layout = sharded_layout();
  auto [begin, end] = cut(layout.numel(), n, r);
  std::vector<float> mine(layout.numel());
  // The last rank stops one scalar short.
  const std::size_t short_end = r + 1 == n ? end - 1 : end;
  CHECK_THROWS_WITH((polyak::ShardView<float>(layout, mine.data(), begin, short_end, comm)),
                    Catch::Contains("before the model's 84 scalars") && Catch::Contains("no shard was made"));
  // Rank 1 reaches into rank 2's range (with 2 ranks: past the end).
  const std::size_t long_end = r == 1 ? end + 1 : end;
  CHECK_THROWS_WITH((polyak::ShardView<float>(layout, mine.data(), begin, long_end, comm)),
                    Catch::Contains("no shard was made"));

  // n_averaged differs on the last rank: nothing is written.
  polyak::ShardView<float> shard(layout, mine.data(), begin, end, comm);
  polyak::AveragedModel<float, polyak::EMA> ema(shard.parameters(), polyak::EMA(0.9));
  ema.update_parameters(shard.parameters());
  if (r + 1 == n) ema.update_parameters(shard.parameters());
  const std::string path = job_path("refused.safetensors");
  CHECK_THROWS_WITH(polyak::save_distributed(path, ema.state_dict(), shard, comm),
                    Catch::Contains("the members' states differ"));
  CHECK(!std::filesystem::exists(path));
}

TEST_CASE("ranks that read different files at one path (a stale copy on one node) are all refused",
          "[mpi][shard]") {
  // Issue 21, item 3: each rank reads its own file, as ranks on nodes with local disks would; the last
  // rank's is another save with the same layout (n_averaged and values differ).
  MpiCommunicator comm = world();
  const int n = comm.size(), r = comm.rank();
  const polyak::FlatLayout layout = sharded_layout();
  const auto [begin, end] = cut(layout.numel(), n, r);
  std::vector<float> mine(end - begin);
  polyak::ShardView<float> shard(layout, mine.data(), begin, end, comm);
  polyak::AveragedModel<float, polyak::EMA> ema(shard.parameters(), polyak::EMA(0.9));
  for (int t = 0; t < 3; ++t) {
    for (std::size_t i = 0; i < mine.size(); ++i) mine[i] = trained(t, begin + i);
    ema.update_parameters(shard.parameters());
    if (t == 1) polyak::save_distributed(job_path("older.safetensors"), ema.state_dict(), shard, comm);
  }
  polyak::save_distributed(job_path("newer.safetensors"), ema.state_dict(), shard, comm);
  polyak::AveragedModel<float, polyak::EMA> loaded(shard.parameters(), polyak::EMA(0.9));
  const std::string mine_to_read = job_path(r + 1 == n ? "older.safetensors" : "newer.safetensors");
  CHECK_THROWS_WITH(
      polyak::load_distributed(loaded, mine_to_read, shard, comm),
      Catch::Contains("the members read different files") && Catch::Contains("nothing was loaded"));
  CHECK(loaded.n_averaged() == 0);
  polyak::load_distributed(loaded, job_path("newer.safetensors"), shard, comm);  // all the same file: loads
  CHECK(loaded.n_averaged() == 3);
  const std::string older = job_path("older.safetensors"), newer = job_path("newer.safetensors");
  MPI_Barrier(MPI_COMM_WORLD);  // (job_path is collective: every rank asks, rank 0 removes)
  if (r == 0) {
    std::remove(older.c_str());
    std::remove(newer.c_str());
  }
}

TEST_CASE(
    "an overlapped averager whose rank fails where an average lands or starts fails every rank, no hang",
    "[mpi][overlap]") {
  // Issue 21, item 7: the last rank's tensor moves before the step that lands one average and starts
  // the next (period 2, delay 2), then before a step that only lands (delay 1): every rank refuses at
  // that step; none waits for the others, none changes.
  MpiCommunicator comm = world();
  const int n = comm.size(), r = comm.rank();
  for (const auto& [delay, fail_at] : std::vector<std::pair<std::int64_t, std::int64_t>>{{2, 2}, {1, 3}}) {
    CAPTURE(delay, fail_at);
    Eigen::VectorXf values = Eigen::VectorXf::Zero(1000), kept;
    ParameterList<float> list;
    list.add("w", values);
    polyak::PeriodicModelAverager<MpiCommunicator> averager(2, 0, comm, polyak::Overlap{delay});
    std::int64_t refused_at = -1;
    bool unchanged = false;
    for (std::int64_t t = 0; t < 6 && refused_at < 0; ++t) {
      values.array() += static_cast<float>(r + 1);
      if (r + 1 == n && t == fail_at) {
        kept = values;      // the same values...
        values.swap(kept);  // ...in another allocation: the view is stale
      }
      const Eigen::VectorXf before = values;
      try {
        averager.average_parameters(list);
      } catch (const std::exception& e) {
        refused_at = t;
        unchanged = values == before && averager.step() == t;
        CHECK_THAT(std::string(e.what()), Catch::Contains("rank " + std::to_string(n - 1)));
      }
    }
    CHECK(refused_at == fail_at);
    CHECK(unchanged);
  }
}

TEST_CASE("every averager and a sharded EMA's save and re-sliced load give over MPI the threads' bits",
          "[mpi][model_averaging][distributed_checkpoint]") {
  // The same scenario runs over Gloo in tests/torch/test_c10d.cpp, against the same threads.
  MpiCommunicator comm = world();
  const int n = comm.size(), r = comm.rank();
  const auto mpi = polyak_test::averaging_scenario(comm, job_path("scenario.safetensors"));
  std::vector<polyak_test::ScenarioResult> threads(static_cast<std::size_t>(n));
  // The path before the threads: job_path is an MPI collective, which a thread of an MPI_Init
  // process must not call (it did, once from each thread: collectives mismatched now and then,
  // MPI_ERR_TRUNCATE or a hang).
  const std::string threads_path = job_path("scenario_threads_" + std::to_string(r) + ".safetensors");
  const auto errors = polyak_test::on_threads(n, [&](polyak::ThreadCommunicator& member) {
    threads[static_cast<std::size_t>(member.rank())] = polyak_test::averaging_scenario(member, threads_path);
  });
  CHECK(errors == std::vector<std::string>(static_cast<std::size_t>(n)));
  CHECK(mpi.values == threads[static_cast<std::size_t>(r)].values);
  CHECK(mpi.saved == threads[static_cast<std::size_t>(r)].saved);
  CHECK(mpi.reloaded == threads[static_cast<std::size_t>(r)].reloaded);
  CHECK(mpi.saved.size() > 64 * sizeof(float));
  CHECK(mpi.values.size() == 5 * (1 + 3 * 10 + 2 * 9));
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  Catch::Session session;
  int failed = session.run(argc, argv);
  // The job fails if any rank failed.
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return failed;
}
