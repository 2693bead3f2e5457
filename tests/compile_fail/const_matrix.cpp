// copy_to and swap write through views: a const matrix cannot be one.
#include <polyak/core/tensor_view.hpp>
int main() {
  const Eigen::MatrixXf m(2, 2);
  polyak::ParameterList<float> list;
  list.add("m", m);
}
