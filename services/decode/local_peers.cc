// In-process peers of a decode core: the all-in-one server's kvstore and indexer, without
// a network hop (and what tests and the fuzzers use).
#include "services/decode/local_peers.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/page_format.h"
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

}  // namespace

std::unique_ptr<PageStore> LocalPageStore(fm::KvStore* store) {
  return std::make_unique<LocalStore>(store);
}

}  // namespace fm::decode
