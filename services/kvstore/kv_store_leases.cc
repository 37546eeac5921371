// KvStoreImpl's leases: RAM cells pinned for one-sided UCX reads (Acquire) and writes
// (GrantPut, CommitPut), their expiry, and the bounds of the lease table and of each client's
// share of it.
#include "services/kvstore/kv_store_impl.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/status.h"

namespace fm {

uint32_t KvStoreImpl::LeaseMs(uint32_t requested) const {
  uint32_t ms = requested == 0 ? options_.default_lease_ms : requested;
  return std::min(ms, options_.max_lease_ms);
}

absl::Status KvStoreImpl::AdmitLeaseLocked(const std::string& client, uint64_t bytes) {
  if (leases_.size() >= options_.max_leases)
    return absl::ResourceExhaustedError(absl::StrCat(
        "the kvstore holds its limit of ", options_.max_leases, " leases; release some"));
  ClientUse& u = clients_[client];
  const uint64_t max_bytes = options_.max_pinned_bytes_per_client
                                 ? options_.max_pinned_bytes_per_client
                                 : options_.ram_bytes / 2;
  absl::Status st;
  if (u.leases >= options_.max_leases_per_client)
    st = absl::ResourceExhaustedError(absl::StrCat("this client holds its limit of ",
                                                   options_.max_leases_per_client, " leases"));
  else if (u.bytes + bytes > max_bytes)
    st = absl::ResourceExhaustedError(absl::StrCat("this client would pin ", u.bytes + bytes,
                                                   " bytes; its limit is ", max_bytes));
  if (!st.ok()) {
    if (u.leases == 0) clients_.erase(client);
    return st;
  }
  ++u.leases;
  u.bytes += bytes;
  return absl::OkStatus();
}

void KvStoreImpl::ForgetLeaseLocked(const LeaseState& lease) {
  auto it = clients_.find(lease.client);
  if (it == clients_.end()) return;
  it->second.leases -= std::min<uint64_t>(it->second.leases, 1);
  it->second.bytes -= std::min(it->second.bytes, lease.bytes);
  if (it->second.leases == 0) clients_.erase(it);
}

absl::StatusOr<Lease> KvStoreImpl::Acquire(const std::vector<PageRef>& keys, uint32_t lease_ms,
                                           const std::string& client) {
  if (keys.empty()) return absl::InvalidArgumentError("no pages requested");
  if (keys.size() > options_.max_keys_per_call)
    return absl::ResourceExhaustedError(
        absl::StrCat(keys.size(), " pages in one call; the limit is ", options_.max_keys_per_call));
  for (const PageRef& k : keys) FM_RETURN_IF_ERROR(ValidateSessionId(k.session_id));
  LeaseState state;
  Lease lease;
  absl::Status failure;
  for (const PageRef& k : keys) {
    const std::string key = EncodePageKey(k.session_id, k.page);
    absl::StatusOr<RamCell*> cell;
    bool promoted = false;
    for (int attempt = 0; attempt < 3; ++attempt) {
      cell = PinInRam(k, key, &promoted, nullptr);
      if (cell.status().code() != absl::StatusCode::kAborted) break;
    }
    if (!cell.ok()) {
      failure = cell.status();
      break;
    }
    if (*cell == nullptr) {
      failure = absl::ResourceExhaustedError(
          "RAM tier is full of pinned pages; release leases or raise ram_bytes");
      break;
    }
    lease.promoted += promoted ? 1 : 0;
    state.cells.push_back(*cell);
    lease.locations.push_back(LeasedLocation{
        k, reinterpret_cast<uint64_t>(arena_ + (*cell)->offset), (*cell)->record_len});
  }
  absl::MutexLock lock(&mu_);
  state.client = client;
  for (RamCell* c : state.cells) state.bytes += c->record_len;
  if (failure.ok()) failure = AdmitLeaseLocked(client, state.bytes);
  if (!failure.ok()) {
    for (RamCell* c : state.cells) ram_->Unpin(c);
    return failure;
  }
  state.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(LeaseMs(lease_ms));
  lease.id = next_lease_++;
  leases_.emplace(lease.id, std::move(state));
  return lease;
}

absl::StatusOr<Lease> KvStoreImpl::GrantPut(const PageHeaderData& header, uint32_t lease_ms,
                                            const std::string& client) {
  FM_RETURN_IF_ERROR(ValidateHeader(header));
  const uint64_t record_len = kPageHeaderBytes + header.payload_bytes;
  absl::MutexLock lock(&mu_);
  LeaseState state;
  state.client = client;
  state.bytes = record_len;
  state.is_put = true;
  state.put_header = header;
  state.put_key = EncodePageKey(header.session_id, header.page);
  // Reserve the RAM cell first: without one there is nothing to write into.
  RamCell* c = AllocateLocked(record_len);
  if (c == nullptr)
    return absl::ResourceExhaustedError(
        "RAM tier is full of pinned pages; use PutPage or release leases");
  // The session's accounting changes only at CommitPut; here the limit and the owner's
  // epoch are checked early (and again at the commit).
  absl::Status s = FenceLocked(header.session_id, header.epoch);
  if (s.ok()) s = CheckLimitLocked(header);
  if (!s.ok()) {
    ram_->Unpin(c);
    return s;
  }
  if (absl::Status admit = AdmitLeaseLocked(client, record_len); !admit.ok()) {
    ram_->Unpin(c);
    return admit;
  }
  state.cells.push_back(c);
  state.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(LeaseMs(lease_ms));
  Lease lease;
  lease.id = next_lease_++;
  lease.locations.push_back(LeasedLocation{PageRef{header.session_id, header.page},
                                           reinterpret_cast<uint64_t>(arena_ + c->offset),
                                           record_len});
  leases_.emplace(lease.id, std::move(state));
  return lease;
}

absl::Status KvStoreImpl::CommitPut(uint64_t lease_id) {
  LeaseState state;
  {
    absl::MutexLock lock(&mu_);
    auto it = leases_.find(lease_id);
    if (it == leases_.end())
      return absl::NotFoundError(absl::StrCat("lease ", lease_id, " is unknown or expired"));
    if (!it->second.is_put)
      return absl::InvalidArgumentError(absl::StrCat("lease ", lease_id, " is not a put grant"));
    state = std::move(it->second);
    ForgetLeaseLocked(state);
    leases_.erase(it);
  }
  const PageHeaderData& want = state.put_header;
  RamCell* c = state.cells[0];
  const uint8_t* rec = arena_ + c->offset;
  PageHeaderData got;
  absl::Status s = VerifyPageRecord(rec, c->record_len, want.session_id, want.page, &got);
  if (s.ok() && (got.spec_hash != want.spec_hash || got.token_count != want.token_count ||
                 got.dtype != want.dtype || got.checksum != want.checksum))
    s = absl::DataLossError("written page header differs from the granted header");
  if (!s.ok()) {
    absl::MutexLock lock(&mu_);
    ram_->Unpin(c);  // unpublished: freed
    return s;
  }
  // From here on, as Put: reserve, write to RocksDB, publish, under the page's stripe.
  absl::MutexLock stripe(&StripeFor(state.put_key));
  bool had_old;
  PageInfo old;
  {
    absl::MutexLock lock(&mu_);
    s = ReserveLocked(want, &had_old, &old);
    if (!s.ok()) {
      ram_->Unpin(c);
      return s;
    }
  }
  s = disk_->Put(state.put_key, rec, kPageHeaderBytes, rec + kPageHeaderBytes, got.payload_bytes);
  absl::MutexLock lock(&mu_);
  if (!s.ok()) {
    RollbackLocked(want, had_old, old);
    ram_->Unpin(c);
    return s;
  }
  PublishLocked(c, state.put_key, want.session_id);
  ram_->Unpin(c);
  if (puts_metric_) {
    puts_metric_->Add();
    put_bytes_metric_->Add(c->record_len);
  }
  return absl::OkStatus();
}

void KvStoreImpl::EndLeaseLocked(LeaseState& lease) {
  for (RamCell* c : lease.cells) ram_->Unpin(c);
}

absl::Status KvStoreImpl::Release(uint64_t lease_id) {
  absl::MutexLock lock(&mu_);
  auto it = leases_.find(lease_id);
  if (it == leases_.end())
    return absl::NotFoundError(absl::StrCat("lease ", lease_id, " is unknown or expired"));
  EndLeaseLocked(it->second);
  ForgetLeaseLocked(it->second);
  leases_.erase(it);
  return absl::OkStatus();
}

void KvStoreImpl::ExpireLeases() {
  auto now = std::chrono::steady_clock::now();
  absl::MutexLock lock(&mu_);
  for (auto it = leases_.begin(); it != leases_.end();) {
    if (it->second.deadline <= now) {
      EndLeaseLocked(it->second);
      ForgetLeaseLocked(it->second);
      leases_.erase(it++);
    } else {
      ++it;
    }
  }
}

}  // namespace fm
