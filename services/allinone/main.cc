// flashmemory: the all-in-one server. Hosts every FlashMemory service on one gRPC port with
// an embedded RocksDB directory: the default for a laptop, a test or a single GPU box.
#include <filesystem>

#include "common/flags.h"
#include "common/grpc_server.h"
#include "common/log.h"
#include "services/decode/decode_service.h"
#include "services/decode/flags.h"
#include "services/decode/local_peers.h"
#include "services/indexer/flags.h"
#include "services/indexer/indexer_service.h"
#include "services/kvstore/flags.h"
#include "services/kvstore/kvstore_service.h"

int main(int argc, char** argv) {
  fm::BlockTerminationSignals();
  CLI::App app{
      "FlashMemory all-in-one server (decode worker, indexer and kvstore on one port, embedded "
      "RocksDB)"};
  fm::ServerOptions server;
  server.port = 50051;
  fm::KvStoreOptions kv;
  std::string data_dir = "fm-data";
  bool verbose = false;
  fm::AddServerFlags(app, &server);
  fm::AddKvStoreFlags(app, &kv);
  fm::indexer::IndexerFlags ix;
  fm::indexer::AddIndexerFlags(app, &ix);
  fm::decode::DecodeOptions decode;
  fm::decode::AddDecodeFlags(app, &decode);
  app.add_option("--data_dir", data_dir,
                 "State directory (RocksDB under <data_dir>/kvstore unless --db is given)")
      ->capture_default_str();
  fm::AddLogFlags(app, &verbose);
  CLI11_PARSE(app, argc, argv);
  if (verbose) fm::SetLogLevel(fm::LogLevel::kDebug);
  if (app.count("--db") == 0) {
    kv.db_path = data_dir + "/kvstore";
    std::error_code ec;
    std::filesystem::create_directories(data_dir, ec);
    if (ec) {
      FM_LOG_ERROR("flashmemory: cannot create %s: %s", data_dir.c_str(), ec.message().c_str());
      return 1;
    }
  }

  fm::MetricsRegistry metrics;
  auto store = fm::KvStore::Open(kv, &metrics);
  if (!store.ok()) {
    FM_LOG_ERROR("flashmemory: %s", store.status().ToString().c_str());
    return 1;
  }
  auto core = fm::indexer::MakeIndexerCore(ix);
  if (!core.ok()) {
    FM_LOG_ERROR("flashmemory: %s", core.status().ToString().c_str());
    return 1;
  }
  auto auth = fm::MakeAuthenticator(server);
  if (!auth.ok()) {
    FM_LOG_ERROR("%s: %s", "flashmemory", auth.status().ToString().c_str());
    return 1;
  }
  fm::KvStoreService kv_service(store->get(), kv.max_keys_per_call, auth->get());
  fm::indexer::IndexerService ix_service(core->get(), auth->get(), ix.weights_dir);
  fm::indexer::AddIndexerMetrics(core->get(), &metrics);
  // The decode worker reads and writes pages and asks for predictions in process.
  auto page_store = fm::decode::LocalPageStore(store->get());
  fm::decode::DecodeCore decode_core(decode, page_store.get(), core->get());
  fm::decode::DecodeService decode_service(&decode_core, auth->get());
  fm::decode::AddDecodeMetrics(&decode_core, &metrics);
  decode_service.AddMetrics(&metrics);
  fm::GrpcServerRunner runner(server, &metrics);
  runner.AddService(&decode_service, "flashmemory.v1.Decode", [&] { decode_service.Drain(); });
  runner.AddService(&kv_service, "flashmemory.v1.KvStore");
  runner.AddService(&ix_service, "flashmemory.v1.Indexer");
  return runner.ServeUntilSignal("flashmemory");
}
