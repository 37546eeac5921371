// RefusalThrottle: what a flood of requests the server must refuse (unknown sessions,
// malformed requests, batches beyond the bound) may cost the others. Receiving and parsing
// a refused request costs the worker by its bytes, as much as serving a tiny one, so a
// client that sends them as fast as the worker answers takes CPU from every other session.
// Refused requests draw their cost (the service's unit: bytes for fm-decode) on a token
// bucket shared by all streams (`per_second`, bursts up to `burst`); a
// stream whose refusals overdraw it gets its answer late, by the time the bucket needs to
// refill, and since a stream holds one batch at a time its next batch waits too. Requests
// that are served are never charged and never wait.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

namespace fm {

class RefusalThrottle {
 public:
  // per_second <= 0: no throttle (Charge runs `then` at once). max_delay_ms bounds the debt
  // one wait repays.
  RefusalThrottle(double per_second, double burst, double max_delay_ms = 30000);
  ~RefusalThrottle();  // runs what still waits, at once
  RefusalThrottle(const RefusalThrottle&) = delete;
  RefusalThrottle& operator=(const RefusalThrottle&) = delete;

  // Charges the cost of refused requests and runs `then`: at once on this thread while the bucket
  // covers them, else on the throttle's thread once it has refilled.
  void Charge(uint64_t refused, std::function<void()> then);

  // Drain: what waits runs now, and later charges never wait (a server shutting down must
  // not hold throttled calls past its grace period).
  void ReleaseAll();

  uint64_t refused() const;  // cost charged
  uint64_t delayed() const;  // charges that waited

 private:
  using Clock = std::chrono::steady_clock;
  void Loop();

  const double rate_, burst_, max_delay_ms_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  double tokens_;
  Clock::time_point refilled_;
  uint64_t refused_ = 0, delayed_ = 0;
  bool stop_ = false, released_ = false;
  std::multimap<Clock::time_point, std::function<void()>> due_;
  std::thread thread_;
};

}  // namespace fm
