// SPDX-License-Identifier: MIT
// Merges on several threads (MergeOptions::threads): a tensor's last pass, the ranked methods' rank
// keys and SCE's spreads are split over threads by spans of merge_lane_span scalars, and the sums stay
// on one thread. What must hold: the same bytes whatever the thread count, every method and dtype,
// in memory and streamed; an error in a later span reported as a serial merge reports it, with
// nothing written; the count checked.
#include "polyak/checkpoint/merge.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "support.hpp"

namespace {

using polyak::MergeMethod;
using polyak::MergeOptions;
using polyak::StateDict;

constexpr std::size_t span = polyak::detail::merge_lane_span;

/// Model k: a float tensor of two spans (one of them 33 scalars), a small one and an integer counter;
/// with `dtypes`, also a double tensor and a bfloat16 one of two spans. Values differ by model, with
/// zeros, NaN and infinity at model-dependent places (and at the spans' edge).
StateDict model(int k, bool dtypes = false) {
  StateDict sd;
  const auto value = [k](std::size_t i) {
    if (i % 7 == 0) return 0.0;
    return 0.25 * k + std::sin(static_cast<double>(i) * (0.37 + 0.11 * k)) * (i % 3 == 0 ? 0.5 : 1.0);
  };
  std::vector<float> f(span + 33);
  for (std::size_t i = 0; i < f.size(); ++i) f[i] = static_cast<float>(value(i));
  f[span - 1] = std::numeric_limits<float>::quiet_NaN();
  f[span + 1 + static_cast<std::size_t>(k)] = std::numeric_limits<float>::infinity();
  sd.insert("big", f.data(), {static_cast<std::int64_t>(f.size())});
  sd.insert("small", f.data(), {100, 10});
  sd.insert_scalar("steps", static_cast<std::int64_t>(10 + k));
  if (dtypes) {
    std::vector<double> d(span + 3);
    for (std::size_t i = 0; i < d.size(); ++i) d[i] = value(i + 11);
    sd.insert("wide", d.data(), {static_cast<std::int64_t>(d.size() / 3), 3});
    std::vector<Eigen::bfloat16> h(span + 7);
    for (std::size_t i = 0; i < h.size(); ++i) h[i] = Eigen::bfloat16(static_cast<float>(value(i + 5)));
    sd.insert("half", h.data(), {static_cast<std::int64_t>(h.size())});
  }
  return sd;
}

/// One tensor of `numel` scalars merged by merge_tensor from `read` (the base's input last) into
/// bytes of `dtype`, in `work` (so that a test can merge again in the same workspace and read it).
std::vector<std::byte> merge_into_bytes(const MergeOptions& o, std::size_t models, std::size_t numel,
                                        polyak::DType dtype, const polyak::detail::TensorSource& read,
                                        polyak::detail::MergeWorkspace& work) {
  const std::size_t element = polyak::dtype_size(dtype);
  std::vector<std::byte> out(numel * element);
  polyak::detail::merge_tensor(
      o, models, "w", {static_cast<std::int64_t>(numel)}, numel, dtype, true, read,
      [&](const std::byte* bytes, std::size_t begin, std::size_t count) {
        std::memcpy(out.data() + begin * element, bytes, count * element);
      },
      work);
  return out;
}

/// `method` with the settings the benchmark uses (a fifth kept by the sparsified ones).
MergeOptions options_for(MergeMethod method, unsigned threads) {
  MergeOptions o;
  o.method = method;
  o.threads = threads;
  const polyak::Sparsification rule = polyak::sparsification_of(method);
  if (rule == polyak::Sparsification::RankSampling) o.density = 0.5;
  if (rule == polyak::Sparsification::Random || rule == polyak::Sparsification::Magnitude ||
      rule == polyak::Sparsification::Outliers)
    o.density = 0.2;
  if (rule == polyak::Sparsification::Random || rule == polyak::Sparsification::RankSampling) o.seed = 99;
  if (method == MergeMethod::NearSwap) o.t = 0.01;
  if (method == MergeMethod::Sce) o.select_topk = 0.5;
  return o;
}

/// How many of the models `method` merges here.
std::size_t models_for(MergeMethod method) {
  return method == MergeMethod::NearSwap || method == MergeMethod::Passthrough ? 1 : 2;
}

}  // namespace

