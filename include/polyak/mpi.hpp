// SPDX-License-Identifier: MIT
// The MPI adapter, in one include: MpiCommunicator, polyak's communicator over an MPI communicator,
// for average_parameters, the averagers, ShardView and the distributed checkpoints. Adds MPI (CMake
// target polyak::mpi); the core (<polyak/polyak.hpp>) comes with it.
#pragma once

#include "polyak/mpi/communicator.hpp"
#include "polyak/polyak.hpp"
