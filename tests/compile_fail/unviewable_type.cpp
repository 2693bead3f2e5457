// A std::vector has no shape: wrap it in a TensorView.
#include <polyak/core/tensor_view.hpp>
#include <vector>
int main() {
  std::vector<float> v(4);
  polyak::ParameterList<float> list;
  list.add("v", v);
}
