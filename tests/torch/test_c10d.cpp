// SPDX-License-Identifier: MIT
// C10dCommunicator over Gloo process groups, the members on threads of one process sharing an
// in-memory store (c10d::HashStore): the communicator contract, and the averagers on it giving
// ThreadCommunicator's bits. The test cases tagged [.processes] run in separate processes started by
// tests/torch/launch_processes.sh, as torchrun starts them (CTest: c10d.processes.*).
#include "polyak/torch/c10d.hpp"
#include "polyak/torch/process_group_average.hpp"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "averaging_scenario.hpp"
#include "polyak/core/model_averaging.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

#include <cstdlib>  // std::getenv
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

using polyak::ParameterList;
using polyak::libtorch::C10dCommunicator;

namespace {

/// Runs body(comm) on `size` threads, each a member of one Gloo group over a shared store; returns
/// each member's exception text ("" where none).
std::vector<std::string> on_gloo(int size, const std::function<void(C10dCommunicator&)>& body) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::string> errors(static_cast<std::size_t>(size));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto comm = C10dCommunicator::gloo(store, r, size, "127.0.0.1", std::chrono::seconds(60));
        body(comm);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace

TEST_CASE("C10dCommunicator sums host memory in place, blocking and not, and splits like MPI_Comm_split",
          "[c10d]") {
  for (const int n : {2, 4}) {
    std::vector<std::vector<double>> sums(static_cast<std::size_t>(n));
    std::vector<std::vector<int>> parts(static_cast<std::size_t>(n));
    const auto errors = on_gloo(n, [&](C10dCommunicator& comm) {
      const int r = comm.rank();
      std::vector<double> data(1001), later(7, r + 1.0);
      for (std::size_t i = 0; i < data.size(); ++i) data[i] = r * 10.0 + static_cast<double>(i);
      const double* before = data.data();
      auto request = comm.iallreduce_sum(later.data(), later.size());
      comm.allreduce_sum(data.data(), data.size());
      request.wait();
      CHECK(data.data() == before);  // the caller's memory itself
      data.push_back(later[0]);
      sums[static_cast<std::size_t>(r)] = data;
      C10dCommunicator part = comm.split(r % 2, -r);  // evens and odds, reversed
      float value = static_cast<float>(r);
      part.allreduce_sum(&value, 1);
      parts[static_cast<std::size_t>(r)] = {part.rank(), part.size(), static_cast<int>(value)};
    });
    CHECK(errors == std::vector<std::string>(static_cast<std::size_t>(n)));
    for (int r = 0; r < n; ++r) {
      const auto& s = sums[static_cast<std::size_t>(r)];
      REQUIRE(s.size() == 1002);
      for (std::size_t i = 0; i < 1001; ++i)
        CHECK(s[i] == 10.0 * n * (n - 1) / 2 + n * static_cast<double>(i));
      CHECK(s[1001] == n * (n + 1) / 2.0);
      int expected = 0;
      for (int q = r % 2; q < n; q += 2) expected += q;
      CHECK(parts[static_cast<std::size_t>(r)] == std::vector<int>{(n / 2 - 1) - r / 2, n / 2, expected});
    }
  }
}

TEST_CASE("C10dCommunicator::split refuses a negative color on every member, before any group is made",
          "[c10d][adversarial]") {
  const auto errors = on_gloo(3, [](C10dCommunicator& comm) { comm.split(comm.rank() == 1 ? -1 : 0, 0); });
  for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("member 1 passed color -1"));
}

