// SPDX-License-Identifier: MIT
// Model averaging over MPI, run by CTest through mpirun on 2 and 4 ranks. Every rank runs every test
// case in the same order, so the collectives match; assertions are CHECKs (a REQUIRE that stopped
// one rank's test case early would leave the others waiting).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdint>
#include <vector>

#include "polyak/model_averaging.hpp"
#include "polyak/mpi.hpp"

using polyak::MpiCommunicator;
using polyak::ParameterList;

namespace {
MpiCommunicator world() { return MpiCommunicator(MPI_COMM_WORLD); }
}  // namespace

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
