// SPDX-License-Identifier: MIT
// The core, in one include: views, averaging rules, AveragedModel, SWAG, SWALR, update_bn, the
// communicator contract and the averagers. Needs Eigen and the standard library only. Checkpoints
// (StateDict, safetensors, state_dict()/load_state_dict(), post-hoc EMA) are in
// <polyak/checkpoint.hpp>; MPI in <polyak/mpi.hpp>; libtorch in <polyak/torch.hpp>.
#pragma once

#include "polyak/averaged_model.hpp"
#include "polyak/averaging_functions.hpp"
#include "polyak/batch_norm.hpp"
#include "polyak/communicator.hpp"
#include "polyak/ema_schedules.hpp"
#include "polyak/error.hpp"
#include "polyak/model_averaging.hpp"
#include "polyak/power_ema.hpp"
#include "polyak/scalar_type.hpp"
#include "polyak/shard_view.hpp"
#include "polyak/swag.hpp"
#include "polyak/swalr.hpp"
#include "polyak/tensor_view.hpp"
#include "polyak/thread_pool.hpp"
#include "polyak/version.hpp"
