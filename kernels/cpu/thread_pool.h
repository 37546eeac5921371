// A fixed pool of worker threads for the CPU kernels: ParallelFor runs fn(i) for i in
// [0, n) on the pool and the calling thread, and returns when all are done. One call at a
// time per pool (calls are serialised).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fm::kernels {

class ThreadPool {
 public:
  explicit ThreadPool(uint32_t threads);  // total threads including the caller
  ~ThreadPool();
  uint32_t size() const { return static_cast<uint32_t>(workers_.size()) + 1; }
  // Runs fn(0..n-1) on the pool and the caller; when another caller holds the pool, runs
  // them inline on the calling thread.
  void ParallelFor(uint32_t n, const std::function<void(uint32_t)>& fn);

  // A process-wide pool sized to the machine's cores.
  static ThreadPool& Default();

 private:
  void Work();

  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // one ParallelFor at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(uint32_t)>* fn_ = nullptr;
  uint32_t n_ = 0, next_ = 0, finished_ = 0;
  uint64_t generation_ = 0;
  uint32_t busy_ = 0;
  bool stop_ = false;
};

}  // namespace fm::kernels
