// SPDX-License-Identifier: MIT
// The core, in one include: views, averaging rules, AveragedModel, SWAG, SWALR, update_bn, the
// communicator contract and the averagers. Needs Eigen and the standard library only. Checkpoints
// (StateDict, safetensors, state_dict()/load_state_dict(), post-hoc EMA) are in
// <polyak/checkpoint.hpp>; MPI in <polyak/mpi.hpp>; libtorch in <polyak/torch.hpp>. Each layer is a
// folder beside its module header (polyak/core/, polyak/checkpoint/, ...), its internals in detail/.
#pragma once

#include "polyak/core/averaged_model.hpp"
#include "polyak/core/averaging_functions.hpp"
#include "polyak/core/batch_norm.hpp"
#include "polyak/core/communicator.hpp"
#include "polyak/core/ema_schedules.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/model_averaging.hpp"
#include "polyak/core/overlap.hpp"
#include "polyak/core/power_ema.hpp"
#include "polyak/core/scalar_type.hpp"
#include "polyak/core/shard_view.hpp"
#include "polyak/core/swag.hpp"
#include "polyak/core/swalr.hpp"
#include "polyak/core/tensor_view.hpp"
#include "polyak/core/thread_pool.hpp"
#include "polyak/core/version.hpp"

/// polyak: weight averaging for neural-network training. Every public name of every layer is here;
/// internals are in polyak::detail.
namespace polyak {}
