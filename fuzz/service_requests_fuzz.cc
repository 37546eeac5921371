// libFuzzer target: the request validation of every service. The three services run in
// process behind one gRPC server (as in the all-in-one) and are called over its in-process
// channel. The first input byte picks an RPC of flashmemory.v1.Decode, Indexer or KvStore,
// the rest is its request message (one message for the streaming calls). Every call must
// end with a status, whatever the request; the server must never crash. The decode core
// holds a real session "s" (fuzz_world.h) for requests to reach past the session lookup.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>

#include "fuzz/fuzz_world.h"
#include "services/decode/decode_service.h"
#include "services/indexer/indexer_service.h"
#include "services/kvstore/kv_store.h"
#include "services/kvstore/kvstore_service.h"

namespace {
namespace v1 = flashmemory::v1;

struct Server {
  std::unique_ptr<fm::KvStore> kv;
  std::unique_ptr<fm::KvStoreService> kv_service;
  std::unique_ptr<fm::indexer::IndexerService> ix_service;
  std::unique_ptr<fm::decode::DecodeService> decode_service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<v1::Decode::Stub> decode;
  std::unique_ptr<v1::Indexer::Stub> indexer;
  std::unique_ptr<v1::KvStore::Stub> kvstore;
};

Server& TheServer() {
  static Server* s = [] {
    auto* s = new Server();
    fm::fuzz::World& w = fm::fuzz::TheWorld();
    const std::string dir = std::filesystem::temp_directory_path() /
                            ("fm_fuzz_services_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir + "/weights");
    fm::KvStoreOptions ko;
    ko.db_path = dir + "/kv";
    ko.ram_bytes = 32 << 20;
    ko.slab_bytes = 4 << 20;
    ko.enable_ucx = false;
    auto kv = fm::KvStore::Open(ko, nullptr);
    if (!kv.ok()) std::abort();
    s->kv = std::move(*kv);
    s->kv_service = std::make_unique<fm::KvStoreService>(s->kv.get());
    // LoadWeights reads only under an empty directory: the fuzzer names no file it can open.
    s->ix_service = std::make_unique<fm::indexer::IndexerService>(w.indexer.get(), nullptr,
                                                                  dir + "/weights");
    s->decode_service = std::make_unique<fm::decode::DecodeService>(w.core.get());
    grpc::ServerBuilder b;
    b.RegisterService(s->kv_service.get());
    b.RegisterService(s->ix_service.get());
    b.RegisterService(s->decode_service.get());
    s->server = b.BuildAndStart();
    auto ch = s->server->InProcessChannel(grpc::ChannelArguments());
    s->decode = v1::Decode::NewStub(ch);
    s->indexer = v1::Indexer::NewStub(ch);
    s->kvstore = v1::KvStore::NewStub(ch);
    // s is closed after the world's build: open it again (a resume) for steps to reach it.
    fm::decode::SessionOptions so = w.options;
    so.resume = true;
    if (!w.core->Open("s", so).ok()) std::abort();
    return s;
  }();
  return *s;
}

void Deadline(grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
}

template <typename Req, typename Resp, typename Stub>
void Unary(const std::string& bytes, Stub* stub,
           grpc::Status (Stub::*fn)(grpc::ClientContext*, const Req&, Resp*)) {
  Req req;
  if (!req.ParseFromString(bytes)) return;
  grpc::ClientContext ctx;
  Deadline(&ctx);
  Resp resp;
  (stub->*fn)(&ctx, req, &resp);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  Server& s = TheServer();
  const std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 23) {
    case 0: return Unary(bytes, s.decode.get(), &v1::Decode::Stub::OpenSession), 0;
    case 1: {
      v1::PrefillChunk c;
      if (!c.ParseFromString(bytes)) return 0;
      grpc::ClientContext ctx;
      Deadline(&ctx);
      v1::PrefillResponse resp;
      auto w = s.decode->Prefill(&ctx, &resp);
      w->Write(c);
      w->WritesDone();
      (void)w->Finish();
      return 0;
    }
    case 2: {
      v1::DecodeBatch b;
      if (!b.ParseFromString(bytes)) return 0;
      grpc::ClientContext ctx;
      Deadline(&ctx);
      auto rw = s.decode->DecodeStream(&ctx);
      rw->Write(b);
      rw->WritesDone();
      v1::DecodeResults r;
      while (rw->Read(&r)) {
      }
      (void)rw->Finish();
      return 0;
    }
    case 3: return Unary(bytes, s.decode.get(), &v1::Decode::Stub::CloseSession), 0;
    case 4: return Unary(bytes, s.decode.get(), &v1::Decode::Stub::GetSessionStats), 0;
    case 5: return Unary(bytes, s.indexer.get(), &v1::Indexer::Stub::RegisterSession), 0;
    case 6: return Unary(bytes, s.indexer.get(), &v1::Indexer::Stub::AppendKeys), 0;
    case 7: return Unary(bytes, s.indexer.get(), &v1::Indexer::Stub::Predict), 0;
    case 8: return Unary(bytes, s.indexer.get(), &v1::Indexer::Stub::DropSession), 0;
    case 9: return Unary(bytes, s.indexer.get(), &v1::Indexer::Stub::LoadWeights), 0;
    case 10: return Unary(bytes, s.indexer.get(), &v1::Indexer::Stub::GetStats), 0;
    case 11: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::Connect), 0;
    case 12: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::PutPage), 0;
    case 13: {
      v1::GetPagesRequest req;
      if (!req.ParseFromString(bytes)) return 0;
      grpc::ClientContext ctx;
      Deadline(&ctx);
      auto r = s.kvstore->GetPages(&ctx, req);
      v1::PageData d;
      while (r->Read(&d)) {
      }
      (void)r->Finish();
      return 0;
    }
    case 14: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::Resolve), 0;
    case 15: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::GrantPut), 0;
    case 16: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::CommitPut), 0;
    case 17: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::Prefetch), 0;
    case 18: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::Release), 0;
    case 19: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::DeleteSession), 0;
    case 20: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::CloseSession), 0;
    case 21: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::ClaimSession), 0;
    default: return Unary(bytes, s.kvstore.get(), &v1::KvStore::Stub::GetStats), 0;
  }
}
