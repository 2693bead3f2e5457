// SPDX-License-Identifier: MIT
// Eigen's Tensor and TensorMap, declared without their module: tensor_view.hpp recognizes them by
// type, and a user who views one has included <unsupported/Eigen/CXX11/Tensor> already. Including the
// module in every translation unit cost about 1 s of compile time (more than Eigen/Core itself).
// Declared exactly as Eigen 3.4 declares them, minus the default arguments, which Eigen's own
// declaration adds whether it comes before or after this one.
#pragma once

namespace Eigen {
template <typename Scalar_, int NumIndices_, int Options_, typename IndexType_>
class Tensor;
template <typename PlainObjectType, int Options_, template <class> class MakePointer_>
class TensorMap;
}  // namespace Eigen