TEST_CASE("every method merges the same bytes on 1 and 2 threads", "[merge][threads]") {
  // (DELLA's threaded passes are TIES's, its row sort on one thread; it is left out here for time: at
  // -O0 it took half of this case)
  const StateDict a = model(0), b = model(1), base = model(3);
  for (const MergeMethod method : polyak::all_merge_methods) {
    if (method == MergeMethod::Della || method == MergeMethod::DellaLinear) continue;
    std::vector<const StateDict*> inputs = {&a, &b};
    inputs.resize(models_for(method));
    const StateDict* with = polyak::needs_base(method) ? &base : nullptr;
    const StateDict serial = polyak::merge_state_dicts(inputs, with, options_for(method, 1));
    const StateDict threaded = polyak::merge_state_dicts(inputs, with, options_for(method, 2));
    for (const auto& [name, tensor] : serial) {
      INFO(polyak::to_string(method) << ", tensor " << name);
      const bool same = threaded.at(name).bytes == tensor.bytes;  // (not the megabytes, if they differ)
      CHECK(same);
    }
  }
}

TEST_CASE("DELLA's rows, spread over threads, keep by their ranks as one row at a time would",
          "[merge][threads][della]") {
  // Rows of 1001 (no multiple of 64: a row's bits share words of the kept mask with its neighbours')
  // over three spans, rows straddling the spans' edges. Most draws are decided by the bounds of
  // their key's bucket on their rank, the rest by the rank; so the values: magnitudes that repeat
  // within a row (the ties rank by position, and buckets hold many equal keys); spread over many
  // sizes, zeros among them (most draws decided by the bounds); every magnitude equal (one bucket,
  // every draw by its rank); and epsilon 0 (one keep probability for every rank).
  // The reference ranks each row with std::stable_sort, on its own.
  const std::size_t rows = 1100, columns = 1001, numel = rows * columns;
  REQUIRE(numel > 2 * span);
  const std::vector<std::int64_t> shape = {static_cast<std::int64_t>(rows),
                                           static_cast<std::int64_t>(columns)};
  struct Case {
    const char* values;
    double epsilon;
    bool both_rescales;
  };
  for (const Case& c : {Case{"repeating", 0.3, true}, Case{"spread", 0.3, false}, Case{"equal", 0.3, false},
                        Case{"spread", 0.0, false}}) {
    std::vector<float> x(numel);
    const std::string values = c.values;
    for (std::size_t i = 0; i < numel; ++i) {
      if (values == "repeating") {
        x[i] = static_cast<float>((i * 7919) % 613) * ((i * 31) % 5 == 0 ? -0.5f : 0.25f);
      } else if (values == "spread") {  // (a sine's values over a range of exponents; a zero in 13)
        x[i] = i % 13 == 0 ? 0.0f
                           : static_cast<float>(std::sin(static_cast<double>(i) * 0.7) *
                                                std::exp2(static_cast<double>(i % 29) - 14));
      } else {
        x[i] = i % 2 == 0 ? 1.5f : -1.5f;
      }
    }
    StateDict model_x, zero;
    model_x.insert("w", x.data(), shape);
    const std::vector<float> zeros(numel, 0.0f);
    zero.insert("w", zeros.data(), shape);
    MergeOptions o;
    o.method = MergeMethod::DellaLinear;
    o.density = 0.4;
    o.epsilon = c.epsilon;
    o.seed = 17;
    // The kept scalars: per row, rank r ascending by magnitude (equal ones: the later position
    // first), kept where the draw is at least 1 - (density - epsilon + 2 epsilon r / (columns - 1)).
    std::vector<bool> keep(numel);
    const std::uint64_t key = polyak::detail::draw_key(o.seed, "w", 0);
    double norm = 0, kept_norm = 0;
    std::vector<std::size_t> order(columns);
    for (std::size_t row = 0; row < rows; ++row) {
      const float* v = x.data() + row * columns;
      for (std::size_t k = 0; k < columns; ++k) order[k] = columns - 1 - k;
      std::stable_sort(order.begin(), order.end(),
                       [&](std::size_t a, std::size_t b) { return std::abs(v[a]) < std::abs(v[b]); });
      for (std::size_t r = 0; r < columns; ++r) {
        const std::size_t at = row * columns + order[r];
        const double p = o.density - o.epsilon + 2 * o.epsilon * static_cast<double>(r) / (columns - 1.0);
        keep[at] = polyak::detail::uniform_draw(key, at) >= 1 - p;
      }
    }
    std::size_t kept = 0;
    for (std::size_t i = 0; i < numel; ++i) {
      norm += std::abs(x[i]);
      kept_norm += keep[i] ? std::abs(x[i]) : 0;
      kept += keep[i];
    }
    CAPTURE(c.values, c.epsilon);
    CHECK(std::abs(static_cast<double>(kept) - 0.4 * numel) < 5 * std::sqrt(numel * 0.4 * 0.6));
    for (const bool rescale : {true, false}) {
      if (!rescale && !c.both_rescales) continue;
      o.rescale = rescale;
      const double factor = rescale ? norm / kept_norm : 1.0;  // (summed in another order: to 1e-6)
      for (const unsigned threads : {1u, 2u, 3u}) {
        o.threads = threads;
        std::vector<float> merged(numel);
        polyak::merge_state_dicts({&model_x}, &zero, o).copy_to("w", merged.data(), shape);
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < numel; ++i) {
          const double expected = keep[i] ? x[i] * factor : 0.0;
          wrong += std::abs(merged[i] - expected) > 1e-6 * std::abs(expected);
        }
        CAPTURE(rescale, threads);
        CHECK(wrong == 0);
      }
    }
  }
}

