#include "common/throttle.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace fm {
namespace {

using Clock = std::chrono::steady_clock;

TEST(RefusalThrottleTest, ChargesWithinTheBurstRunAtOnceOnTheCallersThread) {
  RefusalThrottle t(1000, 100);
  const auto me = std::this_thread::get_id();
  std::thread::id ran;
  t.Charge(60, [&] { ran = std::this_thread::get_id(); });
  EXPECT_EQ(ran, me);
  t.Charge(40, [&] { ran = std::this_thread::get_id(); });
  EXPECT_EQ(ran, me);
  bool served = false;
  t.Charge(0, [&] { served = true; });  // a batch with nothing refused never waits
  EXPECT_TRUE(served);
  EXPECT_EQ(t.refused(), 100u);
  EXPECT_EQ(t.delayed(), 0u);
}

TEST(RefusalThrottleTest, AnOverdraftWaitsUntilTheBucketRefills) {
  RefusalThrottle t(1000, 10);  // 10 in the bucket, 1,000 per second
  std::atomic<bool> ran{false};
  const auto start = Clock::now();
  t.Charge(90, [&] { ran = true; });  // 80 over: 80 ms
  EXPECT_EQ(t.delayed(), 1u);
  for (int i = 0; i < 500 && !ran; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_TRUE(ran);
  EXPECT_GE(Clock::now() - start, std::chrono::milliseconds(75));
}

TEST(RefusalThrottleTest, ReleaseAllRunsWhatWaitsAndLaterChargesNeverWait) {
  RefusalThrottle t(1, 1);  // one per second: a charge of 100 waits the 30 s cap
  std::atomic<int> ran{0};
  t.Charge(100, [&] { ++ran; });
  t.Charge(100, [&] { ++ran; });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(ran, 0);
  t.ReleaseAll();
  EXPECT_EQ(ran, 2);
  t.Charge(100, [&] { ++ran; });
  EXPECT_EQ(ran, 3);
  EXPECT_EQ(t.refused(), 300u);
  EXPECT_EQ(t.delayed(), 2u);
}

TEST(RefusalThrottleTest, DestructionRunsWhatStillWaits) {
  std::atomic<int> ran{0};
  {
    RefusalThrottle t(1, 1);
    t.Charge(50, [&] { ++ran; });
    EXPECT_EQ(ran, 0);
  }
  EXPECT_EQ(ran, 1);
}

TEST(RefusalThrottleTest, ZeroRateIsOff) {
  RefusalThrottle t(0, 0);
  int ran = 0;
  t.Charge(1u << 30, [&] { ++ran; });
  EXPECT_EQ(ran, 1);
  EXPECT_EQ(t.delayed(), 0u);
}

}  // namespace
}  // namespace fm
