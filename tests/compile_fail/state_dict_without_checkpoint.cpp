// SPDX-License-Identifier: MIT
// state_dict() belongs to the checkpoint layer: without <polyak/checkpoint.hpp>, the error says
// what to include.
#include <polyak/core/averaged_model.hpp>

int main() {
  Eigen::VectorXf w = Eigen::VectorXf::Zero(3);
  polyak::ParameterList<float> model;
  model.add("w", w);
  polyak::AveragedModel<float> swa(model);
  auto state = swa.state_dict();
  static_cast<void>(state);
}