TEST_CASE("Model Stock's rows, summed on threads, give each row its own t, on any thread count",
          "[merge][threads][model_stock]") {
  // filter_wise: t = n cos / (1 + (n - 1) cos) per row, cos the mean pairwise cosine of the rows'
  // task vectors; rows of 1001 over three spans, the rows straddling the spans' edges, and a
  // one-group tensor of three spans (summed in spans). The reference sums each row on its own.
  const std::size_t rows = 1100, columns = 1001, numel = rows * columns, models = 3;
  const std::vector<std::int64_t> shape = {static_cast<std::int64_t>(rows),
                                           static_cast<std::int64_t>(columns)};
  std::vector<std::vector<float>> x(models + 1, std::vector<float>(numel));  // (the last: the base)
  for (std::size_t m = 0; m <= models; ++m) {
    for (std::size_t i = 0; i < numel; ++i) {
      const double row = static_cast<double>(i / columns);
      x[m][i] = static_cast<float>(std::sin(static_cast<double>(i) * (0.3 + 0.07 * static_cast<double>(m))) +
                                   (m == models ? 0.0 : 0.001 * row * static_cast<double>(m + 1)));
    }
  }
  std::vector<StateDict> inputs(models + 1);
  for (std::size_t m = 0; m <= models; ++m) {
    inputs[m].insert("w", x[m].data(), shape);
    inputs[m].insert("flat", x[m].data(), {static_cast<std::int64_t>(numel)});
  }
  const auto t_of = [&](std::size_t begin, std::size_t end) {
    std::vector<double> dot(models * models, 0.0);
    for (std::size_t i = begin; i < end; ++i) {
      for (std::size_t a = 0; a < models; ++a)
        for (std::size_t b = 0; b < models; ++b)
          dot[a * models + b] +=
              (static_cast<double>(x[a][i]) - x[models][i]) * (static_cast<double>(x[b][i]) - x[models][i]);
    }
    double cosine = 0;
    for (std::size_t a = 0; a < models; ++a)
      for (std::size_t b = a + 1; b < models; ++b)
        cosine += dot[a * models + b] / std::sqrt(dot[a * models + a] * dot[b * models + b]);
    cosine /= 3.0;  // (3 pairs)
    return 3.0 * cosine / (1 + 2 * cosine);
  };
  std::vector<double> row_t(rows);
  for (std::size_t r = 0; r < rows; ++r) row_t[r] = t_of(r * columns, (r + 1) * columns);
  const double flat_t = t_of(0, numel);
  MergeOptions o;
  o.method = MergeMethod::ModelStock;
  o.filter_wise = true;
  std::vector<float> first_w, first_flat;
  for (const unsigned threads : {1u, 2u, 3u}) {
    o.threads = threads;
    const StateDict merged =
        polyak::merge_state_dicts({&inputs[0], &inputs[1], &inputs[2]}, &inputs[models], o);
    std::vector<float> w(numel), flat(numel);
    merged.copy_to("w", w.data(), shape);
    merged.copy_to("flat", flat.data(), {static_cast<std::int64_t>(numel)});
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < numel; ++i) {
      const double mean = (static_cast<double>(x[0][i]) + x[1][i] + x[2][i]) / 3.0;
      const double t = row_t[i / columns];
      const double expected = t * mean + (1 - t) * x[models][i];
      const double expected_flat = flat_t * mean + (1 - flat_t) * x[models][i];
      wrong += std::abs(w[i] - expected) > 1e-5 * (1 + std::abs(expected));
      wrong += std::abs(flat[i] - expected_flat) > 1e-5 * (1 + std::abs(expected_flat));
    }
    CAPTURE(threads);
    CHECK(wrong == 0);
    if (threads == 1) {
      first_w = w;
      first_flat = flat;
    }
    CHECK(w == first_w);  // (the same bytes on any thread count)
    CHECK(flat == first_flat);
  }
}

