// gRPC server scaffolding shared by every FlashMemory binary: health (grpc.health.v1),
// reflection, message size limits, a ready file for process supervisors and tests, a
// Prometheus metrics port, and graceful shutdown on SIGTERM that drains in-flight calls.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/metrics.h"
#include "common/security.h"
#include "common/status.h"

namespace fm {

// Finishes a unary callback call with `s` (converted at the RPC edge) and returns its reactor.
inline grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx,
                                             const absl::Status& s) {
  auto* r = ctx->DefaultReactor();
  r->Finish(ToGrpcStatus(s));
  return r;
}

struct ServerOptions {
  // Listen address. Loopback by default; a non-loopback address needs TLS (tls) or an
  // explicit insecure.
  std::string host = "127.0.0.1";
  int port = 50051;                  // gRPC port; 0 = any free port (see ready_file)
  int max_message_bytes = 64 << 20;  // max gRPC message size, both directions
  int metrics_port = -1;             // Prometheus /metrics HTTP port; -1 = off, 0 = any free
  std::string ready_file;  // written once serving: "<grpc port>\n<metrics port>\n"; empty = none
  int shutdown_grace_ms = 10000;  // drain deadline for in-flight calls on shutdown
  TlsOptions tls;          // the server's certificate (and the CA its clients must come from)
  bool insecure = false;   // serve a non-loopback address without TLS
  AuthOptions auth;        // tokens file and service names (common/security.h)
};

// The authenticator a server's services check callers with (mTLS when the server has a CA).
absl::StatusOr<std::unique_ptr<Authenticator>> MakeAuthenticator(const ServerOptions& o);

class GrpcServerRunner {
 public:
  GrpcServerRunner(ServerOptions options, MetricsRegistry* metrics);
  ~GrpcServerRunner();

  // Services are owned by the caller and must outlive the runner.
  // on_drain (may be empty) runs when shutdown begins, before in-flight calls are drained.
  void AddService(grpc::Service* service, const std::string& health_name,
                  std::function<void()> on_drain = nullptr);
  absl::Status Start();
  int port() const { return port_; }
  int metrics_port() const { return metrics_http_ ? metrics_http_->port() : -1; }
  // Stops accepting calls, waits up to shutdown_grace_ms for in-flight ones, then cancels.
  void Shutdown();
  // For a binary's main: starts, serves until SIGTERM or SIGINT, drains. Returns the exit
  // code (1 when the server cannot start). `name` prefixes the log lines.
  int ServeUntilSignal(const char* name);

 private:
  ServerOptions options_;
  MetricsRegistry* metrics_;
  std::vector<std::pair<grpc::Service*, std::string>> services_;
  std::vector<std::function<void()>> on_drain_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  int port_ = 0;
};

// Blocks SIGTERM and SIGINT in the calling thread and every thread it creates later. Call
// first thing in main.
void BlockTerminationSignals();
// Waits for SIGTERM or SIGINT (blocked beforehand) and returns its number.
int WaitForTerminationSignal();

}  // namespace fm
