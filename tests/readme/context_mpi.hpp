// SPDX-License-Identifier: MIT
// The README's MPI snippets: the core context, with MPI.
#pragma once

#include <polyak/mpi.hpp>

#include "context_core.hpp"
