#include "services/decode/remote.h"

#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/log.h"

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
    const uint64_t room = kPageHeaderBytes + payload_bytes;
    if (region_ && InRegion(dst, room)) {
      // Cells of the reserve: one-sided reads land in them in place.
      std::vector<uint64_t> offsets;
      offsets.reserve(dst.size());
      for (uint8_t* d : dst) offsets.push_back(static_cast<uint64_t>(d - region_->data()));
      std::vector<PageHeaderData> headers;
      if (absl::Status st = kv_->ReadInto(keys, *region_, offsets, room, &headers); !st.ok())
        return st;
      for (size_t i = 0; i < headers.size(); ++i)
        if (headers[i].payload_bytes != payload_bytes)
          return absl::DataLossError(absl::StrCat("page ", pages[i], " of \"", session, "\" has ",
                                                  headers[i].payload_bytes,
                                                  " payload bytes; expected ", payload_bytes));
      in_place_ += pages.size();
      return absl::OkStatus();
    }
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
  absl::Status CloseSession(const std::string& session, uint64_t epoch) override {
    return kv_->CloseSession(session, epoch);
  }
  absl::StatusOr<uint64_t> ClaimSession(const std::string& session) override {
    return kv_->ClaimSession(session);
  }
  absl::Status DeleteSession(const std::string& session, uint64_t epoch) override {
    return kv_->DeleteSession(session, epoch).status();
  }
  uint8_t* AllocateReserve(size_t bytes) override {
    if (!kv_->engine() || region_) return nullptr;
    auto r = kv_->engine()->MapRegion(bytes);
    if (!r.ok()) {
      FM_LOG_WARN(
          "decode: the reserve (%zu bytes) could not be mapped for UCX (%s); fetches are "
          "copied into it",
          bytes, r.status().ToString().c_str());
      return nullptr;
    }
    region_ = std::move(*r);
    FM_LOG_INFO("decode: the reserve (%zu bytes) is mapped for UCX: fetches land in place", bytes);
    return region_->data();
  }
  uint64_t pages_read_in_place() const override { return in_place_.load(); }

 private:
  bool InRegion(const std::vector<uint8_t*>& dst, uint64_t room) const {
    for (const uint8_t* d : dst)
      if (d < region_->data() || d + room > region_->data() + region_->size()) return false;
    return true;
  }

  ShardedKvClient* kv_;
  std::unique_ptr<UcxRegion> region_;  // the worker's reserve, when mapped
  std::atomic<uint64_t> in_place_{0};
};

}  // namespace

std::unique_ptr<PageStore> RemotePageStore(ShardedKvClient* kv) {
  return std::make_unique<RemoteStore>(kv);
}

}  // namespace fm::decode
