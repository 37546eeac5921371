// flashmemory: the all-in-one server. Hosts every FlashMemory service on one gRPC port with
// an embedded RocksDB directory: the default for a laptop, a test or a single GPU box.
// Services hosted so far: kvstore (the indexer and decode worker join as they land).
#include "common/flags.h"
#include "common/grpc_server.h"
#include "common/log.h"
#include "services/kvstore/flags.h"
#include "services/kvstore/kvstore_service.h"

int main(int argc, char** argv) {
  fm::BlockTerminationSignals();
  CLI::App app{"FlashMemory all-in-one server (kvstore on one port, embedded RocksDB)"};
  fm::ServerOptions server;
  server.port = 50051;
  fm::KvStoreOptions kv;
  std::string data_dir = "fm-data";
  bool verbose = false;
  fm::AddServerFlags(app, &server);
  fm::AddKvStoreFlags(app, &kv);
  app.add_option("--data_dir", data_dir,
                 "State directory (RocksDB under <data_dir>/kvstore unless --db is given)")
      ->capture_default_str();
  fm::AddLogFlags(app, &verbose);
  CLI11_PARSE(app, argc, argv);
  if (verbose) fm::SetLogLevel(fm::LogLevel::kDebug);
  if (app.count("--db") == 0) kv.db_path = data_dir + "/kvstore";

  fm::MetricsRegistry metrics;
  auto store = fm::KvStore::Open(kv, &metrics);
  if (!store.ok()) {
    FM_LOG_ERROR("flashmemory: %s", store.status().ToString().c_str());
    return 1;
  }
  fm::KvStoreService kv_service(store->get(), kv.max_keys_per_call);
  fm::GrpcServerRunner runner(server, &metrics);
  runner.AddService(&kv_service, "flashmemory.v1.KvStore");
  return runner.ServeUntilSignal("flashmemory");
}
