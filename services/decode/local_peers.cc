// In-process peers of a decode core: the all-in-one server's kvstore and indexer, without
// a network hop (and what tests and the fuzzers use).
#include "services/decode/local_peers.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/page_format.h"
#include "services/indexer/indexer_core.h"
#include "services/kvstore/kv_store.h"

namespace fm::decode {

namespace {

class LocalStore : public PageStore {
 public:
  explicit LocalStore(fm::KvStore* s) : s_(s) {}
  absl::Status Put(const PageHeaderData& h, const uint8_t* payload) override {
    bool in_ram = false;
    return s_->Put(h, payload, h.payload_bytes, &in_ram);
  }
  absl::Status Read(const std::string& session, const std::vector<uint64_t>& pages,
                    size_t payload_bytes, const std::vector<uint8_t*>& dst) override {
    for (size_t i = 0; i < pages.size(); ++i) {
      absl::Status copied = absl::OkStatus();
      bool from_spill = false;
      absl::Status st = s_->Read(
          {session, pages[i]},
          [&](const uint8_t* rec, size_t len) {
            if (len != kPageHeaderBytes + payload_bytes)
              copied = absl::DataLossError(absl::StrCat("page ", pages[i], " of \"", session,
                                                        "\" has ", len, " record bytes"));
            else
              std::memcpy(dst[i], rec, len);
          },
          &from_spill);
      if (!st.ok()) return st;
      if (!copied.ok()) return copied;
    }
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ReadPayload(const std::string& session, uint64_t page) override {
    std::string out;
    bool from_spill = false;
    absl::Status st = s_->Read(
        {session, page},
        [&](const uint8_t* rec, size_t len) {
          out.assign(reinterpret_cast<const char*>(rec) + kPageHeaderBytes, len - kPageHeaderBytes);
        },
        &from_spill);
    if (!st.ok()) return st;
    return out;
  }
  absl::Status CloseSession(const std::string& session, uint64_t epoch) override {
    return s_->CloseSession(session, epoch);
  }
  absl::StatusOr<uint64_t> ClaimSession(const std::string& session) override {
    return s_->ClaimSession(session);
  }
  absl::Status DeleteSession(const std::string& session, uint64_t epoch) override {
    return s_->DeleteSession(session, epoch).status();
  }

 private:
  fm::KvStore* s_;
};

class LocalIndexer : public Predictor {
 public:
  explicit LocalIndexer(indexer::IndexerCore* c) : c_(c) {}
  absl::Status Register(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                        uint64_t chunks, uint64_t tokens, const float* bounds,
                        uint64_t bound_pages) override {
    return c_->Register(session, spec, keys, chunks, tokens, bounds, bound_pages);
  }
  absl::Status Append(const std::string& session, const ModelSpec&, const uint8_t* keys,
                      uint64_t first_chunk, uint64_t chunks, uint64_t tokens, const float* bounds,
                      uint64_t first_page, uint64_t bound_pages) override {
    return c_->Append(session, keys, first_chunk, chunks, tokens, bounds, first_page, bound_pages);
  }
  absl::StatusOr<indexer::Prediction> Predict(const std::string& session,
                                              const indexer::PredictArgs& args) override {
    return c_->Predict(session, args);
  }
  absl::Status Drop(const std::string& session) override { return c_->Drop(session); }

 private:
  indexer::IndexerCore* c_;
};

}  // namespace

std::unique_ptr<PageStore> LocalPageStore(fm::KvStore* store) {
  return std::make_unique<LocalStore>(store);
}
std::unique_ptr<Predictor> LocalPredictor(indexer::IndexerCore* core) {
  return std::make_unique<LocalIndexer>(core);
}

}  // namespace fm::decode
