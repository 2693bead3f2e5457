// SPDX-License-Identifier: MIT
// The checkpoint layer, in one include: StateDict, the settings codec, every core type's
// state_dict()/load_state_dict() (StateIO), crash-safe safetensors files, sharded checkpoints,
// model merging, and post-hoc EMA over snapshot files. Adds nlohmann-json (CMake target
// polyak::checkpoint) and needs POSIX file calls.
#pragma once

#include "polyak/distributed_checkpoint.hpp"
#include "polyak/merge.hpp"
#include "polyak/polyak.hpp"
#include "polyak/post_hoc_ema.hpp"
#include "polyak/rule_settings.hpp"
#include "polyak/serialization.hpp"
#include "polyak/sharded_checkpoint.hpp"
#include "polyak/state_dict.hpp"
#include "polyak/state_io.hpp"
