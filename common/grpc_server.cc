#include "common/grpc_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <csignal>
#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace fm {

absl::StatusOr<std::unique_ptr<Authenticator>> MakeAuthenticator(const ServerOptions& o) {
  AuthOptions a = o.auth;
  a.mtls = o.tls.server_tls() && !o.tls.ca.empty();
  return Authenticator::Create(a);
}

GrpcServerRunner::GrpcServerRunner(ServerOptions options, MetricsRegistry* metrics)
    : options_(std::move(options)), metrics_(metrics) {}

GrpcServerRunner::~GrpcServerRunner() { Shutdown(); }

void GrpcServerRunner::AddService(grpc::Service* service, const std::string& health_name,
                                  std::function<void()> on_drain) {
  services_.emplace_back(service, health_name);
  if (on_drain) on_drain_.push_back(std::move(on_drain));
}

absl::Status GrpcServerRunner::Start() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // No SO_REUSEPORT: a second server on a port already served must fail to start, not
  // share the port's connections with the first (acknowledged writes would be split
  // between two processes).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  auto creds = MakeServerCredentials(options_.tls);
  if (!creds.ok()) return creds.status();
  if (!options_.tls.server_tls() && !IsLoopbackHost(options_.host)) {
    if (!options_.insecure)
      return absl::FailedPreconditionError(absl::StrCat(
          "listening on ", options_.host,
          " (not loopback) without TLS: give --tls_cert and --tls_key, or --insecure"));
    FM_LOG_WARN("serving %s WITHOUT TLS (--insecure): anyone who reaches it can call it",
                options_.host.c_str());
  }
  builder.AddListeningPort(absl::StrCat(options_.host, ":", options_.port), *creds, &port_);
  builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
  builder.SetMaxSendMessageSize(options_.max_message_bytes);
  for (auto& [svc, name] : services_) builder.RegisterService(svc);
  server_ = builder.BuildAndStart();
  if (!server_ || port_ == 0)
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options_.host, ":", options_.port,
                     options_.port != 0 ? " (is another process serving that port?)" : ""));
  auto* health = server_->GetHealthCheckService();
  for (auto& [svc, name] : services_) health->SetServingStatus(name, true);
  health->SetServingStatus(true);
  if (options_.metrics_port >= 0 && metrics_ != nullptr) {
    metrics_http_ = std::make_unique<MetricsHttpServer>(metrics_);
    absl::Status s = metrics_http_->Start(options_.host, options_.metrics_port);
    if (!s.ok()) return s;
  }
  if (!options_.ready_file.empty()) {
    std::string tmp = options_.ready_file + ".tmp";
    {
      std::ofstream f(tmp);
      f << port_ << "\n" << metrics_port() << "\n";
    }
    if (std::rename(tmp.c_str(), options_.ready_file.c_str()) != 0)
      return absl::InternalError(absl::StrCat("cannot write ready file ", options_.ready_file));
  }
  FM_LOG_INFO("serving gRPC on %s:%d (metrics port %d)", options_.host.c_str(), port_,
              metrics_port());
  return absl::OkStatus();
}

void GrpcServerRunner::Shutdown() {
  if (server_) {
    server_->GetHealthCheckService()->SetServingStatus(false);
    for (auto& fn : on_drain_) fn();
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(options_.shutdown_grace_ms));
    server_->Wait();
    server_.reset();
  }
  if (metrics_http_) {
    metrics_http_->Stop();
    metrics_http_.reset();
  }
}

int GrpcServerRunner::ServeUntilSignal(const char* name) {
  if (absl::Status s = Start(); !s.ok()) {
    FM_LOG_ERROR("%s: %s", name, s.ToString().c_str());
    return 1;
  }
  const int sig = WaitForTerminationSignal();
  FM_LOG_INFO("%s: signal %d, draining", name, sig);
  Shutdown();
  return 0;
}

void BlockTerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForTerminationSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

}  // namespace fm
