// SPDX-License-Identifier: MIT
// PyTorch's average_parameters (torch.distributed.algorithms.model_averaging.utils) on a libtorch
// module's tensors where they live, over a c10d process group of any backend (Gloo on CPUs, NCCL on
// GPUs): the tensors are flattened, divided by the group's size and allreduced by the group itself.
//
//     polyak::libtorch::average_parameters(model, *comm.group());  // comm: a C10dCommunicator
//
// Part of the c10d component (CMake target polyak::c10d).
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/torch.h>

#include <cstddef>  // std::size_t
#include <cstdint>  // std::int64_t
#include <string>
#include <vector>

#include "polyak/core/detail/agreement.hpp"
#include "polyak/core/error.hpp"

namespace polyak {
namespace libtorch {
namespace detail {

/// The group as a communicator of host doubles, for polyak's agreement (core/detail/agreement.hpp):
/// the doubles travel on `device`, since an NCCL group reduces device memory only.
class GroupOfDoubles {
 public:
  GroupOfDoubles(c10d::ProcessGroup& group, at::Device device) : group_(group), device_(device) {}
  int rank() const { return group_.getRank(); }
  int size() const { return group_.getSize(); }
  void allreduce_sum(double* data, std::size_t n) {
    const auto host = torch::from_blob(data, {static_cast<std::int64_t>(n)}, torch::kDouble);
    std::vector<at::Tensor> tensors{host.to(device_)};
    group_.allreduce(tensors)->wait();
    host.copy_(tensors[0]);
  }

