// fm-indexer: the Neural Memory Indexer service.
#include "common/flags.h"
#include "common/grpc_server.h"
#include "common/log.h"
#include "services/indexer/flags.h"
#include "services/indexer/indexer_service.h"

int main(int argc, char** argv) {
  fm::BlockTerminationSignals();
  CLI::App app{"FlashMemory indexer: predicts each session's pages for the next cycle"};
  fm::ServerOptions server;
  server.port = 50053;
  fm::indexer::IndexerFlags flags;
  bool verbose = false;
  fm::AddServerFlags(app, &server);
  fm::indexer::AddIndexerFlags(app, &flags);
  fm::AddLogFlags(app, &verbose);
  CLI11_PARSE(app, argc, argv);
  if (verbose) fm::SetLogLevel(fm::LogLevel::kDebug);
  auto core = fm::indexer::MakeIndexerCore(flags);
  if (!core.ok()) {
    FM_LOG_ERROR("indexer: %s", core.status().ToString().c_str());
    return 1;
  }
  fm::MetricsRegistry metrics;
  auto auth = fm::MakeAuthenticator(server);
  if (!auth.ok()) {
    FM_LOG_ERROR("%s: %s", "indexer", auth.status().ToString().c_str());
    return 1;
  }
  fm::indexer::IndexerService service(core->get(), auth->get(), flags.weights_dir);
  fm::indexer::AddIndexerMetrics(core->get(), &metrics);
  fm::GrpcServerRunner runner(server, &metrics);
  runner.AddService(&service, "flashmemory.v1.Indexer");
  return runner.ServeUntilSignal("indexer");
}
