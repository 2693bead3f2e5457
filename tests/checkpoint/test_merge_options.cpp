// SPDX-License-Identifier: MIT
// MergeOptions (polyak/checkpoint/merge_options.hpp): which settings each method takes, and their
// ranges, checked before a merge reads anything (the merges themselves: test_merge.cpp).
#include "polyak/checkpoint/merge_options.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <string>

#include "polyak/checkpoint/merge.hpp"

using polyak::MergeMethod;
using polyak::MergeOptions;

namespace {

MergeOptions defaults_for(MergeMethod method) {
  MergeOptions o;
  o.method = method;
  return o;
}

/// The message MergeOptions::check gives, "" where it accepts.
std::string problem(const MergeOptions& o, std::size_t models, bool has_base) {
  try {
    o.check(models, has_base);
    return "";
  } catch (const polyak::InvalidArgument& e) {
    return e.what();
  }
}

}  // namespace

TEST_CASE("every method's defaults are accepted with its models and base", "[merge][options]") {
  CHECK(problem(defaults_for(MergeMethod::Average), 3, false).empty());
  CHECK(problem(defaults_for(MergeMethod::TaskArithmetic), 3, true).empty());
  CHECK(problem(defaults_for(MergeMethod::Ties), 3, true).empty());
  CHECK(problem(defaults_for(MergeMethod::Dare), 3, true).empty());
  CHECK(problem(defaults_for(MergeMethod::Slerp), 2, false).empty());
}

TEST_CASE("a base where a method takes none, none where it needs one, and wrong model counts are refused",
          "[merge][options]") {
  CHECK_THAT(problem(defaults_for(MergeMethod::Average), 2, true),
             Catch::Contains("average takes no base model"));
  CHECK_THAT(problem(defaults_for(MergeMethod::Ties), 2, false), Catch::Contains("ties needs a base model"));
  CHECK_THAT(problem(defaults_for(MergeMethod::Slerp), 3, false),
             Catch::Contains("slerp merges two models, not 3"));
  CHECK_THAT(problem(defaults_for(MergeMethod::Ties), 65, true),
             Catch::Contains("at most 64 models, not 65"));
  CHECK_THAT(problem(defaults_for(MergeMethod::Average), 0, false), Catch::Contains("no models"));
  MergeOptions weights = defaults_for(MergeMethod::Average);
  weights.weights = {1, 2};
  CHECK_THAT(problem(weights, 3, false), Catch::Contains("2 weights for 3 models"));
}

TEST_CASE("settings out of range are refused, naming the range", "[merge][options]") {
  MergeOptions o = defaults_for(MergeMethod::Ties);
  o.density = 1.5;
  CHECK_THAT(problem(o, 2, true), Catch::Contains("density 1.5 is outside [0, 1]"));
  o = defaults_for(MergeMethod::Dare);
  o.drop = 1;
  CHECK_THAT(problem(o, 2, true), Catch::Contains("drop must be in [0, 1)"));
  o = defaults_for(MergeMethod::Slerp);
  o.t = -0.25;
  CHECK_THAT(problem(o, 2, false), Catch::Contains("t -0.25 is outside [0, 1]"));
  o = defaults_for(MergeMethod::Average);
  o.weights = {1, -1};
  CHECK_THAT(problem(o, 2, false), Catch::Contains("average weights must be >= 0"));
  o.weights = {0, 0};
  CHECK_THAT(problem(o, 2, false), Catch::Contains("the weights are all 0"));
  o = defaults_for(MergeMethod::TaskArithmetic);
  o.weights = {1, -1};  // task negation: any sign
  CHECK(problem(o, 2, true).empty());
}