 private:
  c10d::ProcessGroup& group_;
  at::Device device_;
};

/// This member's own problem with `params` ("" for none): what it cannot average at all.
inline std::string local_problem(const std::vector<at::Tensor>& params) {
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    const std::string which = "tensor " + std::to_string(i);
    if (!p.defined()) return which + " is undefined";
    if (p.layout() != torch::kStrided) return which + " is not dense (sparse tensors are not averaged)";
    // What copy_ could not write back, found before any member moves anything.
    if (!p.is_cpu() && !p.is_cuda())
      return which + " is on " + p.device().str() + ", not a CPU or CUDA device";
    if (p.is_inference())
      return which + " is an inference tensor (made under InferenceMode): it cannot be updated";
    if (at::has_internal_overlap(p) == at::MemOverlap::Yes)
      return which + " has scalars sharing memory (an expanded view?): it cannot be written in place";
    if (!at::isFloatingType(p.scalar_type()))
      return which + " is " + std::string(c10::toString(p.scalar_type())) + ", not a floating-point type";
    if (p.device() != params[0].device())
      return which + " is on " + p.device().str() + " where tensor 0 is on " + params[0].device().str();
  }
  return "";
}

/// FNV-1a of what the members must agree on before any tensor moves: the bucket size, the device
/// type, and each tensor's scalar type and shape, in order.
inline std::uint64_t layout_of(const std::vector<at::Tensor>& params, std::size_t bucket_bytes) {
  polyak::detail::LayoutHash hash;
  const auto put = [&hash](std::int64_t value) { hash.put(&value, sizeof value); };
  put(static_cast<std::int64_t>(params.size()));
  put(static_cast<std::int64_t>(bucket_bytes));
  if (!params.empty()) put(static_cast<std::int64_t>(params[0].device().type()));
  for (const auto& p : params) {
    put(static_cast<std::int64_t>(p.scalar_type()));
    put(p.dim());
    for (const auto extent : p.sizes()) put(extent);
  }
  return hash.value;
}

/// The first `numel` scalars of this thread's bucket buffer for `type` on `device`, grown where
/// needed and kept: fresh memory costs its page faults on every call (a 40 MB cat took 160 ms
/// fresh and 3 ms into memory used before, on the 2-core VM docs/libtorch.md measures on), and
/// the group's allreduce reads and writes it at once.
inline at::Tensor bucket_buffer(at::ScalarType type, at::Device device, std::size_t numel) {
#if defined(__clang__)  // (freed when its thread ends: that destructor is wanted)
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wexit-time-destructors"
#endif
  thread_local at::Tensor buffer;
#if defined(__clang__)
#pragma clang diagnostic pop
#endif
  const auto n = static_cast<std::int64_t>(numel);
  if (!buffer.defined() || buffer.scalar_type() != type || buffer.device() != device || buffer.numel() < n)
    buffer = torch::empty({n}, torch::TensorOptions().dtype(type).device(device));
  return buffer.narrow(0, 0, n);
}

}  // namespace detail

/// Collective over `group`: every tensor of `params` becomes its mean over the group, in place, as
/// PyTorch's average_parameters(params, group) computes it: the tensors flattened into one of their
/// promoted scalar type (torch.cat's: bf16 beside float goes to float, a bf16 model stays bf16),
/// divided by the group's size, summed by the group's allreduce, and copied back into each tensor
/// (rounded to its own type). The tensors themselves are updated (copy_, not PyTorch's `p.data =`),
/// so an optimizer holding them sees the mean. Where the group cannot sum the promoted type (libtorch
/// 1.13's Gloo sums no bf16, so a bf16-only model fails there as under PyTorch) every member throws
/// polyak::RuntimeError and nothing changes.
///
/// `bucket_bytes` = 0 (the default) flattens everything at once into fresh memory, PyTorch's one
/// call; a positive value flattens and sums consecutive tensors in buckets of at most that many
/// bytes (or one tensor, where it is larger) in a buffer kept per thread, type and device for the
/// next call: the memory held is a bucket rather than the model, and it is not allocated afresh
/// each time, which is faster (docs/libtorch.md). Each scalar's result is the same either way,
/// except that a group of three or more may add a scalar's terms in another order (a Gloo or NCCL
/// ring orders them by where the scalar lies in the call), which can change sums that round. A
/// failure of the group itself (a member lost, a timeout) in a later bucket leaves the earlier
/// buckets' tensors averaged, and says so.
///
/// Every member must pass tensors of the same scalar types and shapes, in order, on one device each
/// (the group's: CPU for Gloo, CUDA for NCCL), floating-point, dense, writable in place (not an
/// inference tensor, no expanded view), and the same bucket_bytes.
/// Before any tensor moves, the members agree on that: where any member's tensors differ or cannot
/// be averaged, every member throws polyak::InvalidArgument and nothing changes.
inline void average_parameters(const std::vector<at::Tensor>& params, c10d::ProcessGroup& group,
                               std::size_t bucket_bytes = 0) {
  const std::string who = "polyak::libtorch::average_parameters: ";
  const std::string problem = detail::local_problem(params);
  // (The agreement travels where the tensors are, so that an NCCL group can carry it.)
  const at::Device device =
      !params.empty() && params[0].defined() ? params[0].device() : at::Device(torch::kCPU);
  // One allreduce decides: each member's problem flag, and the layout's agreement.
  const int n = group.getSize(), me = group.getRank();
  std::vector<double> sums(static_cast<std::size_t>(polyak::detail::agreement_doubles + n), 0.0);
  polyak::detail::put_agreement(
      problem.empty() ? detail::layout_of(params, bucket_bytes) : static_cast<std::uint64_t>(me) + 1,
      sums.data());
  sums[static_cast<std::size_t>(polyak::detail::agreement_doubles + me)] = problem.empty() ? 0.0 : 1.0;
  detail::GroupOfDoubles(group, device).allreduce_sum(sums.data(), sums.size());
  const std::vector<double> flags(sums.begin() + polyak::detail::agreement_doubles, sums.end());
  const std::string failing = polyak::detail::rank_list(flags);
  if (!failing.empty()) {
    throw InvalidArgument(who + polyak::detail::ranks_phrase(failing, "rank ", "ranks ") +
                          " cannot average its tensors" +
                          (problem.empty() ? "" : " (here: " + problem + ")") + "; nothing was averaged");
  }
  if (!polyak::detail::agreed(sums.data(), n)) {
    throw InvalidArgument(who +
                          "the members' tensors differ in count, scalar type or shape (or their "
                          "bucket_bytes or device type); nothing was averaged");
  }
  if (params.empty()) return;

  torch::NoGradGuard no_grad;
  at::ScalarType type = params[0].scalar_type();
  for (const auto& p : params) type = c10::promoteTypes(type, p.scalar_type());
  const auto element = static_cast<std::size_t>(c10::elementSize(type));
  std::size_t first = 0;
  while (first < params.size()) {
    // The bucket [first, last): at least one tensor, then while it stays within bucket_bytes.
    std::size_t last = first + 1, bytes = static_cast<std::size_t>(params[first].numel()) * element;
    while (last < params.size() &&
           (bucket_bytes == 0 ||
            bytes + static_cast<std::size_t>(params[last].numel()) * element <= bucket_bytes)) {
      bytes += static_cast<std::size_t>(params[last].numel()) * element;
      ++last;
    }
    std::vector<at::Tensor> flat;
    for (std::size_t i = first; i < last; ++i) flat.push_back(params[i].reshape(-1).to(type));
    std::vector<at::Tensor> bucket(1);
    if (bucket_bytes == 0) {
      bucket[0] = torch::cat(flat);
    } else {
      bucket[0] = detail::bucket_buffer(type, device, bytes / element);
      torch::cat_out(bucket[0], flat);
    }
    bucket[0].div_(n);
    try {
      group.allreduce(bucket)->wait();
    } catch (const std::exception& e) {  // Gloo sums no bf16; a member lost; a timeout
      const auto* error = dynamic_cast<const c10::Error*>(&e);
      throw RuntimeError(who + "the group's allreduce of " + std::string(c10::toString(type)) + " failed" +
                         (first == 0 ? "; nothing was averaged"
                                     : "; tensors 0 to " + std::to_string(first - 1) + " were averaged") +
                         ": " + (error ? error->what_without_backtrace() : e.what()));
    }
    std::int64_t offset = 0;
    for (std::size_t i = first; i < last; ++i) {
      const std::int64_t numel = params[i].numel();
      params[i].copy_(bucket[0].narrow(0, offset, numel).view(params[i].sizes()));
      offset += numel;
    }
    first = last;
  }
}

/// average_parameters over a module's parameters (module.parameters(), PyTorch's
/// module.parameters() too: buffers such as batch norm's statistics are not averaged).
inline void average_parameters(torch::nn::Module& module, c10d::ProcessGroup& group,
                               std::size_t bucket_bytes = 0) {
  average_parameters(module.parameters(), group, bucket_bytes);
}

}  // namespace libtorch
}  // namespace polyak
