#include "common/metrics.h"

#include <gtest/gtest.h>

namespace fm {
namespace {

TEST(Metrics, RendersPrometheusText) {
  MetricsRegistry r;
  r.GetCounter("fm_hits_total", "Reads served from RAM.", "tier=\"ram\"")->Add(3);
  r.GetCounter("fm_hits_total", "Reads served from RAM.", "tier=\"ram\"")->Add(2);
  r.GetGauge("fm_bytes", "Bytes held.")->Set(1.5);
  r.AddCollector([](std::string* out) { *out += "fm_sessions 7\n"; });
  std::string text = r.RenderPrometheus();
  EXPECT_NE(text.find("# TYPE fm_hits_total counter\n"), std::string::npos);
  EXPECT_NE(text.find("fm_hits_total{tier=\"ram\"} 5\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE fm_bytes gauge\nfm_bytes 1.5\n"), std::string::npos);
  EXPECT_NE(text.find("fm_sessions 7\n"), std::string::npos);
}

}  // namespace
}  // namespace fm
