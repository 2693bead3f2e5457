// A double tensor in a float list.
#include <polyak/core/tensor_view.hpp>
int main() {
  Eigen::MatrixXd m(2, 2);
  polyak::ParameterList<float> list;
  list.add("m", m);
}
