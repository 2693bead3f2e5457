// SPDX-License-Identifier: MIT
// The libtorch adapter, in one include: views of a torch::nn::Module's tensors, SWALR over a
// torch::optim optimizer, update_bn over its batch-norm layers, and libtorch::AveragedModel, the
// average kept where the module lives (CPU or CUDA). Adds libtorch (CMake target polyak::torch); the
// core comes with it. Its checkpoints (state_dict, PostHocEMA on the device) need the checkpoint layer
// too: #include <polyak/torch/checkpoint.hpp> and link polyak::checkpoint.
#pragma once

#include "polyak/polyak.hpp"
#include "polyak/torch/averaged_model.hpp"
#include "polyak/torch/parameters.hpp"

/// The libtorch adapter: views of a torch::nn::Module's tensors and the average kept on its device.
namespace polyak::libtorch {}
