// SPDX-License-Identifier: MIT
// What the README's snippets assume the reader's program has: the training code around them. Only
// declared: the snippets are compiled (tests readme.block_N), not run.
#pragma once

#include <cstdint>
#include <vector>

#include <polyak/checkpoint.hpp>
#include <polyak/polyak.hpp>

struct Batch {};
extern int steps, swa_start;
extern std::vector<Batch> train_batches;
extern polyak::BatchNormStats<float> bn1_stats;
extern polyak::ParameterList<float> params;
void train_one_step();
void optimizer_step();
void forward_train(const Batch&);
void evaluate();
extern polyak::ParameterList<float> model;
extern polyak::AveragedModel<float> swa;
extern polyak::AveragedModel<float, polyak::EMA> ema;
extern polyak::SWALR<> scheduler;
extern polyak::PeriodicModelAverager<polyak::ThreadCommunicator> averager;