TEST_CASE(
    "the averagers over Gloo give ThreadCommunicator's bits: average_parameters, periodic overlapped, "
    "hierarchical with split",
    "[c10d][model_averaging]") {
  // Scalars whose sums are exact in any order (Gloo's ring adds in its own), divided by 4 exactly.
  const auto run = [](auto&& on_members) {
    std::vector<std::vector<float>> seen(4);
    const auto errors = on_members([&](auto& comm) {
      const int r = comm.rank();
      Eigen::VectorXf w(300001);
      for (Eigen::Index i = 0; i < w.size(); ++i) w[i] = static_cast<float>((r + 1) * (i % 1013));
      ParameterList<float> list;
      list.add("w", w);
      auto& out = seen[static_cast<std::size_t>(r)];
      polyak::average_parameters(list, comm);
      out.insert(out.end(), w.data(), w.data() + 5);
      using Comm = std::decay_t<decltype(comm)>;
      polyak::PeriodicModelAverager<Comm> periodic(2, 0, comm, polyak::Overlap{1});
      for (int step = 0; step < 6; ++step) {
        w.array() += static_cast<float>(r + step);
        periodic.average_parameters(list);
        out.push_back(w[3]);
      }
      periodic.synchronize(list);
      polyak::HierarchicalModelAverager<Comm> hierarchical({{1, 2}, {2, 4}}, 0, comm);
      for (int step = 0; step < 4; ++step) {
        w.array() += static_cast<float>(r);
        hierarchical.average_parameters(list);
        out.push_back(w[7]);
      }
    });
    CHECK(errors == std::vector<std::string>(4));
    return seen;
  };
  const auto gloo = run([](auto body) { return on_gloo(4, [&](C10dCommunicator& c) { body(c); }); });
  const auto threads = run(
      [](auto body) { return polyak_test::on_threads(4, [&](polyak::ThreadCommunicator& c) { body(c); }); });
  CHECK(gloo == threads);
  CHECK(gloo[0][1] == 2.5f);  // (1 + 2 + 3 + 4) / 4 times i = 1
}

TEST_CASE("C10dCommunicator's splits meet under prefixes of their own: again, nested, from a second wrapper",
          "[c10d][adversarial]") {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::vector<float>> seen(4);
  std::vector<std::string> errors(4);
  std::vector<std::thread> threads;
  for (int r = 0; r < 4; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto comm = C10dCommunicator::gloo(store, r, 4, "127.0.0.1", std::chrono::seconds(60));
        auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(60));
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
        C10dCommunicator wrapper(comm.group(), store, options);  // a second wrapper of the same group
        auto& out = seen[static_cast<std::size_t>(r)];
        for (C10dCommunicator* from : {&comm, &comm, &wrapper}) {  // the same split twice, then the wrapper's
          auto pair = from->split(r / 2, r);
          float value = static_cast<float>(r + 1);
          pair.allreduce_sum(&value, 1);
          auto single = pair.split(pair.rank(), 0);  // nested: groups of one
          float alone = static_cast<float>(r);
          single.allreduce_sum(&alone, 1);
          out.insert(out.end(), {value, alone, static_cast<float>(single.size())});
        }
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(errors == std::vector<std::string>(4));
  for (int r = 0; r < 4; ++r) {
    const float pair_sum = r < 2 ? 3.0f : 7.0f;
    const auto f = static_cast<float>(r);
    CHECK(seen[static_cast<std::size_t>(r)] ==
          std::vector<float>{pair_sum, f, 1, pair_sum, f, 1, pair_sum, f, 1});
  }
}

TEST_CASE("a moved-from C10dCommunicator still holds its group, options without a device are refused",
          "[c10d][adversarial]") {
  const auto errors = on_gloo(2, [](C10dCommunicator& comm) {
    C10dCommunicator moved = std::move(comm);
    float one = 1.0f;
    comm.allreduce_sum(&one, 1);  // NOLINT(bugprone-use-after-move): what is tested
    moved.allreduce_sum(&one, 1);
    CHECK(one == 4.0f);
    CHECK(comm.size() == 2);
  });
  CHECK(errors == std::vector<std::string>(2));
  auto store = c10::make_intrusive<c10d::HashStore>();
  auto options = c10d::ProcessGroupGloo::Options::create();
  auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, 0, 1, [] {
    auto o = c10d::ProcessGroupGloo::Options::create();
    o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    return o;
  }());
  CHECK_THROWS_WITH(C10dCommunicator(group, store, options), Catch::Contains("name no device"));
}

