// SPDX-License-Identifier: MIT
#include <polyak/polyak.hpp>
#ifdef CONSUMER_SAVES
#include <polyak/checkpoint.hpp>
#endif

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
#ifdef CONSUMER_SAVES
  if (swa.state_dict().scalar<std::int64_t>("n_averaged") != 4) return 1;
#endif
  return mean == 2.5f ? 0 : 1;
}
