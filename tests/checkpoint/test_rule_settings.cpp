// SPDX-License-Identifier: MIT
#include "polyak/checkpoint/rule_settings.hpp"

#include <catch2/catch.hpp>

TEST_CASE("the settings codec round-trips every built-in rule exactly and refuses malformed numbers",
          "[serialization][settings]") {
  polyak::Metadata m;
  const polyak::ScheduledEMA<polyak::InverseGammaDecay> fn{
      polyak::InverseGammaDecay{0.9999, 1.0, 0.1 + 0.2, 0.0}, polyak::EmaCadence{7, 3, false}};
  polyak::save_settings(fn, m);
  const auto back =
      polyak::load_settings(polyak::ScheduledEMA<polyak::InverseGammaDecay>{polyak::InverseGammaDecay{}}, m);
  REQUIRE(back.schedule().power() == 0.1 + 0.2);  // 0.30000000000000004, not 0.3
  REQUIRE(back.cadence().update_after_step == 7);
  REQUIRE(back.cadence().update_every == 3);
  REQUIRE_FALSE(back.cadence().compound);
  for (const std::string bad : {"0.5abc", "1e999", "", " 0.5", "0x1p-1"}) {
    polyak::Metadata broken = m;
    broken["power"] = bad;
    REQUIRE_THROWS_AS(polyak::load_settings(fn, broken), polyak::FormatError);
  }
  polyak::Metadata broken = m;
  broken["update_every"] = "2.5";  // a cadence is a whole number of steps
  REQUIRE_THROWS_AS(polyak::load_settings(fn, broken), polyak::FormatError);
  broken["update_every"] = "0";  // one the constructor refuses
  REQUIRE_THROWS_AS(polyak::load_settings(fn, broken), polyak::FormatError);
}
