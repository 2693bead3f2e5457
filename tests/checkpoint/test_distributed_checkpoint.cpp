// SPDX-License-Identifier: MIT
// Sharded averages (polyak/core/shard_view.hpp) and their one-file checkpoints
// (polyak/checkpoint/distributed_checkpoint.hpp), over ThreadCommunicator: threads stand for ranks. The same
// checks run under mpirun in tests/mpi/test_mpi.cpp.
#include "polyak/checkpoint/distributed_checkpoint.hpp"
#include "polyak/core/shard_view.hpp"

#include <catch2/catch.hpp>

#include <cstdio>  // std::remove
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "polyak/core/averaged_model.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "support.hpp"

using polyak::AveragedModel;
using polyak::EMA;
using polyak::FlatLayout;
using polyak::ParameterList;
using polyak::ShardView;
using polyak::StateDict;
using polyak::ThreadCommunicator;

namespace {

using polyak_test::file_bytes;
using polyak_test::on_threads;
using polyak_test::temporary_path;

FlatLayout model_layout() {
  FlatLayout layout;
  layout.add("a", {3, 5}).add("b", {7}).add("c", {2, 2, 2}).add("d", {1});  // 31 scalars
  return layout;
}

/// The training model's flat scalar i at step t (any rank computes any of them).
float trained(int t, std::size_t i) {
  return static_cast<float>((static_cast<int>(i) * 37 + t * 11) % 97) / 8.0f;
}

constexpr int steps = 6;
constexpr double decay = 0.75;

/// The reference: one process holding the whole model (real shapes), averaged with EMA.
std::string whole_model_file(const std::string& name) {
  const FlatLayout layout = model_layout();
  std::vector<float> flat(layout.numel());
  ParameterList<float> list;
  for (const auto& t : layout.tensors())
    list.add(t.name, polyak::TensorView<float>(flat.data() + t.offset, t.shape));
  AveragedModel<float, EMA> ema(list, EMA(decay));
  for (int t = 0; t < steps; ++t) {
    for (std::size_t i = 0; i < flat.size(); ++i) flat[i] = trained(t, i);
    ema.update_parameters(list);
  }
  const std::string path = temporary_path(name);
  polyak::save_safetensors(path, ema.state_dict());
  return path;
}

/// Member r's range when `ranges` cuts the flat model: [ranges[r], ranges[r + 1]).
struct Cut {
  std::vector<std::size_t> bounds;
  std::size_t begin(int r) const { return bounds[static_cast<std::size_t>(r)]; }
  std::size_t end(int r) const { return bounds[static_cast<std::size_t>(r) + 1]; }
};

}  // namespace

TEST_CASE("an EMA kept on 4 shards writes the very file one process keeps of the whole model",
          "[shard][distributed_checkpoint]") {
  const std::string reference = whole_model_file("whole.safetensors");
  const std::string sharded = temporary_path("sharded4.safetensors");
  std::remove(sharded.c_str());
  const Cut cut{{0, 9, 9, 20, 31}};  // an empty shard, cuts inside a, c and between tensors
  const auto errors = on_threads(4, [&](ThreadCommunicator& comm) {
    const int r = comm.rank();
    std::vector<float> mine(cut.end(r) - cut.begin(r));
    ShardView<float> shard(model_layout(), mine.data(), cut.begin(r), cut.end(r), comm);
    AveragedModel<float, EMA> ema(shard.parameters(), EMA(decay));
    for (int t = 0; t < steps; ++t) {
      for (std::size_t i = 0; i < mine.size(); ++i) mine[i] = trained(t, cut.begin(r) + i);
      ema.update_parameters(shard.parameters());
    }
    polyak::save_distributed(sharded, ema.state_dict(), shard, comm);
  });
  CHECK(errors == std::vector<std::string>(4));
  CHECK(file_bytes(sharded) == file_bytes(reference));
  CHECK(!file_bytes(reference).empty());

  SECTION("loaded on 2 ranks and on 1, re-sliced, it saves the same bytes again") {
    for (const Cut& other : {Cut{{0, 16, 31}}, Cut{{0, 31}}}) {
      const int members = static_cast<int>(other.bounds.size()) - 1;
      CAPTURE(members);
      const std::string again = temporary_path("again.safetensors");
      std::remove(again.c_str());
      std::vector<std::vector<float>> averages(static_cast<std::size_t>(members));
      const auto load_errors = on_threads(members, [&](ThreadCommunicator& comm) {
        const int r = comm.rank();
        std::vector<float> mine(other.end(r) - other.begin(r), 0.0f);
        ShardView<float> shard(model_layout(), mine.data(), other.begin(r), other.end(r), comm);
        AveragedModel<float, EMA> ema(shard.parameters(), EMA(decay));
        polyak::load_distributed(ema, sharded, shard, comm);
        ema.copy_to(shard.parameters());
        averages[static_cast<std::size_t>(r)] = mine;
        polyak::save_distributed(again, ema.state_dict(), shard, comm);
      });
      CHECK(load_errors == std::vector<std::string>(static_cast<std::size_t>(members)));
      CHECK(file_bytes(again) == file_bytes(reference));
    }
  }

  SECTION("a plain load_safetensors reads it into the whole model") {
    const FlatLayout layout = model_layout();
    std::vector<float> flat(layout.numel(), 0.0f);
    ParameterList<float> list;
    for (const auto& t : layout.tensors())
      list.add(t.name, polyak::TensorView<float>(flat.data() + t.offset, t.shape));
    AveragedModel<float, EMA> ema(list, EMA(decay));
    ema.load_state_dict(polyak::load_safetensors(sharded));
    CHECK(ema.n_averaged() == steps);
  }
}

