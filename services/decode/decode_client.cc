#include "services/decode/decode_client.h"

#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/spec_proto.h"
#include "common/status.h"
#include "services/decode/session_proto.h"

namespace fm::decode {
namespace v1 = flashmemory::v1;

absl::StatusOr<std::unique_ptr<DecodeClient>> DecodeClient::Connect(
    const std::string& target, int deadline_ms, const ClientSecurity& security) {
  auto creds = MakeChannelCredentials(security.tls);
  if (!creds.ok()) return creds.status();
  auto c = std::unique_ptr<DecodeClient>(new DecodeClient());
  c->token_ = security.token;
  grpc::ChannelArguments args = ClientChannelArgs(256 << 20);
  c->channel_ = grpc::CreateCustomChannel(target, *creds, args);
  c->stub_ = v1::Decode::NewStub(c->channel_);
  c->deadline_ms_ = deadline_ms;
  return c;
}

std::unique_ptr<grpc::ClientContext> DecodeClient::Context() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  AddBearerToken(ctx.get(), token_);
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms_));
  return ctx;
}

absl::StatusOr<uint64_t> DecodeClient::Open(const std::string& session, const SessionOptions& o) {
  v1::OpenSessionRequest req;
  req.set_session_id(session);
  SessionOptionsToProto(o, &req);
  v1::OpenSessionResponse resp;
  auto ctx = Context();
  grpc::Status st = stub_->OpenSession(ctx.get(), req, &resp);
  if (!st.ok()) return FromGrpcStatus(st);
  return resp.reserve_pages();
}

absl::Status DecodeClient::Prefill(const std::string& session, const ModelSpec& spec,
                                   const uint8_t* pages, uint64_t n_pages, uint64_t tokens,
                                   const uint8_t* keys, uint64_t chunks) {
  auto ctx = Context();
  v1::PrefillResponse resp;
  auto writer = stub_->Prefill(ctx.get(), &resp);
  const uint32_t P = spec.page_tokens;
  const size_t es = DTypeSize(spec.dtype), row = size_t{spec.head_dim} * es;
  const size_t kb = spec.IndexKeyBytes(), cpp = spec.ChunksPerPage();
  bool ok = true;
  for (uint64_t p = 0; p < n_pages && ok; ++p) {
    v1::PrefillChunk c;
    if (p == 0) c.set_session_id(session);
    const uint32_t valid = static_cast<uint32_t>(std::min<uint64_t>(P, tokens - p * P));
    c.set_first_token(p * P);
    c.set_tokens(valid);
    const uint8_t* page = pages + p * spec.PageBytes();
    if (valid == P) {
      c.set_kv(page, spec.PageBytes());  // a whole page is already [layer][K|V][head][token][d]
    } else {
      std::string* kv = c.mutable_kv();
      for (uint32_t l = 0; l < spec.layers; ++l)
        for (uint32_t k = 0; k < 2; ++k)
          for (uint32_t h = 0; h < spec.kv_heads; ++h)
            kv->append(reinterpret_cast<const char*>(page + spec.ElemOffset(l, k, h, 0) * es),
                       valid * row);
    }
    const uint64_t c0 = p * cpp, c1 = std::min<uint64_t>(chunks, (p + 1) * cpp);
    if (c1 > c0) {
      v1::IndexKeys* ik = c.mutable_index_keys();
      ik->set_first_chunk(c0);
      ik->set_chunks(static_cast<uint32_t>(c1 - c0));
      for (uint32_t l = 0; l < spec.index_layers; ++l)
        ik->mutable_data()->append(reinterpret_cast<const char*>(keys + (l * chunks + c0) * kb),
                                   (c1 - c0) * kb);
    }
    ok = writer->Write(c);
  }
  writer->WritesDone();
  grpc::Status st = writer->Finish();
  if (!st.ok()) return FromGrpcStatus(st);
  if (!ok) return absl::UnavailableError("prefill stream broke");
  return absl::OkStatus();
}

absl::Status DecodeClient::Close(const std::string& session, bool delete_pages) {
  v1::CloseSessionRequest req;
  req.set_session_id(session);
  req.set_delete_pages(delete_pages);
  v1::CloseSessionResponse resp;
  auto ctx = Context();
  return FromGrpcStatus(stub_->CloseSession(ctx.get(), req, &resp));
}

absl::StatusOr<v1::SessionStatsResponse> DecodeClient::Stats(const std::string& session,
                                                             const std::vector<uint64_t>& probe) {
  v1::SessionStatsRequest req;
  req.set_session_id(session);
  for (uint64_t p : probe) req.add_probe_pages(p);
  v1::SessionStatsResponse resp;
  auto ctx = Context();
  grpc::Status st = stub_->GetSessionStats(ctx.get(), req, &resp);
  if (!st.ok()) return FromGrpcStatus(st);
  return resp;
}

std::unique_ptr<DecodeClient::Stream> DecodeClient::OpenStream() {
  auto s = std::unique_ptr<Stream>(new Stream());
  AddBearerToken(&s->ctx_, token_);
  s->rw_ = stub_->DecodeStream(&s->ctx_);
  return s;
}

DecodeClient::Stream::~Stream() {
  if (!finished_) {
    ctx_.TryCancel();
    (void)Finish();
  }
}

absl::StatusOr<v1::DecodeResults> DecodeClient::Stream::Run(const v1::DecodeBatch& batch) {
  if (finished_) return absl::FailedPreconditionError("the stream is finished");
  v1::DecodeResults res;
  if (!rw_->Write(batch) || !rw_->Read(&res)) {
    absl::Status st = Finish();
    return st.ok() ? absl::UnavailableError("the step stream ended") : st;
  }
  return res;
}

absl::Status DecodeClient::Stream::Finish() {
  if (finished_) return absl::OkStatus();
  finished_ = true;
  rw_->WritesDone();
  return FromGrpcStatus(rw_->Finish());
}

}  // namespace fm::decode
