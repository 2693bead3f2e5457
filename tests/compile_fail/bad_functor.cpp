// An averaging function must take (averaged, current, num_averaged).
#include <polyak/core/averaged_model.hpp>
int main() {
  Eigen::VectorXf w(3);
  polyak::ParameterList<float> list;
  list.add("w", w);
  auto wrong = [](int) {};
  polyak::AveragedModel<float, decltype(wrong)> averaged(list, wrong);
}
