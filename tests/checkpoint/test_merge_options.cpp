// SPDX-License-Identifier: MIT
// MergeOptions (polyak/checkpoint/merge_options.hpp): which settings each method takes, and their
// ranges, checked before a merge reads anything (the merges themselves: test_merge.cpp).
#include "polyak/checkpoint/merge_options.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <limits>
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
  for (const MergeMethod m : polyak::all_merge_methods) {  // every method, with a model count it takes
    CAPTURE(polyak::to_string(m));
    const std::size_t models = m == MergeMethod::Slerp || m == MergeMethod::NuSlerp          ? 2
                               : m == MergeMethod::NearSwap || m == MergeMethod::Passthrough ? 1
                                                                                             : 3;
    CHECK(problem(defaults_for(m), models, polyak::needs_base(m)).empty());
    MergeMethod named = MergeMethod::Average;
    CHECK((polyak::merge_method_named(polyak::to_string(m), named) && named == m));
  }
  MergeMethod named = MergeMethod::Ties;
  CHECK((polyak::merge_method_named("linear", named) && named == MergeMethod::Average));  // mergekit's name
  CHECK_FALSE(polyak::merge_method_named("Linear", named));
  CHECK_FALSE(polyak::merge_method_named("", named));
}

TEST_CASE("each new setting is refused by the methods that do not use it", "[merge][options]") {
  const auto refused = [](MergeOptions o, std::size_t models, const std::string& fragment) {
    CAPTURE(polyak::to_string(o.method), fragment);
    CHECK_THAT(problem(o, models, polyak::needs_base(o.method)), Catch::Contains(fragment));
  };
  MergeOptions o = defaults_for(MergeMethod::Ties);
  o.gamma = 0.1;
  refused(o, 2, "gamma is not a setting of ties");
  o = defaults_for(MergeMethod::Breadcrumbs);
  o.epsilon = 0.1;
  refused(o, 2, "epsilon is not a setting of breadcrumbs");
  o = defaults_for(MergeMethod::Slerp);
  o.normalize = true;
  refused(o, 2, "normalize is not a setting of slerp");
  o = defaults_for(MergeMethod::TaskArithmetic);
  o.rescale = false;
  refused(o, 2, "rescale is not a setting of task_arithmetic");
  o = defaults_for(MergeMethod::Dare);
  o.rescale = true;  // (Dare rescales by 1 / (1 - p), always)
  refused(o, 2, "rescale is not a setting of dare");
  o = defaults_for(MergeMethod::Ties);
  o.filter_wise = true;
  refused(o, 2, "filter_wise is not a setting of ties");
  o = defaults_for(MergeMethod::Ties);
  o.select_topk = 0.5;
  refused(o, 2, "select_topk is not a setting of ties");
  o = defaults_for(MergeMethod::ModelStock);
  o.t = 0.3;
  refused(o, 2, "t is not a setting of model_stock");
  o = defaults_for(MergeMethod::ModelStock);
  o.weights = {1, 2};
  refused(o, 2, "weights is not a setting of model_stock");
  o = defaults_for(MergeMethod::Sce);
  o.weights = {1, 2};
  refused(o, 2, "weights is not a setting of sce");
  o = defaults_for(MergeMethod::Sce);
  o.scale = 2;
  refused(o, 2, "scale is not a setting of sce");
  o = defaults_for(MergeMethod::Breadcrumbs);
  o.seed = 1;
  refused(o, 2, "seed is not a setting of breadcrumbs");
  o = defaults_for(MergeMethod::TaskArithmetic);
  o.densities = {0.5, 0.5};
  refused(o, 2, "densities is not a setting of task_arithmetic");
  o = defaults_for(MergeMethod::NearSwap);
  o.density = 0.5;
  refused(o, 1, "density is not a setting of nearswap");
}

TEST_CASE("the new settings out of range are refused", "[merge][options]") {
  const auto refused = [](MergeOptions o, std::size_t models, const std::string& fragment) {
    CAPTURE(polyak::to_string(o.method), fragment);
    CHECK_THAT(problem(o, models, polyak::needs_base(o.method)), Catch::Contains(fragment));
  };
  MergeOptions o = defaults_for(MergeMethod::Della);
  o.density = 0.1;  // 0.1 - 0.15 < 0
  refused(o, 2, "density - epsilon and density + epsilon must lie in (0, 1)");
  o.density = 0.9;  // 0.9 + 0.15 > 1
  refused(o, 2, "density - epsilon and density + epsilon must lie in (0, 1)");
  o.density = 1;  // keeps everything: epsilon does not matter
  CHECK(problem(o, 2, true).empty());
  o.density = 0;
  CHECK(problem(o, 2, true).empty());
  o = defaults_for(MergeMethod::DellaLinear);
  o.epsilon = 0.5;
  refused(o, 2, "epsilon must be in [0, 0.5)");
  o.epsilon = -0.1;
  refused(o, 2, "epsilon must be in [0, 0.5)");
  o = defaults_for(MergeMethod::Breadcrumbs);
  o.gamma = 1.5;
  refused(o, 2, "gamma 1.5 is outside [0, 1]");
  o = defaults_for(MergeMethod::NearSwap);
  o.t = 0;
  refused(o, 1, "nearswap's t (the sameness threshold) must be finite and > 0");
  o.t = std::numeric_limits<double>::infinity();
  refused(o, 1, "must be finite and > 0");
  o.t = 3;  // a threshold, not a fraction: above 1 is fine
  CHECK(problem(o, 1, true).empty());
  o = defaults_for(MergeMethod::Sce);
  o.select_topk = 0;
  refused(o, 2, "select_topk must be in (0, 1]");
  o.select_topk = 1.5;
  refused(o, 2, "select_topk must be in (0, 1]");
  o = defaults_for(MergeMethod::DareTies);
  o.densities = {0.5};
  refused(o, 2, "1 densities for 2 models");
  o.densities = {0.5, 1.5};
  refused(o, 2, "density 1.5 is outside [0, 1]");
  o.densities = {0.5, 0.5};
  o.density = 0.5;
  refused(o, 2, "density and densities exclude each other");
  o = defaults_for(MergeMethod::Dare);
  o.densities = {0.5, 0};
  refused(o, 2, "dare's density must be in (0, 1]");
}

TEST_CASE("a base where a method takes none, none where it needs one, and wrong model counts are refused",
          "[merge][options]") {
  CHECK_THAT(problem(defaults_for(MergeMethod::Average), 2, true),
             Catch::Contains("average takes no base model"));
  CHECK_THAT(problem(defaults_for(MergeMethod::Ties), 2, false), Catch::Contains("ties needs a base model"));
  CHECK_THAT(problem(defaults_for(MergeMethod::Slerp), 3, false),
             Catch::Contains("slerp merges two models, not 3"));
  CHECK(problem(defaults_for(MergeMethod::Ties), 65, true).empty());  // (no longer limited to 64)
  CHECK_THAT(problem(defaults_for(MergeMethod::NearSwap), 2, true),
             Catch::Contains("nearswap merges one model with the base, not 2"));
  CHECK_THAT(problem(defaults_for(MergeMethod::ModelStock), 1, true),
             Catch::Contains("model_stock merges at least two models with the base, not 1"));
  CHECK_THAT(problem(defaults_for(MergeMethod::Sce), 2, false), Catch::Contains("sce needs a base model"));
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
