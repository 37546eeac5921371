#include "services/decode/remote.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace fm::decode {
namespace {

class RemoteStore : public PageStore {
 public:
  explicit RemoteStore(ShardedKvClient* kv) : kv_(kv) {}
  absl::Status Put(const PageHeaderData& h, const uint8_t* payload) override {
    return kv_->Put(h, payload);
  }
  absl::Status Read(const std::string& session, const std::vector<uint64_t>& pages,
                    size_t payload_bytes, const std::vector<uint8_t*>& dst) override {
    std::vector<PageRef> keys;
    keys.reserve(pages.size());
    for (uint64_t p : pages) keys.push_back({session, p});
    auto recs = kv_->Read(keys);  // verified: header names the page, checksum matches
    if (!recs.ok()) return recs.status();
    for (size_t i = 0; i < recs->size(); ++i) {
      const PageRecord& r = (*recs)[i];
      if (r.payload.size() != payload_bytes)
        return absl::DataLossError(absl::StrCat("page ", pages[i], " of \"", session, "\" has ",
                                                r.payload.size(), " payload bytes; expected ",
                                                payload_bytes));
      EncodePageHeader(r.header, dst[i]);
      std::memcpy(dst[i] + kPageHeaderBytes, r.payload.data(), payload_bytes);
    }
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ReadPayload(const std::string& session, uint64_t page) override {
    auto recs = kv_->Read({{session, page}});
    if (!recs.ok()) return recs.status();
    return std::move((*recs)[0].payload);
  }
  absl::Status DeleteSession(const std::string& session) override {
    return kv_->DeleteSession(session).status();
  }

 private:
  ShardedKvClient* kv_;
};

class RemoteIndexer : public Predictor {
 public:
  explicit RemoteIndexer(indexer::IndexerClient* ix) : ix_(ix) {}
  absl::Status Register(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                        uint64_t chunks, uint64_t tokens, const float* bounds,
                        uint64_t bound_pages) override {
    return ix_->Register(session, spec, keys, chunks, tokens, bounds, bound_pages);
  }
  absl::Status Append(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                      uint64_t first_chunk, uint64_t chunks, uint64_t tokens, const float* bounds,
                      uint64_t first_page, uint64_t bound_pages) override {
    return ix_->Append(session, spec, keys, first_chunk, chunks, tokens, bounds, first_page,
                       bound_pages);
  }
  absl::StatusOr<indexer::Prediction> Predict(const std::string& session,
                                              const indexer::PredictArgs& args) override {
    return ix_->Predict(session, args);
  }
  absl::Status Drop(const std::string& session) override { return ix_->Drop(session); }

 private:
  indexer::IndexerClient* ix_;
};

}  // namespace

std::unique_ptr<PageStore> RemotePageStore(ShardedKvClient* kv) {
  return std::make_unique<RemoteStore>(kv);
}
std::unique_ptr<Predictor> RemotePredictor(indexer::IndexerClient* ix) {
  return std::make_unique<RemoteIndexer>(ix);
}

}  // namespace fm::decode
