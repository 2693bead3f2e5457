// SPDX-License-Identifier: MIT
// polyak in thirty lines: noisy SGD on a least-squares problem, with SWA and EMA of the weights.
//
// SGD with a constant step never settles: it keeps bouncing around the optimum. Averaging its iterates
// (Polyak averaging) cancels most of the bounce. The program prints how far each set of weights is from
// the exact least-squares solution.
#include <polyak/polyak.hpp>

#include <Eigen/QR>  // the exact least-squares solution to compare with

#include <cstdio>
#include <random>

int main() {
  const int n = 2000, d = 20, batch = 10;
  std::mt19937 rng(42);
  std::normal_distribution<double> normal;
  Eigen::MatrixXd X = Eigen::MatrixXd::NullaryExpr(n, d, [&] { return normal(rng); });
  Eigen::VectorXd truth = Eigen::VectorXd::NullaryExpr(d, [&] { return normal(rng); });
  Eigen::VectorXd y = X * truth + 0.5 * Eigen::VectorXd::NullaryExpr(n, [&] { return normal(rng); });
  const Eigen::VectorXd optimum = X.colPivHouseholderQr().solve(y);

  // The model: one weight vector and a bias, viewed (not copied) by polyak.
  Eigen::VectorXd w = Eigen::VectorXd::Zero(d);
  Eigen::VectorXd b = Eigen::VectorXd::Zero(1);
  polyak::ParameterList<double> model;
  model.add("w", w).add("b", b);

  polyak::AveragedModel<double> swa(model);                                  // equal-weight running mean
  polyak::AveragedModel<double, polyak::EMA> ema(model, polyak::EMA{0.99});  // exponential moving average

  std::uniform_int_distribution<int> pick(0, n - 1);
  const double lr = 0.02;
  for (int step = 1; step <= 6000; ++step) {
    Eigen::VectorXd grad_w = Eigen::VectorXd::Zero(d);
    double grad_b = 0;
    for (int k = 0; k < batch; ++k) {
      const int i = pick(rng);
      const double residual = X.row(i).dot(w) + b[0] - y[i];
      grad_w += residual * X.row(i).transpose() / batch;
      grad_b += residual / batch;
    }
    w -= lr * grad_w;
    b[0] -= lr * grad_b;
    ema.update_parameters(model);
    if (step > 3000) swa.update_parameters(model);  // SWA over the second half, as SWA usually starts late
  }

  auto distance = [&](const polyak::ParameterList<double>& weights) {
    return (Eigen::Map<const Eigen::VectorXd>(weights[0].data(), d) - optimum).norm();
  };
  std::printf("distance to the least-squares optimum after 6000 noisy SGD steps\n");
  std::printf("  last SGD iterate        %.4f\n", distance(model));
  std::printf("  SWA of the last 3000    %.4f   (%lld models averaged)\n", distance(swa.parameters()),
              static_cast<long long>(swa.n_averaged()));
  std::printf("  EMA, decay 0.99         %.4f\n", distance(ema.parameters()));
  return 0;
}