TEST_CASE("C10dCommunicator sums nothing as a call of its own, so the members' next calls still pair",
          "[c10d][adversarial]") {
  std::vector<float> seen(3);
  const auto errors = on_gloo(3, [&](C10dCommunicator& comm) {
    float nothing = 5.0f, value = static_cast<float>(comm.rank() + 1);
    comm.allreduce_sum(&nothing, 0);
    comm.iallreduce_sum(&nothing, 0).wait();
    comm.allreduce_sum(&value, 1);
    CHECK(nothing == 5.0f);
    seen[static_cast<std::size_t>(comm.rank())] = value;
  });
  CHECK(errors == std::vector<std::string>(3));
  CHECK(seen == std::vector<float>{6.0f, 6.0f, 6.0f});
}

namespace {

/// The store of a run that tests/torch/launch_processes.sh started: POLYAK_TEST_STORE is
/// "file:<path>" (a FileStore) or "tcp:<folder>" (a TCPStore on a port rank 0's server picks and
/// writes to <folder>/port, which the others wait for).
c10::intrusive_ptr<c10d::Store> store_from_environment(const std::string& store, int rank, int size) {
  if (store.rfind("file:", 0) == 0) return c10::make_intrusive<c10d::FileStore>(store.substr(5), size);
  REQUIRE(store.rfind("tcp:", 0) == 0);
  const std::filesystem::path folder = store.substr(4);
  c10d::TCPStoreOptions options;
  options.numWorkers = static_cast<std::size_t>(size);
  options.timeout = std::chrono::seconds(60);
  if (rank == 0) {
    options.port = 0;  // any free port
    options.isServer = true;
    options.waitWorkers = false;  // (else it would wait before the others can know the port)
    auto server = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", options);
    std::ofstream(folder / "port.tmp") << server->getPort();
    std::filesystem::rename(folder / "port.tmp", folder / "port");
    return server;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!std::filesystem::exists(folder / "port")) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  int port = 0;
  std::ifstream(folder / "port") >> port;
  options.port = static_cast<std::uint16_t>(port);
  return c10::make_intrusive<c10d::TCPStore>("127.0.0.1", options);
}

}  // namespace

TEST_CASE("processes over Gloo: every averager and a sharded EMA's save and load give the threads' bits",
          "[.processes][c10d]") {
  const char* rank_text = std::getenv("RANK");
  const char* size_text = std::getenv("WORLD_SIZE");
  const char* store_text = std::getenv("POLYAK_TEST_STORE");
  const char* folder_text = std::getenv("POLYAK_TEST_FOLDER");
  REQUIRE((rank_text && size_text && store_text && folder_text));
  const int r = std::stoi(rank_text), n = std::stoi(size_text);
  const std::string folder = folder_text;
  auto comm = C10dCommunicator::gloo(store_from_environment(store_text, r, n), r, n, "127.0.0.1",
                                     std::chrono::seconds(60));
  REQUIRE((comm.rank() == r && comm.size() == n));

  // The same scenario as tests/mpi/test_mpi.cpp's, against the same threads: Gloo = threads = MPI.
  const auto gloo = polyak_test::averaging_scenario(comm, folder + "/gloo.safetensors");
  std::vector<polyak_test::ScenarioResult> threads(static_cast<std::size_t>(n));
  const auto errors = polyak_test::on_threads(n, [&](polyak::ThreadCommunicator& member) {
    threads[static_cast<std::size_t>(member.rank())] =
        polyak_test::averaging_scenario(member, folder + "/threads_" + std::to_string(r) + ".safetensors");
  });
  CHECK(errors == std::vector<std::string>(static_cast<std::size_t>(n)));
  CHECK(gloo.values == threads[static_cast<std::size_t>(r)].values);
  CHECK(gloo.saved == threads[static_cast<std::size_t>(r)].saved);
  CHECK(gloo.reloaded == threads[static_cast<std::size_t>(r)].reloaded);
  CHECK(gloo.saved.size() > 64 * sizeof(float));

  // Members that disagree all fail, before anything changes, and the group stays usable.
  Eigen::VectorXf w = Eigen::VectorXf::Constant(r + 1 == n ? 11 : 10, 1.0f);
  ParameterList<float> list;
  list.add("w", w);
  CHECK_THROWS_WITH(polyak::average_parameters(list, comm), Catch::Contains("rank " + std::to_string(n - 1)));
  CHECK(w == Eigen::VectorXf::Constant(w.size(), 1.0f));
  CHECK_THROWS_WITH(comm.split(r == 1 ? -1 : 0, 0), Catch::Contains("member 1 passed color -1"));
  double one = 1.0;
  comm.allreduce_sum(&one, 1);
  CHECK(one == n);
}