TEST_CASE("distributed saves and loads refuse disagreeing members and bad files everywhere, changing nothing",
          "[shard][distributed_checkpoint]") {
  const std::string reference = whole_model_file("whole_for_hostile.safetensors");
  const Cut cut{{0, 16, 31}};

  SECTION("members whose n_averaged differ: nothing is written") {
    const std::string path = temporary_path("disagree.safetensors");
    std::remove(path.c_str());
    const auto errors = on_threads(2, [&](ThreadCommunicator& comm) {
      const int r = comm.rank();
      std::vector<float> mine(cut.end(r) - cut.begin(r), 1.0f);
      ShardView<float> shard(model_layout(), mine.data(), cut.begin(r), cut.end(r), comm);
      AveragedModel<float, EMA> ema(shard.parameters(), EMA(decay));
      for (int t = 0; t <= r; ++t) ema.update_parameters(shard.parameters());
      polyak::save_distributed(path, ema.state_dict(), shard, comm);
    });
    for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("the members' states differ"));
    CHECK(!std::filesystem::exists(path));
  }

  SECTION("a truncated file, a missing one, another shape: refused on every member, models unchanged") {
    const std::string good = file_bytes(reference);
    const std::string truncated = temporary_path("truncated.safetensors");
    polyak_test::write_file(truncated, good.substr(0, good.size() - 9));
    FlatLayout wider;  // "a" of another shape
    wider.add("a", {5, 3}).add("b", {7}).add("c", {2, 2, 2}).add("d", {1});
    struct Case {
      std::string path;
      FlatLayout layout;
      const char* message;
    };
    const std::vector<Case> cases = {
        {truncated, model_layout(), "ranks 0, 1 failed"},
        {temporary_path("missing.safetensors"), model_layout(), "cannot open"},
        {reference, wider, "has shape [3, 5] in the file where the layout has [5, 3]"}};
    for (const Case& c : cases) {
      CAPTURE(c.message);
      std::vector<std::vector<float>> after(2);
      const auto errors = on_threads(2, [&](ThreadCommunicator& comm) {
        const int r = comm.rank();
        std::vector<float> mine(cut.end(r) - cut.begin(r), 2.0f);
        ShardView<float> shard(c.layout, mine.data(), cut.begin(r), cut.end(r), comm);
        AveragedModel<float, EMA> ema(shard.parameters(), EMA(decay));
        polyak::load_distributed(ema, c.path, shard, comm);
      });
      for (const auto& e : errors)
        CHECK_THAT(e, Catch::Contains(c.message) && Catch::Contains("nothing was loaded"));
    }
  }

  SECTION("members that read different files at one path (a stale copy on one node): refused everywhere") {
    // Issue 21, item 3: only names and offsets were compared, so a copy of another save with the same
    // layout loaded n_averaged 5 and its values on one member beside 6 and the new values on the other.
    const StateDict whole = polyak::load_safetensors(reference);
    const auto variant = [&](const std::string& name, bool other_count, bool other_values) {
      StateDict sd;
      sd.metadata = whole.metadata;
      for (const auto& [entry, tensor] : whole) {
        if (entry == "n_averaged" && other_count) {
          sd.insert_scalar<std::int64_t>(entry, whole.scalar<std::int64_t>(entry) - 1);
        } else if (entry != "n_averaged" && other_values) {
          std::vector<float> values(tensor.numel());
          std::memcpy(values.data(), tensor.owned().bytes.data(), tensor.byte_size());
          for (auto& v : values) v = v * 2 + 1;
          sd.insert(entry, values.data(), tensor.shape);
        } else {
          sd.insert(entry, tensor.owned());
        }
      }
      const std::string path = temporary_path(name);
      polyak::save_safetensors(path, sd);
      return path;
    };
    const std::string same = variant("copy.safetensors", false, false);
    const std::vector<std::pair<std::string, bool>> cases{
        {same, true},  // a faithful copy loads
        {variant("stale_count.safetensors", true, false), false},
        {variant("stale_values.safetensors", false, true), false},
        {variant("stale_both.safetensors", true, true), false}};
    for (const auto& c : cases) {
      const std::string& other = c.first;  // (named variables: lambdas cannot capture bindings)
      const bool loads = c.second;
      CAPTURE(other);
      std::vector<std::int64_t> n_averaged(2, -1);
      const auto errors = on_threads(2, [&](ThreadCommunicator& comm) {
        const int r = comm.rank();
        std::vector<float> mine(cut.end(r) - cut.begin(r), 4.0f);
        ShardView<float> shard(model_layout(), mine.data(), cut.begin(r), cut.end(r), comm);
        AveragedModel<float, EMA> ema(shard.parameters(), EMA(decay));
        ema.update_parameters(shard.parameters());
        try {
          polyak::load_distributed(ema, r == 0 ? reference : other, shard, comm);
        } catch (...) {
          n_averaged[static_cast<std::size_t>(r)] = ema.n_averaged();
          throw;
        }
        n_averaged[static_cast<std::size_t>(r)] = ema.n_averaged();
      });
      for (const auto& e : errors) {
        if (loads) {
          CHECK(e.empty());
        } else {
          CHECK_THAT(e, Catch::Contains("the members read different files") &&
                            Catch::Contains("nothing was loaded"));
        }
      }
      CHECK(n_averaged == std::vector<std::int64_t>(2, loads ? steps : 1));
    }
  }

  SECTION("one member's model refuses the state: the other is put back as it was") {
    std::vector<std::vector<float>> after(2);
    std::vector<std::int64_t> n_averaged(2);
    const auto errors = on_threads(2, [&](ThreadCommunicator& comm) {
      const int r = comm.rank();
      std::vector<float> mine(cut.end(r) - cut.begin(r), 3.0f);
      ShardView<float> shard(model_layout(), mine.data(), cut.begin(r), cut.end(r), comm);
      AveragedModel<float, EMA> ema(shard.parameters(), EMA(r == 1 ? 0.5 : decay));  // rank 1: another decay
      ema.update_parameters(shard.parameters());
      try {
        polyak::load_distributed(ema, reference, shard, comm);
      } catch (...) {
        ema.copy_to(shard.parameters());
        after[static_cast<std::size_t>(r)] = mine;
        n_averaged[static_cast<std::size_t>(r)] = ema.n_averaged();
        throw;
      }
    });
    for (const auto& e : errors)
      CHECK_THAT(e, Catch::Contains("rank 1 failed") && Catch::Contains("no member's model changed"));
    for (int r = 0; r < 2; ++r) {
      CHECK(after[static_cast<std::size_t>(r)] == std::vector<float>(cut.end(r) - cut.begin(r), 3.0f));
      CHECK(n_averaged[static_cast<std::size_t>(r)] == 1);
    }
  }
}

