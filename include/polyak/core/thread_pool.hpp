// SPDX-License-Identifier: MIT
// ThreadPool: the worker threads an AveragedModel may spread its update over (opt-in).
//
// The update is pure memory traffic, and one core cannot saturate a socket's memory bandwidth:
// a second thread moves more bytes a second. Threads only pay off on large models, so
// AveragedModel uses the pool only when each thread gets enough scalars (see averaged_model.hpp).
#pragma once

#include <condition_variable>
#include <cstddef>  // std::size_t
#include <cstdint>  // std::int64_t
#include <exception>
#include <functional>  // std::function: the job, set once a call
#include <mutex>
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "polyak/core/error.hpp"

namespace polyak {

/// A fixed set of worker threads that run one job at a time, split into `size()` parts; the calling
/// thread runs part 0 itself. Not for concurrent use by several callers.
class ThreadPool {
 public:
  /// `threads` >= 1 in all, the caller included: ThreadPool(2) starts one worker. Where the system
  /// starts fewer (a process or container limit on threads), throws RuntimeError, the workers
  /// already started stopped and joined.
  explicit ThreadPool(int threads) : size_(threads) {
    if (threads < 1) throw InvalidArgument("polyak::ThreadPool: threads " + std::to_string(threads) + " < 1");
    try {
      for (int part = 1; part < threads; ++part) workers_.emplace_back([this, part] { work(part); });
    } catch (const std::system_error& e) {  // (a joinable std::thread destroyed would std::terminate)
      stop();
      throw RuntimeError("polyak::ThreadPool: the system started " + std::to_string(workers_.size()) +
                         " of " + std::to_string(threads - 1) + " worker threads (" + e.what() + ")");
    }
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  ~ThreadPool() { stop(); }

  /// How many parts a job is split into: the workers and the caller.
  int size() const noexcept { return size_; }

  /// Runs job(part) for part = 0 .. size() - 1, part 0 on the calling thread, and returns when all
  /// are done. An exception from any part is rethrown here (the first one).
  template <class Job>
  void run(Job&& job) {
    if (size_ == 1) {
      job(0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = std::ref(job);
      pending_ = size_ - 1;
      error_ = nullptr;
      ++generation_;
    }
    start_.notify_all();
    std::exception_ptr mine;
    try {
      job(0);
    } catch (...) {
      mine = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Tells the workers to return, and joins them.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    start_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  void work(int part) {
    std::int64_t seen = 0;
    for (;;) {
      std::function<void(int)> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        job = job_;
      }
      std::exception_ptr error;
      try {
        job(part);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (error && !error_) error_ = error;
      if (--pending_ == 0) done_.notify_one();
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::function<void(int)> job_;
  std::int64_t generation_ = 0;
  int pending_ = 0;
  std::exception_ptr error_;
  bool stopping_ = false;
};

}  // namespace polyak
