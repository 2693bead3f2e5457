// SPDX-License-Identifier: MIT
// polyak: weight averaging for C++ training code. This umbrella header includes everything that
// needs no MPI; polyak/mpi.hpp adds the MPI communicator.
#pragma once

#include "polyak/averaged_model.hpp"
#include "polyak/averaging_functions.hpp"
#include "polyak/batch_norm.hpp"
#include "polyak/communicator.hpp"
#include "polyak/ema_schedules.hpp"
#include "polyak/model_averaging.hpp"
#include "polyak/post_hoc_ema.hpp"
#include "polyak/power_ema.hpp"
#include "polyak/scalar_type.hpp"
#include "polyak/serialization.hpp"
#include "polyak/state_dict.hpp"
#include "polyak/swalr.hpp"
#include "polyak/tensor_view.hpp"
#include "polyak/thread_pool.hpp"
#include "polyak/version.hpp"
