// SWALR's anneal_epochs is a whole number of epochs: 1.7 must not silently become 1 (PyTorch raises).
#include <polyak/core/swalr.hpp>
int main() {
  std::vector<double> lrs{0.1};
  polyak::SWALR scheduler(lrs, 0.05, 1.7);
}
