// Command-line flags shared by the binaries. Include only from main.cc files: CLI11 is heavy.
#pragma once

#include <CLI/CLI.hpp>

#include "common/grpc_server.h"
#include "common/log.h"

namespace fm {

// The TLS files of a server (its own certificate, its clients' CA) or of a client (the
// servers' CA, its own certificate for mTLS).
inline void AddTlsFlags(CLI::App& app, TlsOptions* t) {
  app.add_option("--tls_cert", t->cert, "TLS certificate (PEM)");
  app.add_option("--tls_key", t->key, "TLS private key (PEM)");
  app.add_option("--tls_ca", t->ca,
                 "TLS CA (PEM): a server requires client certificates from it, a client "
                 "verifies servers against it");
}

inline void AddServerFlags(CLI::App& app, ServerOptions* o) {
  app.add_option("--host", o->host, "Listen address")->capture_default_str();
  app.add_option("--port", o->port, "gRPC port (0 = any free port)")->capture_default_str();
  app.add_option("--max_message_bytes", o->max_message_bytes, "Largest gRPC message, bytes")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  app.add_option("--metrics_port", o->metrics_port, "Prometheus /metrics port (-1 = off, 0 = any)")
      ->capture_default_str();
  app.add_option("--ready_file", o->ready_file, "Written with the bound ports once serving");
  app.add_option("--shutdown_grace_ms", o->shutdown_grace_ms, "Drain deadline on SIGTERM, ms")
      ->capture_default_str();
  AddTlsFlags(app, &o->tls);
  app.add_flag("--insecure", o->insecure,
               "Serve a non-loopback --host without TLS (a trusted network only)");
  app.add_option("--tokens_file", o->auth.tokens_file,
                 "Bearer tokens: lines \"<token> <name> [tenant|service]\"");
  app.add_option("--service_names", o->auth.service_names,
                 "mTLS certificate common names that are services")
      ->capture_default_str();
}


inline void AddLogFlags(CLI::App& app, bool* verbose) {
  app.add_flag("-v,--verbose", *verbose, "Debug logging");
}

}  // namespace fm
