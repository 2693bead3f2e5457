// A row of a fixed-size column-major matrix is strided, and its type says so.
#include <polyak/core/tensor_view.hpp>
int main() {
  Eigen::Matrix4f m;
  polyak::ParameterList<float> list;
  list.add("row", m.row(0));
}
