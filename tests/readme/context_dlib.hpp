// SPDX-License-Identifier: MIT
// The guides' dlib snippets: a dlib net, its trainer and its data.
#pragma once

#include <vector>

#include <dlib/dnn.h>

using net_type = dlib::loss_multiclass_log<
    dlib::fc<10, dlib::relu<dlib::bn_fc<dlib::fc<32, dlib::input<dlib::matrix<float, 0, 1>>>>>>>;
extern net_type net;
extern dlib::dnn_trainer<net_type> trainer;
extern std::vector<dlib::matrix<float, 0, 1>> images;
extern std::vector<unsigned long> labels;
extern std::vector<std::vector<dlib::matrix<float, 0, 1>>> batches;
extern int epochs, swa_start, steps_per_epoch;
