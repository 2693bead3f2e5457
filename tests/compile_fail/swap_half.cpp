// A half model cannot take the float average by swap without rounding it.
#include <polyak/core/averaged_model.hpp>
int main() {
  Eigen::Matrix<Eigen::half, Eigen::Dynamic, 1> w(3);
  polyak::ParameterList<Eigen::half> list;
  list.add("w", w);
  polyak::AveragedModel<Eigen::half> averaged(list);
  averaged.swap(list);
}
