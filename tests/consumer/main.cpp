// SPDX-License-Identifier: MIT
#include <polyak/polyak.hpp>

#include <iostream>

int main() {
  Eigen::VectorXf w = Eigen::VectorXf::Zero(3);
  polyak::ParameterList<float> model;
  model.add("w", w);
  polyak::AveragedModel<float> swa(model);
  for (int step = 1; step <= 4; ++step) {
    w.setConstant(static_cast<float>(step));
    swa.update_parameters(model);
  }
  const float mean = swa.parameters()[0].data()[0];  // (1 + 2 + 3 + 4) / 4
  std::cout << "consumer: SWA mean " << mean << "\n";
  return mean == 2.5f ? 0 : 1;
}
