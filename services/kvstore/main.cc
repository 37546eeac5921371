// fm-kvstore: the tiered KV store service.
#include "common/flags.h"
#include "common/grpc_server.h"
#include "common/log.h"
#include "services/kvstore/flags.h"
#include "services/kvstore/kvstore_service.h"

int main(int argc, char** argv) {
  fm::BlockTerminationSignals();
  CLI::App app{"FlashMemory kvstore: page store with a UCX-registered RAM tier and RocksDB spill"};
  fm::ServerOptions server;
  server.port = 50052;
  fm::KvStoreOptions kv;
  bool verbose = false;
  fm::AddServerFlags(app, &server);
  fm::AddKvStoreFlags(app, &kv);
  fm::AddLogFlags(app, &verbose);
  CLI11_PARSE(app, argc, argv);
  if (verbose) fm::SetLogLevel(fm::LogLevel::kDebug);

  fm::MetricsRegistry metrics;
  auto store = fm::KvStore::Open(kv, &metrics);
  if (!store.ok()) {
    FM_LOG_ERROR("kvstore: %s", store.status().ToString().c_str());
    return 1;
  }
  auto auth = fm::MakeAuthenticator(server);
  if (!auth.ok()) {
    FM_LOG_ERROR("%s: %s", "kvstore", auth.status().ToString().c_str());
    return 1;
  }
  fm::KvStoreService service(store->get(), kv.max_keys_per_call, auth->get());
  fm::GrpcServerRunner runner(server, &metrics);
  runner.AddService(&service, "flashmemory.v1.KvStore");
  return runner.ServeUntilSignal("kvstore");
}
