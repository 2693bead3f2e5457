// Integers are not averaged.
#include <polyak/core/tensor_view.hpp>
int main() {
  int x[4] = {};
  polyak::TensorView<int> view(x, {4});
}
