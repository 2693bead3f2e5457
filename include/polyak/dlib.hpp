// SPDX-License-Identifier: MIT
// The dlib adapter, in one include: views of a dlib net's layer parameters (kept in step with a
// dnn_trainer's thread), SWALR on the trainer's learning rate, and update_bn over the net's bn_
// layers. Adds dlib (CMake target polyak::dlib); the core comes with it.
#pragma once

#include "polyak/dlib/batch_norm.hpp"
#include "polyak/dlib/parameters.hpp"
#include "polyak/polyak.hpp"