TEST_CASE("load_distributed_state gives each member its piece of every layout tensor and the rest whole",
          "[shard][distributed_checkpoint]") {
  const std::string reference = whole_model_file("whole_for_state.safetensors");
  const StateDict whole = polyak::load_safetensors(reference);
  const FlatLayout layout = model_layout();
  std::vector<double> flat;  // the whole average, laid out flat as the layout lays it
  for (const auto& tensor : layout.tensors()) {
    const auto values = polyak::to_doubles(whole.at("module." + tensor.name));
    flat.insert(flat.end(), values.begin(), values.end());
  }
  std::vector<StateDict> loaded(3);
  const auto errors = on_threads(3, [&](ThreadCommunicator& comm) {
    const polyak::ShardRange range = polyak::even_shard(31, comm.rank(), comm.size());  // 11, 10, 10
    std::vector<float> mine(range.end - range.begin);
    ShardView<float> shard(model_layout(), mine.data(), range.begin, range.end, comm);
    loaded[static_cast<std::size_t>(comm.rank())] = polyak::load_distributed_state(reference, shard, comm);
  });
  CHECK(errors == std::vector<std::string>(3));
  for (int r = 0; r < 3; ++r) {
    const polyak::ShardRange range = polyak::even_shard(31, r, 3);
    const StateDict& sd = loaded[static_cast<std::size_t>(r)];
    std::vector<double> pieces;
    for (const auto& tensor : layout.tensors()) {
      const auto piece = polyak::to_doubles(sd.at("module." + tensor.name));
      pieces.insert(pieces.end(), piece.begin(), piece.end());
    }
    CHECK(pieces == std::vector<double>(flat.begin() + static_cast<std::ptrdiff_t>(range.begin),
                                        flat.begin() + static_cast<std::ptrdiff_t>(range.end)));
    CHECK(sd.scalar<std::int64_t>("n_averaged") == steps);  // not a piece: whole on every member
    CHECK(sd.metadata == whole.metadata);
  }
}
