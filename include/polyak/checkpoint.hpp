// SPDX-License-Identifier: MIT
// The checkpoint layer, in one include: StateDict, the settings codec, every core type's
// state_dict()/load_state_dict() (StateIO), crash-safe safetensors files, sharded checkpoints,
// model merging, and post-hoc EMA over snapshot files. Adds nlohmann-json (CMake target
// polyak::checkpoint) and needs POSIX file calls.
#pragma once

#include "polyak/checkpoint/checkpoint_order.hpp"
#include "polyak/checkpoint/distributed_checkpoint.hpp"
#include "polyak/checkpoint/merge.hpp"
#include "polyak/checkpoint/merge_options.hpp"
#include "polyak/polyak.hpp"
#include "polyak/checkpoint/post_hoc_ema.hpp"
#include "polyak/checkpoint/rule_settings.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/checkpoint/sharded_checkpoint.hpp"
#include "polyak/checkpoint/state_dict.hpp"
#include "polyak/checkpoint/state_io.hpp"
