// SPDX-License-Identifier: MIT
// The guides' c10d snippets: a process of a libtorch job started as torchrun starts it, its store
// and its model.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/torch.h>

extern int rank, world_size;
extern c10::intrusive_ptr<c10d::Store> store;
extern torch::nn::Sequential model;
