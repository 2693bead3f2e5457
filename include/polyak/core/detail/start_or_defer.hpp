// SPDX-License-Identifier: MIT
// The one rule for work polyak puts on a thread of its own: where the system starts no thread (a
// process or container limit on threads, ulimit -u), the work runs deferred, on the thread that
// waits for it, instead of failing the call that started it.
#pragma once

#include <future>
#include <system_error>
#include <type_traits>
#include <utility>

namespace polyak {

namespace detail {

/// `work` started on a thread of its own, or, where the system refuses one, deferred: run by the
/// first get() or wait() on the returned future, on that thread. Either way the work runs once and
/// its error reaches get().
template <class Work>
std::future<std::invoke_result_t<std::decay_t<Work>>> start_or_defer(Work&& work) {
  try {
    return std::async(std::launch::async, work);  // (a copy: `work` is intact if this throws)
  } catch (const std::system_error&) {
    return std::async(std::launch::deferred, std::forward<Work>(work));
  }
}

}  // namespace detail

}  // namespace polyak
