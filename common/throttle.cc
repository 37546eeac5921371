#include "common/throttle.h"

#include <algorithm>
#include <vector>

namespace fm {

RefusalThrottle::RefusalThrottle(double per_second, double burst, double max_delay_ms)
    : rate_(per_second),
      burst_(std::max(burst, 1.0)),
      max_delay_ms_(max_delay_ms),
      tokens_(burst_),
      refilled_(Clock::now()) {
  if (rate_ > 0) thread_ = std::thread([this] { Loop(); });
}

RefusalThrottle::~RefusalThrottle() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void RefusalThrottle::Charge(uint64_t refused, std::function<void()> then) {
  if (refused == 0 || rate_ <= 0) {
    if (refused > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      refused_ += refused;
    }
    then();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    refused_ += refused;
    const Clock::time_point now = Clock::now();
    tokens_ = std::min(burst_,
                       tokens_ + rate_ * std::chrono::duration<double>(now - refilled_).count());
    refilled_ = now;
    // The debt a wait may repay is bounded, so one huge charge cannot lock everyone out
    // for longer than max_delay.
    tokens_ = std::max(tokens_ - static_cast<double>(refused), -rate_ * max_delay_ms_ / 1e3);
    if (tokens_ < 0 && !released_) {
      ++delayed_;
      const auto wait = std::chrono::duration<double>(-tokens_ / rate_);
      due_.emplace(now + std::chrono::duration_cast<Clock::duration>(wait), std::move(then));
      cv_.notify_all();
      return;
    }
  }
  then();
}

void RefusalThrottle::ReleaseAll() {
  std::multimap<Clock::time_point, std::function<void()>> due;
  {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    due.swap(due_);
  }
  for (auto& [t, fn] : due) fn();
}

uint64_t RefusalThrottle::refused() const {
  std::lock_guard<std::mutex> lock(mu_);
  return refused_;
}

uint64_t RefusalThrottle::delayed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return delayed_;
}

void RefusalThrottle::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    if (due_.empty()) {
      if (stop_) return;
      cv_.wait(lock);
      continue;
    }
    if (!stop_ && Clock::now() < due_.begin()->first) {
      cv_.wait_until(lock, due_.begin()->first);
      continue;
    }
    std::function<void()> fn = std::move(due_.begin()->second);
    due_.erase(due_.begin());
    lock.unlock();
    fn();
    lock.lock();
  }
}

}  // namespace fm