TEST_CASE("NuSLERP's rows, summed on threads, each get their own angle, on any thread count",
          "[merge][threads][nuslerp]") {
  // Not flattened: one angle a row of 1001 (rows straddle the three spans' edges); flattened, one
  // angle for the tensor, summed in spans. The reference: slerp at t = 1/2 from each row's sums.
  const std::size_t rows = 1100, columns = 1001, numel = rows * columns;
  const std::vector<std::int64_t> shape = {static_cast<std::int64_t>(rows),
                                           static_cast<std::int64_t>(columns)};
  std::vector<float> a(numel), b(numel);
  for (std::size_t i = 0; i < numel; ++i) {
    const double turn = 0.001 * static_cast<double>(i / columns);  // (the rows' angles differ)
    a[i] = static_cast<float>(std::sin(static_cast<double>(i) * 0.37));
    b[i] = static_cast<float>(std::cos(turn) * a[i] +
                              std::sin(turn + 0.2) * std::cos(static_cast<double>(i) * 0.11));
  }
  StateDict model_a, model_b;
  model_a.insert("w", a.data(), shape);
  model_b.insert("w", b.data(), shape);
  const auto slerp_of = [&](std::size_t begin, std::size_t end, std::vector<double>& out) {
    double dot = 0, aa = 0, bb = 0;
    for (std::size_t i = begin; i < end; ++i) {
      dot += static_cast<double>(a[i]) * b[i];
      aa += static_cast<double>(a[i]) * a[i];
      bb += static_cast<double>(b[i]) * b[i];
    }
    const double theta = std::acos(std::clamp(dot / std::sqrt(aa * bb), -1.0, 1.0));
    const double s = std::sin(theta / 2) / std::sin(theta);
    for (std::size_t i = begin; i < end; ++i) out[i] = s * (static_cast<double>(a[i]) + b[i]);
  };
  std::vector<double> by_row(numel), whole(numel);
  for (std::size_t r = 0; r < rows; ++r) slerp_of(r * columns, (r + 1) * columns, by_row);
  slerp_of(0, numel, whole);
  MergeOptions o;
  o.method = MergeMethod::NuSlerp;
  for (const bool flatten : {false, true}) {
    o.nuslerp_flatten = flatten;
    const std::vector<double>& expected = flatten ? whole : by_row;
    std::vector<float> first;
    for (const unsigned threads : {1u, 2u, 3u}) {
      o.threads = threads;
      std::vector<float> merged(numel);
      polyak::merge_state_dicts({&model_a, &model_b}, nullptr, o).copy_to("w", merged.data(), shape);
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < numel; ++i)
        wrong += std::abs(merged[i] - expected[i]) > 1e-5 * (1 + std::abs(expected[i]));
      CAPTURE(flatten, threads);
      CHECK(wrong == 0);
      if (threads == 1) first = merged;
      CHECK(merged == first);
    }
  }
}

TEST_CASE("a streamed merge writes the same file on 1 and 3 threads, in every dtype", "[merge][threads]") {
  polyak_test::TemporaryFolder folder("merge_threads");
  const std::vector<std::string> paths = {folder / "a.safetensors", folder / "b.safetensors"};
  for (int k = 0; k < 2; ++k) polyak::save_safetensors(paths[static_cast<std::size_t>(k)], model(k, true));
  polyak::save_safetensors(folder / "base.safetensors", model(3, true));
  // (TIES: both of the passes that read in threads, the rank keys and the last; every method's
  // arithmetic on threads is in the case above)
  for (const MergeMethod method : {MergeMethod::Ties}) {
    const std::string base = polyak::needs_base(method) ? folder / "base.safetensors" : "";
    polyak::merge_checkpoints(paths, base, options_for(method, 1), folder / "serial.safetensors");
    polyak::merge_checkpoints(paths, base, options_for(method, 3), folder / "threaded.safetensors");
    INFO(polyak::to_string(method));
    const std::string serial = polyak_test::file_bytes(folder / "serial.safetensors");
    CHECK(serial.size() > 14 * span);  // (the merge wrote the tensors: 4 + 8 + 2 bytes a scalar)
    const bool same = polyak_test::file_bytes(folder / "threaded.safetensors") == serial;
    CHECK(same);
  }
}