namespace {

/// Member r's tensors for the module average: float, double and bf16 (bf16 beside float goes to
/// double here), values with few bits, so that their quarters sum exactly in any order.
std::vector<at::Tensor> mixed_tensors(int r) {
  const auto values = [r](std::int64_t n, int salt) {
    return (torch::arange(n, torch::kDouble) * (r + 1) + salt).remainder(97) / 16 - 3;
  };
  return {values(3 * 5, 1).to(torch::kFloat).reshape({3, 5}), values(1000, 2),
          values(7, 3).to(torch::kBFloat16), values(1, 4).to(torch::kFloat).reshape({}),
          values(0, 5).to(torch::kFloat)};
}

}  // namespace

TEST_CASE("libtorch::average_parameters averages tensors in place over the group, as polyak's lists do",
          "[c10d][process_group_average]") {
  // Against polyak's own average_parameters over ThreadCommunicator on the same scalars (the MPI and
  // Gloo paths equal that one, above): float, double and bf16 tensors, one call and in buckets.
  for (const std::size_t bucket_bytes : {std::size_t{0}, std::size_t{64}}) {
    CAPTURE(bucket_bytes);
    std::vector<std::vector<at::Tensor>> gloo(4), lists(4);
    const auto errors = on_gloo(4, [&](C10dCommunicator& comm) {
      auto mine = mixed_tensors(comm.rank());
      const void* before = mine[1].data_ptr();
      polyak::libtorch::average_parameters(mine, *comm.group(), bucket_bytes);
      CHECK(mine[1].data_ptr() == before);  // in place
      gloo[static_cast<std::size_t>(comm.rank())] = mine;
    });
    CHECK(errors == std::vector<std::string>(4));
    const auto list_errors = polyak_test::on_threads(4, [&](polyak::ThreadCommunicator& comm) {
      auto mine = mixed_tensors(comm.rank());
      Eigen::Map<Eigen::MatrixXf> a(mine[0].data_ptr<float>(), 5, 3);  // (row-major 3 x 5)
      Eigen::Map<Eigen::VectorXd> b(mine[1].data_ptr<double>(), 1000);
      Eigen::Map<Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, 1>> c(
          reinterpret_cast<Eigen::bfloat16*>(mine[2].data_ptr()), 7);
      Eigen::Map<Eigen::VectorXf> d(mine[3].data_ptr<float>(), 1);
      ParameterList<float> floats;
      floats.add("a", a).add("d", d);
      ParameterList<double> doubles;
      doubles.add("b", b);
      ParameterList<Eigen::bfloat16> halves;
      halves.add("c", c);
      polyak::PeriodicModelAverager<polyak::ThreadCommunicator> averager(1, 0, comm);  // wire: double
      averager.average_parameters(floats, doubles, halves);
      lists[static_cast<std::size_t>(comm.rank())] = mine;
    });
    CHECK(list_errors == std::vector<std::string>(4));
    for (std::size_t r = 0; r < 4; ++r) {
      for (std::size_t i = 0; i < 5; ++i) {
        CAPTURE(r, i);
        CHECK(gloo[r][i].scalar_type() == lists[r][i].scalar_type());
        CHECK(torch::equal(gloo[r][i], lists[r][i]));
      }
      CHECK(torch::equal(gloo[r][0], gloo[0][0]));
    }
    // A closed form: scalar 1 of tensor b is mean over r of ((1 * (r + 1) + 2) % 97) / 16 - 3.
    CHECK(gloo[0][1][1].item<double>() == (3 + 4 + 5 + 6) / 4.0 / 16 - 3);
  }
}

