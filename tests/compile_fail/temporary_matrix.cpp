// A view of a temporary would dangle.
#include <polyak/core/tensor_view.hpp>
int main() {
  polyak::ParameterList<float> list;
  list.add("m", Eigen::MatrixXf(2, 2));
}
