// SPDX-License-Identifier: MIT
// The inner products of a few vectors (the models' task vectors, piece by piece; SCE's sums of
// squares) summed in double, each addition's rounding error carried beside its sum: loops the compiler
// vectorizes, where the long double sums they replace ran on the x87 unit through memory (three
// quarters of a four-model Multi-SLERP merge). The products are those of doubles, each rounded once;
// the sums lose about one rounding of their total whatever their length (long double's lost up to one
// of its own, 2^-64, an addition). They hold while every vector's squared norm lies in [2^-800, 2^800]
// (or the vector is zero): no product nor sum then overflows (each is at most the product of two
// norms), and the products that underflow (each below 2^-1022, an error below 2^-1074) add up to under
// 2^-230 of the product of two norms even over 2^40 scalars. Past that range (F64 values only) the
// caller sums again in long double.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace polyak::detail {

/// Adds x to `sum` and the addition's rounding error, plus `known_error` (x's own where the caller
/// has it), to `error` (Knuth's two-sum: no branch).
inline void add_carrying_error(double x, double& sum, double& error, double known_error = 0.0) {
  const double total = sum + x, back = total - sum;
  error += ((sum - (total - back)) + (x - back)) + known_error;
  sum = total;
}

/// A sum in double and the rounding error of its additions, carried.
struct CompensatedSum {
  double sum = 0, error = 0;

  void add(double x) { add_carrying_error(x, sum, error); }
  void add(const CompensatedSum& part) {
    add(part.sum);
    error += part.error;
  }
  long double value() const { return static_cast<long double>(sum) + static_cast<long double>(error); }
};

/// The sums of v_a[j] v_b[j] over the scalars added so far, for every pair a <= b of `vectors`
/// vectors, and whether each vector is zero. Parts summed apart (spans, on threads) are added in a
/// fixed order by the caller: the result depends on that order, not on the threads.
class ProductSums {
 public:
  explicit ProductSums(std::size_t vectors)
      : vectors_(vectors), sums_(vectors * vectors), bits_(vectors, 0) {}

  /// Adds scalars [0, count) of each vector: v[a] points at vector a's (finite values).
  void add(const double* const* v, std::size_t count) {
    for (std::size_t a = 0; a < vectors_; ++a) {
      note_nonzero(a, v[a], count);
      for (std::size_t b = a; b < vectors_; ++b) add_products(v[a], v[b], count, sums_[a * vectors_ + b]);
    }
  }
  /// Adds the squares alone (v_a v_a; the sums of a != b are left as they are, unused), each taken
  /// exactly: its rounding error is carried with the sum's (SCE's weights are ratios of these sums,
  /// rounded once to double; squares rounded to double left them an ulp off in small F64 tensors).
  void add_squares(const double* const* v, std::size_t count) {
    for (std::size_t a = 0; a < vectors_; ++a) {
      note_nonzero(a, v[a], count);
      add_exact_squares(v[a], count, sums_[a * vectors_ + a]);
    }
  }
  /// Adds a part summed apart.
  void add(const ProductSums& part) {
    for (std::size_t i = 0; i < sums_.size(); ++i) sums_[i].add(part.sums_[i]);
    for (std::size_t a = 0; a < vectors_; ++a) bits_[a] |= part.bits_[a];
  }
  /// Whether every sum holds (the file comment's range); else the caller sums in long double.
  bool in_range() const {
    for (std::size_t a = 0; a < vectors_; ++a) {
      const long double square = at(a, a);
      if (bits_[a] != 0 && !(square >= 0x1p-800L && square <= 0x1p800L)) return false;
    }
    return true;
  }
  /// The sum of v_a v_b (a <= b).
  long double at(std::size_t a, std::size_t b) const { return sums_[a * vectors_ + b].value(); }
  /// The sums as a Gram matrix, vectors x vectors, row-major.
  std::vector<long double> gram() const {
    std::vector<long double> g(vectors_ * vectors_);
    for (std::size_t a = 0; a < vectors_; ++a)
      for (std::size_t b = a; b < vectors_; ++b) g[a * vectors_ + b] = g[b * vectors_ + a] = at(a, b);
    return g;
  }
  /// Back to no scalars added.
  void clear() {
    std::fill(sums_.begin(), sums_.end(), CompensatedSum{});
    std::fill(bits_.begin(), bits_.end(), std::uint64_t{0});
  }

 private:
  /// Notes in bits_[a] whether any of the `count` values of vector a is nonzero.
  void note_nonzero(std::size_t a, const double* values, std::size_t count) {
    std::uint64_t bits = 0;  // (an OR of the magnitudes' bits: 0 while every value is +-0)
    for (std::size_t j = 0; j < count; ++j) {
      std::uint64_t value = 0;
      std::memcpy(&value, values + j, sizeof value);
      bits |= value << 1;  // (the sign bit shifted out)
    }
    bits_[a] |= bits;
  }
  /// Adds terms [0, count) to `total`, add_term(j, sum, error) adding term j to a sum with its
  /// rounding error, in four interleaved sums (no chain of dependent additions).
  template <class AddTerm>
  static void add_interleaved(std::size_t count, AddTerm&& add_term, CompensatedSum& total) {
    constexpr std::size_t ways = 4;
    double sum[ways] = {}, error[ways] = {};
    const std::size_t whole = count - count % ways;
    for (std::size_t j = 0; j < whole; j += ways) {
      for (std::size_t k = 0; k < ways; ++k) add_term(j + k, sum[k], error[k]);
    }
    for (std::size_t j = whole; j < count; ++j) {
      double one = 0, one_error = 0;
      add_term(j, one, one_error);
      total.add(CompensatedSum{one, one_error});
    }
    for (std::size_t k = 0; k < ways; ++k) total.add(CompensatedSum{sum[k], error[k]});
  }
  /// Adds sum_j a[j] b[j] to `total`, each product rounded once.
  static void add_products(const double* a, const double* b, std::size_t count, CompensatedSum& total) {
    add_interleaved(
        count,
        [a, b](std::size_t j, double& sum, double& error) { add_carrying_error(a[j] * b[j], sum, error); },
        total);
  }
  /// Adds sum_j a[j]^2 to `total`, each square's rounding error carried too. a[j] = high + low, high
  /// its 26 leading significant bits (the low 27 bits of its encoding cleared), low the rest (27
  /// bits): x^2 = high^2 + (2 high low + low^2), the first term exact, added with two-sum, the second
  /// (2^-25 of x^2 at most, rounded to under 2^-78 of x^2) carried in the error. Every product that
  /// meets an addition is exact or that small, so a compiler that fuses a multiply into an add (GCC
  /// does by default where the machine has FMA) cannot change the sum by more. Within in_range() no
  /// partial product underflows by more; past it (an infinity or NaN) in_range() is false.
  static void add_exact_squares(const double* a, std::size_t count, CompensatedSum& total) {
    add_interleaved(
        count,
        [a](std::size_t j, double& sum, double& error) {
          const double x = a[j];
          std::uint64_t bits = 0;
          std::memcpy(&bits, &x, sizeof bits);
          bits &= ~((std::uint64_t{1} << 27) - 1);
          double high = 0;
          std::memcpy(&high, &bits, sizeof high);
          const double low = x - high;
          add_carrying_error(high * high, sum, error, 2 * high * low + low * low);
        },
        total);
  }

  std::size_t vectors_;
  std::vector<CompensatedSum> sums_;  // vectors x vectors, row-major; a <= b used
  std::vector<std::uint64_t> bits_;   // per vector, the OR of its magnitudes' bits
};

}  // namespace polyak::detail
