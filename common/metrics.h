// A small metrics registry rendered in the Prometheus text exposition format, and an HTTP
// exporter serving it at /metrics. Counters and gauges are lock-free once created.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"

namespace fm {

class Counter {
 public:
  void Add(uint64_t n = 1) { v_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t Value() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> v_{0};
};

class Gauge {
 public:
  void Set(double v) { v_.store(v, std::memory_order_relaxed); }
  void Add(double d) {
    double cur = v_.load(std::memory_order_relaxed);
    while (!v_.compare_exchange_weak(cur, cur + d, std::memory_order_relaxed)) {
    }
  }
  double Value() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> v_{0};
};

// The Prometheus text exposition format, for the registry and for collectors.
struct MetricSample {
  std::string labels;  // inside of the braces, e.g. `tier="ram"`; empty = none
  double value = 0;
};
// Appends the HELP and TYPE lines of a family and one line per sample.
void AppendMetricFamily(std::string* out, const std::string& name, const std::string& help,
                        const std::string& type, const std::vector<MetricSample>& samples);
// A label value escaped for the format; bytes outside printable ASCII become %XX.
std::string PrometheusLabelValue(const std::string& v);

// Thread-safe. Metrics live as long as the registry; returned pointers stay valid.
class MetricsRegistry {
 public:
  // `labels` is the inside of the braces, e.g. `tier="ram"`; empty = no labels.
  Counter* GetCounter(const std::string& name, const std::string& help,
                      const std::string& labels = "");
  Gauge* GetGauge(const std::string& name, const std::string& help, const std::string& labels = "");
  // A collector appends whole exposition lines (for values computed on scrape, such as
  // per-session totals). Called under the registry lock; must not call back into it.
  void AddCollector(std::function<void(std::string* out)> collector);

  std::string RenderPrometheus() const;

 private:
  struct Family {
    std::string help, type;
    std::map<std::string, std::unique_ptr<Counter>> counters;
    std::map<std::string, std::unique_ptr<Gauge>> gauges;
  };
  mutable std::mutex mu_;
  std::map<std::string, Family> families_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void(std::string*)>> collectors_ ABSL_GUARDED_BY(mu_);
};

// Serves GET /metrics (Prometheus text) and GET /healthz on a background thread.
class MetricsHttpServer {
 public:
  explicit MetricsHttpServer(const MetricsRegistry* registry);
  ~MetricsHttpServer();
  // Binds host:port (port 0 = any free port) and starts serving.
  absl::Status Start(const std::string& host, int port);
  int port() const { return port_; }
  void Stop();

 private:
  struct Impl;
  const MetricsRegistry* registry_;
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace fm