TEST_CASE(
    "libtorch::average_parameters keeps a bf16 model in bf16, as torch.cat does, Gloo refuses to sum it",
    "[c10d][process_group_average]") {
  // PyTorch would divide and sum in bf16 (its flat copy is bf16); libtorch 1.13's Gloo sums no bf16,
  // so PyTorch's call fails there, and so does this one: on every member, changing nothing.
  const auto x = (torch::arange(1, 2001, torch::kFloat) * 0.37f).to(torch::kBFloat16);
  std::vector<int> unchanged(3, 0);
  const auto errors = on_gloo(3, [&](C10dCommunicator& comm) {
    std::vector<at::Tensor> mine{x.clone(), x.clone()};
    try {
      polyak::libtorch::average_parameters(mine, *comm.group(), 2000);  // a bucket a tensor
    } catch (...) {
      unchanged[static_cast<std::size_t>(comm.rank())] = torch::equal(mine[0], x) && torch::equal(mine[1], x);
      throw;
    }
  });
  for (const auto& e : errors) {
    CHECK_THAT(e, Catch::Contains("allreduce of BFloat16 failed; nothing was averaged"));
  }
  CHECK(unchanged == std::vector<int>{1, 1, 1});
}

TEST_CASE(
    "libtorch::average_parameters refuses on every member, changing nothing, where any member's tensors "
    "differ",
    "[c10d][process_group_average][adversarial]") {
  struct Case {
    const char* what;
    std::function<void(std::vector<at::Tensor>&, std::size_t&)> spoil;  // on member 1
    const char* message;
  };
  const std::vector<Case> cases{
      {"another shape",
       [](auto& t, auto&) {
         t[0] = t[0].reshape({5, 3}).clone();
       },
       "differ in count"},
      {"another scalar type", [](auto& t, auto&) { t[1] = t[1].to(torch::kFloat); }, "differ in count"},
      {"a tensor more", [](auto& t, auto&) { t.push_back(torch::zeros({2})); }, "differ in count"},
      {"another bucket size", [](auto&, auto& bucket) { bucket = 128; }, "bucket_bytes"},
      {"an integer tensor", [](auto& t, auto&) { t[1] = torch::zeros({1000}, torch::kLong); },
       "rank 1 cannot"},
      {"an undefined tensor", [](auto& t, auto&) { t[2] = at::Tensor(); }, "tensor 2 is undefined"},
      {"a sparse tensor", [](auto& t, auto&) { t[1] = t[1].to_sparse(); }, "not dense"},
      // From the hostile pass: tensors copy_ cannot write, found only once values had moved.
      {"an expanded view",
       [](auto& t, auto&) {
         t[0] = torch::ones({1, 1}).expand({3, 5});
       },
       "sharing memory"},
      {"an inference tensor",
       [](auto& t, auto&) {
         c10::InferenceMode inference;
         t[1] = torch::zeros({1000}, torch::kDouble);
       },
       "inference tensor"},
      {"a meta tensor",
       [](auto& t, auto&) { t[1] = torch::empty({1000}, torch::dtype(torch::kDouble).device(torch::kMeta)); },
       "not a CPU or CUDA device"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    std::vector<int> unchanged(3, 0);
    const auto errors = on_gloo(3, [&](C10dCommunicator& comm) {
      auto mine = mixed_tensors(comm.rank());
      std::size_t bucket = 0;
      if (comm.rank() == 1) c.spoil(mine, bucket);
      std::vector<at::Tensor> before;
      for (const auto& t : mine) before.push_back(t.defined() ? t.clone() : t);
      try {
        polyak::libtorch::average_parameters(mine, *comm.group(), bucket);
      } catch (...) {
        bool same = true;
        for (std::size_t i = 0; i < mine.size(); ++i) {
          same = same && (!mine[i].defined() || mine[i].is_meta() ||
                          torch::equal(mine[i].to_dense(), before[i].to_dense()));
        }
        unchanged[static_cast<std::size_t>(comm.rank())] = same;
        throw;
      }
    });
    for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("nothing was averaged"));
    CHECK_THAT(errors[0], Catch::Contains(c.message) || Catch::Contains("rank 1 cannot"));
    CHECK_THAT(errors[1], Catch::Contains(c.message));
    CHECK(unchanged == std::vector<int>{1, 1, 1});
  }
}

