// SPDX-License-Identifier: MIT
// The README's libtorch snippets: a libtorch trainer's model, optimizer and data.
#pragma once

#include <vector>

#include <torch/torch.h>

extern int epochs, swa_start;
extern torch::nn::Sequential model;
extern torch::optim::SGD optimizer;
extern std::vector<torch::Tensor> loader;
void train_one_epoch(torch::nn::Sequential&, torch::optim::SGD&);