TEST_CASE("an overflow in a later span is refused as on one thread, nothing written", "[merge][threads]") {
  // One nonzero task value, 1e30, in the third span; lambda 1e10 makes it 1e40, beyond float.
  polyak_test::TemporaryFolder folder("merge_threads_error");
  std::vector<float> zero(3 * span + 5, 0.0f), one = zero;
  one[2 * span + 17] = 1e30f;
  StateDict m, b;
  m.insert("w", one.data(), {static_cast<std::int64_t>(one.size())});
  b.insert("w", zero.data(), {static_cast<std::int64_t>(zero.size())});
  polyak::save_safetensors(folder / "m.safetensors", m);
  polyak::save_safetensors(folder / "b.safetensors", b);
  const std::string out = folder / "out.safetensors";
  polyak_test::write_file(out, "the user's earlier file");
  std::vector<std::string> messages;
  for (const unsigned threads : {1u, 2u, 3u}) {
    MergeOptions o;
    o.method = MergeMethod::TaskArithmetic;
    o.scale = 1e10;
    o.threads = threads;
    try {
      polyak::merge_checkpoints({folder / "m.safetensors"}, folder / "b.safetensors", o, out);
      FAIL("the overflow was not refused on " << threads << " threads");
    } catch (const polyak::InvalidArgument& e) {
      messages.push_back(e.what());
    }
    CHECK(polyak_test::file_bytes(out) == "the user's earlier file");
  }
  CHECK_THAT(messages[0], Catch::Contains("beyond F32's range"));
  CHECK(messages[1] == messages[0]);
  CHECK(messages[2] == messages[0]);
  std::size_t entries = 0;
  for (const auto& entry : std::filesystem::directory_iterator(folder.path()))
    entries += !entry.is_directory();
  CHECK(entries == 3);  // m, b and the user's file: no temporary left
}

TEST_CASE("of errors in several spans, the earliest is reported, whatever the thread count",
          "[merge][threads]") {
  // Overflows (task values 1e30 and more, lambda 1e10) at the end of span 1 and in spans 2 and 3 of
  // four: with 2 threads spans 1 and 3 are the second lane's, span 2 the first's; with 3, each is a
  // lane's own. Span 1 is otherwise NaN (carried, not refused, but checked one by one: slow), so the
  // first lane meets its error in span 2 before the second meets span 1's. Every merge must report
  // span 1's value, 3e40 (the others: 1e40, 2e40), as the serial merge finds it first.
  std::vector<float> zero(4 * span, 0.0f), one = zero;
  std::fill(one.begin() + span, one.begin() + 2 * span, std::numeric_limits<float>::quiet_NaN());
  one[2 * span - 1] = 3e30f;
  one[2 * span + 17] = 1e30f;
  one[3 * span + 1] = 2e30f;
  StateDict m, b;
  m.insert("w", one.data(), {static_cast<std::int64_t>(one.size())});
  b.insert("w", zero.data(), {static_cast<std::int64_t>(zero.size())});
  std::vector<std::string> messages;
  for (const unsigned threads : {1u, 2u, 3u, 4u}) {
    MergeOptions o;
    o.method = MergeMethod::TaskArithmetic;
    o.scale = 1e10;
    o.threads = threads;
    try {
      static_cast<void>(polyak::merge_state_dicts({&m}, &b, o));
      FAIL("the overflow was not refused on " << threads << " threads");
    } catch (const polyak::InvalidArgument& e) {
      messages.push_back(e.what());
    }
  }
  REQUIRE(messages.size() == 4);
  CHECK_THAT(messages[0], Catch::Contains("merges to 2.99999"));  // (3e30f is 2.99999989e30)
  for (std::size_t k = 1; k < messages.size(); ++k) CHECK(messages[k] == messages[0]);
}