TEST_CASE("libtorch::average_parameters over a module's parameters and over an empty list",
          "[c10d][process_group_average]") {
  std::vector<float> weights(2);
  const auto errors = on_gloo(2, [&](C10dCommunicator& comm) {
    torch::nn::Linear linear(3, 2);
    {
      torch::NoGradGuard no_grad;
      for (auto& p : linear->parameters()) p.fill_(static_cast<float>(comm.rank() * 2 + 1));
    }
    polyak::libtorch::average_parameters(*linear, *comm.group());
    weights[static_cast<std::size_t>(comm.rank())] = linear->weight[1][2].item<float>();
    CHECK(linear->weight.requires_grad());
    std::vector<at::Tensor> none;
    polyak::libtorch::average_parameters(none, *comm.group());  // agreed, then nothing to do
  });
  CHECK(errors == std::vector<std::string>(2));
  CHECK(weights == std::vector<float>{2.0f, 2.0f});
}

TEST_CASE("libtorch::average_parameters on CUDA tensors", "[c10d][process_group_average][cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device: the CUDA case of libtorch::average_parameters is skipped");
    return;
  }
  std::vector<at::Tensor> seen(2);
  const auto errors = on_gloo(2, [&](C10dCommunicator& comm) {
    std::vector<at::Tensor> mine;
    for (auto& t : mixed_tensors(comm.rank())) mine.push_back(t.to(torch::kCUDA));
    polyak::libtorch::average_parameters(mine, *comm.group());
    CHECK(mine[1].is_cuda());
    seen[static_cast<std::size_t>(comm.rank())] = mine[1].cpu();
  });
  CHECK(errors == std::vector<std::string>(2));
  auto cpu = on_gloo(2, [&](C10dCommunicator& comm) {
    auto mine = mixed_tensors(comm.rank());
    polyak::libtorch::average_parameters(mine, *comm.group());
    CHECK(torch::equal(mine[1], seen[static_cast<std::size_t>(comm.rank())]));
  });
  CHECK(cpu == std::vector<std::string>(2));
}

TEST_CASE(
    "C10dCommunicator::split returns once its part is connected: parts dropped at once do not break the next",
    "[c10d][adversarial]") {
  // From the hostile pass: a member that returned before its partner had connected, and dropped its
  // part, broke the partner's connecting ("Connection closed by peer") in 19 runs of 20.
  const auto errors = on_gloo(2, [](C10dCommunicator& comm) {
    for (int i = 0; i < 150; ++i) comm.split(i % 2, comm.rank());
    float one = 1.0f;
    comm.allreduce_sum(&one, 1);
    CHECK(one == 2.0f);
  });
  CHECK(errors == std::vector<std::string>(2));
}
