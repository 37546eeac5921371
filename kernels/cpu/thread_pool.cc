#include "kernels/cpu/thread_pool.h"

#include <algorithm>

namespace fm::kernels {

ThreadPool::ThreadPool(uint32_t threads) {
  for (uint32_t i = 1; i < std::max<uint32_t>(threads, 1); ++i)
    workers_.emplace_back([this] { Work(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

ThreadPool& ThreadPool::Default() {
  static ThreadPool pool(std::max(1u, std::thread::hardware_concurrency()));
  return pool;
}

void ThreadPool::Work() {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    ++busy_;
    while (next_ < n_) {
      uint32_t i = next_++;
      lock.unlock();
      (*fn_)(i);
      lock.lock();
      ++finished_;
    }
    if (--busy_ == 0 && finished_ == n_) done_cv_.notify_all();
  }
}

void ThreadPool::ParallelFor(uint32_t n, const std::function<void(uint32_t)>& fn) {
  if (n == 0) return;
  if (workers_.empty() || n == 1) {
    for (uint32_t i = 0; i < n; ++i) fn(i);
    return;
  }
  // Another caller holds the pool (concurrent sessions): run inline on this thread rather
  // than queue behind it; every caller then keeps a core busy instead of convoying.
  std::unique_lock<std::mutex> call(call_mu_, std::try_to_lock);
  if (!call.owns_lock()) {
    for (uint32_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  fn_ = &fn;
  n_ = n;
  next_ = 0;
  finished_ = 0;
  ++generation_;
  cv_.notify_all();
  while (next_ < n_) {
    uint32_t i = next_++;
    lock.unlock();
    fn(i);
    lock.lock();
    ++finished_;
  }
  done_cv_.wait(lock, [&] { return finished_ == n_ && busy_ == 0; });
  fn_ = nullptr;
}

}  // namespace fm::kernels