TEST_CASE("where the system starts no thread, a merge runs its spans on the calling thread, same bytes",
          "[merge][threads]") {
  // One thread for the user, the process's own: no helper thread and no output writer can start.
  polyak_test::TemporaryFolder folder("merge_threads_limit");
  std::filesystem::permissions(folder.path(), std::filesystem::perms::all);  // (nobody writes here)
  const StateDict a = model(0, true), b = model(1, true), base = model(3, true);
  polyak::save_safetensors(folder / "a.safetensors", a);
  polyak::save_safetensors(folder / "b.safetensors", b);
  polyak::save_safetensors(folder / "base.safetensors", base);
  const std::vector<std::string> paths = {folder / "a.safetensors", folder / "b.safetensors"};
  const MergeOptions serial = options_for(MergeMethod::Ties, 1), wide = options_for(MergeMethod::Ties, 4);
  const std::string expected_file = [&] {
    polyak::merge_checkpoints(paths, folder / "base.safetensors", serial, folder / "serial.safetensors");
    return polyak_test::file_bytes(folder / "serial.safetensors");
  }();
  const auto expected = polyak::merge_state_dicts({&a, &b}, &base, serial);
  const polyak_test::Limited result = polyak_test::with_thread_limit(1, [&] {
    const StateDict merged = polyak::merge_state_dicts({&a, &b}, &base, wide);
    bool in_memory = true;
    for (const char* name : {"big", "wide", "half", "small"})
      in_memory = in_memory && merged.at(name).bytes == expected.at(name).bytes;
    polyak::merge_checkpoints(paths, folder / "base.safetensors", wide, folder / "limited.safetensors");
    return in_memory && polyak_test::file_bytes(folder / "limited.safetensors") == expected_file;
  });
  if (result == polyak_test::Limited::not_limited) {
    WARN("skipped: no limit on threads could be imposed here (root that cannot become nobody)");
    return;
  }
  CHECK(result == polyak_test::Limited::passed);
}

TEST_CASE("the thread count is checked: 0 to 64", "[merge][threads]") {
  const StateDict a = model(0), b = model(1);
  MergeOptions o;
  o.threads = 65;
  CHECK_THROWS_WITH(polyak::merge_state_dicts({&a, &b}, nullptr, o),
                    Catch::Contains("threads must be in [0, 64]"));
  o.threads = 64;  // (more threads than spans: the spans there are)
  const bool same = polyak::merge_state_dicts({&a, &b}, nullptr, o).at("big").bytes ==
                    polyak::merge_state_dicts({&a, &b}, nullptr, MergeOptions{}).at("big").bytes;
  CHECK(same);
  using polyak::detail::merge_lanes;
  constexpr std::size_t span = polyak::detail::merge_lane_span;
  CHECK(merge_lanes(MergeOptions{}, 100 * span) >= 1);
  CHECK(merge_lanes(MergeOptions{}, 100 * span) <= 4);
  CHECK(merge_lanes(o, 0) == 1);  // as many lanes as spans, and an empty tensor one
  CHECK(merge_lanes(o, span) == 1);
  CHECK(merge_lanes(o, span + 1) == 2);
  CHECK(merge_lanes(o, 100 * span) == 64);
  o.threads = 1;
  CHECK(merge_lanes(o, 100 * span) == 1);
}

TEST_CASE("DARE's rescaled methods merge the same bytes with their task values held and read again",
          "[merge][threads]") {
  // Where every model's task values fit MergeWorkspace::held_limit, DARE-TIES and DARE-linear (whose
  // L1 norms read them before the last pass) hold them from a merge's second such tensor on, formed
  // in that pass; else the last pass reads the inputs again. Three models over three spans and more, with
  // NaN, infinity and zeros, per-model densities (0 and 1 among them), rescaled or not, on 1 and 3 threads:
  // the same bytes both ways, and the held way taken where a model rescales.
  const std::size_t numel = 2 * span + 1001, models = 3;
  std::vector<std::vector<double>> inputs(models + 1, std::vector<double>(numel));  // the base last
  for (std::size_t m = 0; m <= models; ++m) {
    for (std::size_t i = 0; i < numel; ++i) {
      const double v = std::sin(static_cast<double>(i) * (0.31 + 0.07 * static_cast<double>(m)));
      inputs[m][i] = i % 11 == 0 ? 0.0 : (i % 5 == m ? 2 * v : v);
    }
  }
  inputs[1][span + 3] = std::numeric_limits<double>::quiet_NaN();
  inputs[2][2 * span - 1] = std::numeric_limits<double>::infinity();
  // F64 also scaled by 2^600 (norms near 2^620).
  double scale = 1;
  const polyak::detail::TensorSource read = [&](std::size_t, std::size_t m, std::size_t begin,
                                                std::size_t count, double* out) {
    for (std::size_t j = 0; j < count; ++j) out[j] = inputs[m][begin + j] * scale;
  };
  struct Case {
    std::vector<double> densities;
    bool rescale;
  };
  for (const auto& dtype_and_scale : {std::pair{polyak::DType::F32, 1.0}, std::pair{polyak::DType::F64, 1.0},
                                      std::pair{polyak::DType::F64, 0x1p600}}) {
    const polyak::DType dtype = dtype_and_scale.first;  // (not a structured binding: the lambdas capture it)
    scale = dtype_and_scale.second;
    for (const MergeMethod method : {MergeMethod::DareTies, MergeMethod::DareLinear}) {
      const std::vector<Case> cases = {Case{{1.0, 0.3, 0.6}, true}, Case{{0.0, 0.5, 1.0}, true},
                                       Case{{0.3, 0.3, 0.3}, false}};
      for (std::size_t k = 0; k < cases.size(); ++k) {
        // Every pair of settings, not every combination (each case on 1 and 3 threads, one per method):
        // the merges of a million scalars take 49 s under the sanitizers in CI otherwise.
        const Case& c = cases[k];
        const unsigned threads = (k + (method == MergeMethod::DareTies ? 0 : 1)) % 2 == 0 ? 1u : 3u;
        MergeOptions o;
        o.method = method;
        o.threads = threads;
        o.densities = c.densities;
        o.rescale = c.rescale;
        o.seed = 7;
        INFO(polyak::to_string(method)
             << ", " << polyak::dtype_name(dtype) << " scaled " << scale << ", densities " << c.densities[0]
             << " " << c.densities[1] << " " << c.densities[2] << ", rescale " << c.rescale << ", threads "
             << threads);
        // The tensor merged twice in one workspace (as a merge's tensors one after another): held
        // from the second on, where it fits.
        const auto merged_twice = [&](std::size_t held_limit, std::vector<bool>& held) {
          polyak::detail::MergeWorkspace work;
          work.held_limit = held_limit;
          std::vector<std::vector<std::byte>> outs;
          for (int time = 0; time < 2; ++time) {
            outs.push_back(merge_into_bytes(o, models, numel, dtype, read, work));
            held.push_back(work.held_capacity > 0);
          }
          return outs;
        };
        std::vector<bool> held, read_again;
        const auto from_held = merged_twice(polyak::detail::merge_held_bytes, held);
        const auto from_inputs = merged_twice(0, read_again);
        CHECK(held == std::vector<bool>{false, c.rescale});  // (density 1 does not rescale; the others do)
        CHECK(read_again == std::vector<bool>{false, false});
        const bool same = from_held[0] == from_inputs[0] && from_held[1] == from_inputs[0] &&
                          from_inputs[1] == from_inputs[0];
        CHECK(same);
      }
    }
  }
}

