// SPDX-License-Identifier: MIT
// A part of the checkpoint layer without its state header: StateDict is known, the core's StateIO
// is not, and the error names the header that has it.
#include <polyak/checkpoint/safetensors.hpp>
#include <polyak/core/averaged_model.hpp>

int main() {
  Eigen::VectorXf w = Eigen::VectorXf::Zero(3);
  polyak::ParameterList<float> model;
  model.add("w", w);
  polyak::AveragedModel<float> swa(model);
  polyak::save_safetensors("never.safetensors", swa.state_dict());
}
