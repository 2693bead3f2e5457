// A sum is not stored anywhere: there is nothing to view.
#include <polyak/core/tensor_view.hpp>
int main() {
  Eigen::MatrixXf a(2, 2), b(2, 2);
  polyak::ParameterList<float> list;
  list.add("sum", a + b);
}