TEST_CASE("TIES and Breadcrumbs merge the same bytes with their rank keys held and streamed",
          "[merge][threads]") {
  // Without the L1 rescale, the ranked methods find each model's window of ranks as they count the
  // keys, from a sample (rank_window_streamed), where a tensor is large enough; the keys held
  // otherwise. Three models over two spans and more, NaN, infinity, zeros, ties, on 1 and 3 threads,
  // F32 and F64: the same bytes and windows both ways, the streamed way taken. With the first or the
  // last model frozen (equal to the base: every key 0) its window goes to the keys held, the others'
  // streamed, and each is freed before the other is taken (never both held).
  const std::size_t numel = 2 * span + 1001, models = 3;
  REQUIRE(numel >= polyak::detail::streamed_selection_min);
  std::vector<std::vector<double>> inputs(models + 1, std::vector<double>(numel));  // the base last
  for (const int frozen : {-1, 0, 2}) {  // (the model left frozen, if any)
    for (std::size_t k = 0; k <= models; ++k) {
      const std::size_t m = (k + models) % (models + 1);  // (the base first: the models' ties are against it)
      for (std::size_t i = 0; i < numel; ++i) {
        const double v = std::sin(static_cast<double>(i) * (0.31 + 0.07 * static_cast<double>(m)));
        inputs[m][i] = i % 11 == 0 ? 0.0 : i % 17 == 0 && m < models ? inputs[models][i] + 0.5 : v;  // (ties)
      }
    }
    inputs[1][span + 3] = std::numeric_limits<double>::quiet_NaN();
    inputs[2][2 * span - 1] = std::numeric_limits<double>::infinity();
    if (frozen >= 0) inputs[static_cast<std::size_t>(frozen)] = inputs[models];
    const polyak::detail::TensorSource read = [&](std::size_t, std::size_t m, std::size_t begin,
                                                  std::size_t count, double* out) {
      for (std::size_t j = 0; j < count; ++j) out[j] = inputs[m][begin + j];
    };
    // A few settings each, not every combination: each merge of a million scalars, three models, runs
    // twice, and in CI under the sanitizers too.
    struct Setting {
      polyak::DType dtype;
      double density;
      unsigned threads;
    };
    const std::vector<Setting> settings =
        frozen < 0 ? std::vector<Setting>{{polyak::DType::F32, 0.2, 3u},
                                          {polyak::DType::F64, 0.97, 1u},
                                          {polyak::DType::F32, 0.5, 1u}}
                   : std::vector<Setting>{{frozen == 0 ? polyak::DType::F64 : polyak::DType::F32, 0.5, 3u}};
    for (const MergeMethod method :
         {MergeMethod::Ties, MergeMethod::Breadcrumbs, MergeMethod::BreadcrumbsTies}) {
      for (const Setting& setting : settings) {
        const polyak::DType dtype = setting.dtype;
        const double density = setting.density;
        const unsigned threads = setting.threads;
        MergeOptions o;
        o.method = method;
        o.threads = threads;
        o.density = density;
        if (method != MergeMethod::Ties) o.gamma = 0.02;
        INFO(polyak::to_string(method) << ", " << polyak::dtype_name(dtype) << ", density " << density
                                       << ", threads " << threads << ", frozen " << frozen);
        struct Merged {
          std::vector<std::byte> bytes;
          std::vector<polyak::detail::RankWindow> windows;
          std::size_t streamed = 0, missed = 0;
          bool keys_held = false, candidates_held = false, found_held = false;
        };
        const auto merged = [&](bool streamed) {
          polyak::detail::MergeWorkspace work;
          work.streamed.enabled = streamed;
          Merged result;
          result.bytes = merge_into_bytes(o, models, numel, dtype, read, work);
          for (const auto& kept : work.kept) result.windows.push_back(kept.window);
          result.streamed = work.streamed.windows;
          result.missed = work.streamed.missed;
          result.keys_held = work.keys.capacity() > 0;
          result.candidates_held = work.streamed.room > 0;
          result.found_held = work.streamed.found.capacity() > 0;
          return result;
        };
        const Merged streamed = merged(true), held = merged(false);
        CHECK(streamed.streamed == (frozen >= 0 ? models - 1 : models));
        CHECK(streamed.missed == (frozen >= 0 ? 1u : 0u));
        // The last model's window streamed: the keys freed; left to the keys: the candidates freed.
        CHECK(streamed.keys_held == (frozen == 2));
        CHECK(streamed.candidates_held == (frozen != 2));
        CHECK(streamed.found_held == (frozen != 2));  // (a boundary bucket's keys: kept as the candidates)
        CHECK(held.streamed == 0);
        CHECK(streamed.bytes == held.bytes);
        REQUIRE(streamed.windows.size() == held.windows.size());
        for (std::size_t m = 0; m < models; ++m) {
          const auto& a = streamed.windows[m];
          const auto& b = held.windows[m];
          CHECK(std::tie(a.has_low, a.has_high, a.low, a.high, a.low_until, a.high_from) ==
                std::tie(b.has_low, b.has_high, b.low, b.high, b.low_until, b.high_from));
        }
      }
    }
  }
}

