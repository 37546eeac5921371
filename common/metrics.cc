#include "common/metrics.h"

#include <httplib.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace fm {

Counter* MetricsRegistry::GetCounter(const std::string& name, const std::string& help,
                                     const std::string& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = families_[name];
  f.help = help;
  f.type = "counter";
  auto& slot = f.counters[labels];
  if (!slot) slot = std::make_unique<Counter>();
  return slot.get();
}

Gauge* MetricsRegistry::GetGauge(const std::string& name, const std::string& help,
                                 const std::string& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = families_[name];
  f.help = help;
  f.type = "gauge";
  auto& slot = f.gauges[labels];
  if (!slot) slot = std::make_unique<Gauge>();
  return slot.get();
}

void MetricsRegistry::AddCollector(std::function<void(std::string*)> collector) {
  std::lock_guard<std::mutex> lock(mu_);
  collectors_.push_back(std::move(collector));
}

std::string MetricsRegistry::RenderPrometheus() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  auto series = [](const std::string& name, const std::string& labels) {
    return labels.empty() ? name : absl::StrCat(name, "{", labels, "}");
  };
  for (const auto& [name, f] : families_) {
    absl::StrAppend(&out, "# HELP ", name, " ", f.help, "\n# TYPE ", name, " ", f.type, "\n");
    for (const auto& [labels, c] : f.counters)
      absl::StrAppend(&out, series(name, labels), " ", c->Value(), "\n");
    for (const auto& [labels, g] : f.gauges)
      absl::StrAppend(&out, series(name, labels), " ", absl::StrFormat("%.17g", g->Value()), "\n");
  }
  for (const auto& c : collectors_) c(&out);
  return out;
}

struct MetricsHttpServer::Impl {
  httplib::Server server;
};

MetricsHttpServer::MetricsHttpServer(const MetricsRegistry* registry)
    : registry_(registry), impl_(std::make_unique<Impl>()) {}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

absl::Status MetricsHttpServer::Start(const std::string& host, int port) {
  impl_->server.set_keep_alive_max_count(1);  // scrapes are rare; never hold shutdown
  impl_->server.set_keep_alive_timeout(1);
  impl_->server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry_->RenderPrometheus(), "text/plain; version=0.0.4");
  });
  impl_->server.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  if (port == 0) {
    port_ = impl_->server.bind_to_any_port(host);
  } else {
    port_ = impl_->server.bind_to_port(host, port) ? port : -1;
  }
  if (port_ <= 0)
    return absl::UnavailableError(absl::StrCat("metrics: cannot bind ", host, ":", port));
  thread_ = std::thread([this] { impl_->server.listen_after_bind(); });
  return absl::OkStatus();
}

void MetricsHttpServer::Stop() {
  if (thread_.joinable()) {
    impl_->server.stop();
    thread_.join();
  }
}

}  // namespace fm
