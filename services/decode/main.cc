// fm-decode: the decode worker service. Pages live in the kvstore replicas (--kvstore),
// predictions come from the indexer replicas (--indexer).
#include "common/flags.h"
#include "common/grpc_server.h"
#include "common/log.h"
#include "services/decode/decode_service.h"
#include "services/decode/flags.h"
#include "services/decode/remote.h"

int main(int argc, char** argv) {
  fm::BlockTerminationSignals();
  CLI::App app{"FlashMemory decode worker: sparse attention over a device reserve of pages"};
  fm::ServerOptions server;
  server.port = 50054;
  fm::decode::DecodeOptions options;
  std::string kvstore = "127.0.0.1:50052", indexer = "127.0.0.1:50053";
  bool use_ucx = true, verbose = false;
  int indexer_deadline_ms = 10000;
  std::string service_token;
  fm::AddServerFlags(app, &server);
  app.add_option("--service_token", service_token,
                 "Bearer token of this worker's service identity at the kvstore and indexer "
                 "(else, under mTLS, its certificate --tls_cert names it)");
  fm::decode::AddDecodeFlags(app, &options);
  app.add_option("--kvstore", kvstore, "kvstore replicas: h:p,h:p or dns:NAME:PORT")
      ->capture_default_str();
  app.add_option("--indexer", indexer, "indexer replicas: h:p,h:p or dns:NAME:PORT")
      ->capture_default_str();
  app.add_flag("!--no_ucx", use_ucx, "Read pages over gRPC instead of UCX");
  app.add_option("--indexer_deadline_ms", indexer_deadline_ms,
                 "Deadline of an indexer call (a prediction past it fails; the set serving keeps "
                 "serving)")
      ->capture_default_str();
  fm::AddLogFlags(app, &verbose);
  CLI11_PARSE(app, argc, argv);
  if (verbose) fm::SetLogLevel(fm::LogLevel::kDebug);

  auto replicas = fm::ResolveReplicas(kvstore);
  if (!replicas.ok()) {
    FM_LOG_ERROR("decode: --kvstore: %s", replicas.status().ToString().c_str());
    return 1;
  }
  // The worker reaches the kvstore and the indexer with its own certificate (mTLS) and/or
  // its service token.
  fm::ClientSecurity security;
  if (!server.tls.ca.empty()) security.tls = server.tls;  // its CA verifies the servers
  security.token = service_token;
  fm::KvClientOptions ko;
  ko.use_ucx = use_ucx;
  ko.security = security;
  auto kv = fm::ShardedKvClient::Connect(*replicas, ko);
  if (!kv.ok()) {
    FM_LOG_ERROR("decode: kvstore: %s", kv.status().ToString().c_str());
    return 1;
  }
  auto ix = fm::indexer::IndexerClient::Connect(indexer, indexer_deadline_ms, security);
  if (!ix.ok()) {
    FM_LOG_ERROR("decode: indexer: %s", ix.status().ToString().c_str());
    return 1;
  }
  auto store = fm::decode::RemotePageStore(kv->get());
  fm::decode::DecodeCore core(options, store.get(), ix->get());
  fm::MetricsRegistry metrics;
  auto auth = fm::MakeAuthenticator(server);
  if (!auth.ok()) {
    FM_LOG_ERROR("%s: %s", "decode", auth.status().ToString().c_str());
    return 1;
  }
  fm::decode::DecodeService service(&core, auth->get());
  fm::decode::AddDecodeMetrics(&core, &metrics, store.get());
  service.AddMetrics(&metrics);
  fm::GrpcServerRunner runner(server, &metrics);
  runner.AddService(&service, "flashmemory.v1.Decode", [&] { service.Drain(); });
  return runner.ServeUntilSignal("decode");
}