TEST_CASE("a DARE merge whose task values are held still refuses an overflow from finite inputs",
          "[merge][threads]") {
  // The last pass reads the base alone where the task values are held; whether a value past the
  // dtype's range came from finite inputs needs the inputs, read again for that piece.
  // 64 such scalars: the random methods keep some of them (all dropped: one chance in 2^64). A
  // tensor of zeros before it: the task values are held from a merge's second tensor on.
  std::vector<float> zero(2 * span + 5, 0.0f), one = zero, infinite = zero;
  std::fill_n(one.begin() + span + 17, 64, 1e30f);
  std::fill_n(infinite.begin() + span + 17, 64, std::numeric_limits<float>::infinity());
  StateDict m, b, i;
  const std::vector<std::int64_t> shape = {static_cast<std::int64_t>(zero.size())};
  for (StateDict* sd : {&m, &b, &i}) sd->insert("first", zero.data(), shape);
  m.insert("w", one.data(), shape);
  b.insert("w", zero.data(), shape);
  i.insert("w", infinite.data(), shape);
  for (const MergeMethod method : {MergeMethod::DareTies, MergeMethod::DareLinear}) {
    INFO(polyak::to_string(method));
    MergeOptions o;
    o.method = method;
    o.density = 0.5;
    o.scale = 1e10;  // 1e40: beyond float
    o.threads = 2;
    CHECK_THROWS_WITH(polyak::merge_state_dicts({&m, &b}, &b, o), Catch::Contains("beyond F32's range"));
    // An input that holds infinity: carried, not refused.
    const StateDict carried = polyak::merge_state_dicts({&i, &b}, &b, o);
    const std::vector<double> values = polyak::to_doubles(carried.at("w"));
    CHECK(std::any_of(values.begin() + span + 17, values.begin() + span + 81,
                      [](double v) { return std::isinf(v); }));
  }
}
