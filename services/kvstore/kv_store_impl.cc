#include "services/kvstore/kv_store_impl.h"

#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/log.h"
#include "common/status.h"

namespace fm {
absl::StatusOr<std::unique_ptr<KvStore>> KvStore::Open(const KvStoreOptions& options,
                                                       MetricsRegistry* metrics) {
  auto store = std::make_unique<KvStoreImpl>(options, metrics);
  FM_RETURN_IF_ERROR(store->Init());
  return std::unique_ptr<KvStore>(std::move(store));
}

KvStoreImpl::KvStoreImpl(const KvStoreOptions& options, MetricsRegistry* metrics)
    : options_(options), metrics_(metrics) {
  // Lease ids start at a random point, so that a release meant for an earlier process on the
  // same address (a client that has not noticed a restart) names no lease of this one.
  std::random_device rd;
  absl::MutexLock l(&mu_);
  next_lease_ = ((uint64_t{rd()} << 32 | rd()) >> 12) + 1;
}

KvStoreImpl::~KvStoreImpl() {
  {
    std::lock_guard<std::mutex> lock(reaper_mu_);
    stop_ = true;
  }
  reaper_cv_.notify_all();
  if (reaper_.joinable()) reaper_.join();
  {
    absl::MutexLock lock(&mu_);
    ram_.reset();
  }
  region_.reset();
  ucx_.reset();
  if (heap_) munmap(heap_, options_.ram_bytes);
}

absl::Status KvStoreImpl::Init() {
  if (options_.ram_bytes < 4096)
    return absl::InvalidArgumentError("ram_bytes must be at least 4096");
  if (options_.enable_ucx) {
    FM_ASSIGN_OR_RETURN(ucx_, UcxEngine::Create(/*progress_thread=*/true));
    FM_ASSIGN_OR_RETURN(region_, ucx_->MapRegion(options_.ram_bytes));
    arena_ = region_->data();
  } else {
    heap_ = mmap(nullptr, options_.ram_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
    if (heap_ == MAP_FAILED) {
      heap_ = nullptr;
      return absl::ResourceExhaustedError("cannot map the RAM arena");
    }
    arena_ = static_cast<uint8_t*>(heap_);
  }
  RocksTierOptions ro;
  ro.path = options_.db_path;
  ro.sync_writes = options_.sync_writes;
  FM_ASSIGN_OR_RETURN(disk_, RocksTier::Open(ro));

  absl::MutexLock lock(&mu_);
  ram_ = std::make_unique<RamTier>(arena_, options_.ram_bytes, options_.slab_bytes);
  // Recover per-session totals from the headers of every durable page.
  uint64_t pages = 0;
  absl::Status scan = disk_->ScanHeaders([&](absl::string_view key, absl::string_view hdr) {
    std::string sid;
    uint64_t page;
    PageHeaderData h;
    if (!DecodePageKey(key, &sid, &page) || hdr.size() != kPageHeaderBytes ||
        !DecodePageHeader(reinterpret_cast<const uint8_t*>(hdr.data()), &h).ok()) {
      FM_LOG_WARN("kvstore: skipping a malformed meta entry during recovery");
      return;
    }
    if (page == kClosedMarkPage && h.spec_hash != 0)  // a closed session's TTL runs on
      closed_[sid] = static_cast<int64_t>(h.spec_hash);
    SessionState& ss = sessions_[sid];
    if (page == kEpochPage) ss.epoch = std::max(ss.epoch, h.spec_hash);
    uint64_t len = kPageHeaderBytes + h.payload_bytes;
    ss.bytes += len;
    ss.pages[page] = PageInfo{len, next_version_++};
    ++pages;
  });
  FM_RETURN_IF_ERROR(scan);
  FM_LOG_INFO("kvstore: recovered %llu pages of %zu sessions from %s",
              static_cast<unsigned long long>(pages), sessions_.size(), options_.db_path.c_str());

  if (metrics_) {
    puts_metric_ = metrics_->GetCounter("fm_kvstore_puts_total", "Pages stored.");
    put_bytes_metric_ = metrics_->GetCounter("fm_kvstore_put_bytes_total", "Record bytes stored.");
    read_bytes_metric_ =
        metrics_->GetCounter("fm_kvstore_read_bytes_total", "Record bytes read over gRPC.");
    metrics_->AddCollector([this](std::string* out) { RenderMetrics(out); });
  }
  reaper_ = std::thread([this] { ReaperLoop(); });
  return absl::OkStatus();
}

UcxEndpointInfo KvStoreImpl::ucx() const {
  UcxEndpointInfo info;
  if (!ucx_) return info;
  info.worker_address = ucx_->worker_address();
  info.rkey = region_->packed_rkey();
  info.arena_base = reinterpret_cast<uint64_t>(region_->data());
  info.arena_bytes = region_->size();
  return info;
}

absl::Status KvStoreImpl::ValidateHeader(const PageHeaderData& h) const {
  FM_RETURN_IF_ERROR(ValidateSessionId(h.session_id));
  if (h.payload_bytes == 0)
    return absl::InvalidArgumentError("payload_bytes is 0; a page has a payload");
  if (h.payload_bytes > options_.max_page_bytes)
    return absl::ResourceExhaustedError(absl::StrCat(
        "page payload is ", h.payload_bytes, " bytes; the limit is ", options_.max_page_bytes));
  if (DTypeSize(h.dtype) == 0)
    return absl::InvalidArgumentError("page dtype is unspecified or unknown");
  if (h.token_count == 0) return absl::InvalidArgumentError("token_count is 0");
  return absl::OkStatus();
}

absl::Status KvStoreImpl::CheckLimitLocked(const PageHeaderData& h) const {
  if (options_.max_session_bytes == 0) return absl::OkStatus();
  uint64_t bytes = 0, old_len = 0;
  if (auto sit = sessions_.find(h.session_id); sit != sessions_.end()) {
    bytes = sit->second.bytes;
    if (auto pit = sit->second.pages.find(h.page); pit != sit->second.pages.end())
      old_len = pit->second.record_len;
  }
  const uint64_t new_bytes = bytes - old_len + kPageHeaderBytes + h.payload_bytes;
  if (new_bytes > options_.max_session_bytes)
    return absl::ResourceExhaustedError(absl::StrCat("session \"", h.session_id, "\" would hold ",
                                                     new_bytes, " bytes; the limit is ",
                                                     options_.max_session_bytes));
  return absl::OkStatus();
}

absl::Status KvStoreImpl::FenceLocked(const std::string& sid, uint64_t epoch) {
  if (epoch == 0) return absl::OkStatus();
  auto it = sessions_.find(sid);
  if (it == sessions_.end() || epoch >= it->second.epoch) return absl::OkStatus();
  return absl::AbortedError(absl::StrCat("session \"", sid,
                                         "\" moved to another worker: a write of epoch ", epoch,
                                         ", its owner holds epoch ", it->second.epoch));
}

absl::Status KvStoreImpl::ReserveLocked(const PageHeaderData& h, bool* had_old, PageInfo* old) {
  FM_RETURN_IF_ERROR(FenceLocked(h.session_id, h.epoch));
  FM_RETURN_IF_ERROR(CheckLimitLocked(h));
  SessionState& ss = sessions_[h.session_id];
  uint64_t len = kPageHeaderBytes + h.payload_bytes;
  auto it = ss.pages.find(h.page);
  *had_old = it != ss.pages.end();
  if (*had_old) *old = it->second;
  uint64_t new_bytes = ss.bytes - (*had_old ? old->record_len : 0) + len;
  if (options_.max_session_bytes > 0 && new_bytes > options_.max_session_bytes) {
    if (ss.pages.empty()) sessions_.erase(h.session_id);
    return absl::ResourceExhaustedError(absl::StrCat("session \"", h.session_id, "\" would hold ",
                                                     new_bytes, " bytes; the limit is ",
                                                     options_.max_session_bytes));
  }
  ss.bytes = new_bytes;
  ss.pages[h.page] = PageInfo{len, next_version_++};
  return absl::OkStatus();
}

void KvStoreImpl::RollbackLocked(const PageHeaderData& h, bool had_old, const PageInfo& old) {
  auto sit = sessions_.find(h.session_id);
  if (sit == sessions_.end()) return;
  SessionState& ss = sit->second;
  auto it = ss.pages.find(h.page);
  if (it == ss.pages.end()) return;
  ss.bytes -= it->second.record_len;
  if (had_old) {
    ss.bytes += old.record_len;
    it->second = old;
  } else {
    ss.pages.erase(it);
    if (ss.pages.empty()) sessions_.erase(sit);
  }
}

RamCell* KvStoreImpl::AllocateLocked(uint64_t len) {
  std::vector<std::string> evicted;
  RamCell* c = ram_->Allocate(len, &evicted);
  for (const std::string& k : evicted) {
    std::string sid;
    uint64_t page;
    if (!DecodePageKey(k, &sid, &page)) continue;
    auto it = sessions_.find(sid);
    if (it != sessions_.end() && it->second.ram_pages > 0) --it->second.ram_pages;
  }
  return c;
}

void KvStoreImpl::PublishLocked(RamCell* cell, const std::string& key, const std::string& sid) {
  bool replaced = false;
  ram_->Publish(cell, key, &replaced);
  if (!replaced) {
    auto it = sessions_.find(sid);
    if (it != sessions_.end()) ++it->second.ram_pages;
  }
}

absl::Status KvStoreImpl::Put(const PageHeaderData& header, const uint8_t* payload, size_t len,
                              bool* in_ram) {
  bool reopened = false;
  FM_RETURN_IF_ERROR(PutRecord(header, payload, len, in_ram, &reopened));
  // A write to a session marked closed (a resumed worker's) keeps it: the mark goes.
  if (reopened) (void)WriteCloseMark(header.session_id, 0);
  return absl::OkStatus();
}

absl::Status KvStoreImpl::WriteCloseMark(const std::string& sid, int64_t closed_at) {
  const uint8_t payload[1] = {0};
  PageHeaderData h;
  h.session_id = sid;
  h.page = kClosedMarkPage;
  h.spec_hash = static_cast<uint64_t>(closed_at);
  h.token_count = 1;
  h.dtype = DType::kFp32;
  h.payload_bytes = 1;
  h.checksum = Checksum64(payload, 1);
  bool in_ram, reopened;
  return PutRecord(h, payload, 1, &in_ram, &reopened);
}

absl::StatusOr<uint64_t> KvStoreImpl::ClaimSession(const std::string& sid, uint64_t min_epoch) {
  FM_RETURN_IF_ERROR(ValidateSessionId(sid));
  uint64_t e;
  {
    absl::MutexLock lock(&mu_);
    SessionState& ss = sessions_[sid];
    e = std::max(ss.epoch + 1, min_epoch);
    ss.epoch = e;  // fences at once; the record makes it durable
  }
  const uint8_t payload[1] = {0};
  PageHeaderData h;
  h.session_id = sid;
  h.page = kEpochPage;
  h.spec_hash = e;
  h.token_count = 1;
  h.dtype = DType::kFp32;
  h.payload_bytes = 1;
  h.checksum = Checksum64(payload, 1);
  bool in_ram;
  FM_RETURN_IF_ERROR(Put(h, payload, 1, &in_ram));
  return e;
}

absl::Status KvStoreImpl::CloseSession(const std::string& sid, uint64_t epoch) {
  FM_RETURN_IF_ERROR(ValidateSessionId(sid));
  {
    absl::MutexLock lock(&mu_);
    if (!sessions_.contains(sid))
      return absl::NotFoundError(absl::StrCat("unknown session \"", sid, "\""));
    FM_RETURN_IF_ERROR(FenceLocked(sid, epoch));
  }
  const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  return WriteCloseMark(sid, now);
}

void KvStoreImpl::ExpireClosedSessions() {
  if (options_.closed_session_ttl_s == 0) return;
  const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  std::vector<std::string> due;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [sid, at] : closed_)
      if (now - at >= static_cast<int64_t>(options_.closed_session_ttl_s)) due.push_back(sid);
  }
  for (const std::string& sid : due) {
    absl::StatusOr<uint64_t> n = DeleteSession(sid);
    if (n.ok())
      FM_LOG_INFO("kvstore: deleted closed session \"%s\" (%llu pages) after its TTL of %llu s",
                  sid.c_str(), static_cast<unsigned long long>(*n),
                  static_cast<unsigned long long>(options_.closed_session_ttl_s));
  }
}

absl::Status KvStoreImpl::PutRecord(const PageHeaderData& header, const uint8_t* payload,
                                    size_t len, bool* in_ram, bool* reopened) {
  *in_ram = false;
  *reopened = false;
  FM_RETURN_IF_ERROR(ValidateHeader(header));
  if (len != header.payload_bytes)
    return absl::InvalidArgumentError(
        absl::StrCat("payload is ", len, " bytes; header says ", header.payload_bytes));
  if (Checksum64(payload, len) != header.checksum)
    return absl::DataLossError(absl::StrCat("page ", header.page, " of session \"",
                                            header.session_id,
                                            "\": payload checksum does not match the header"));
  const std::string key = EncodePageKey(header.session_id, header.page);
  const uint64_t record_len = kPageHeaderBytes + len;
  absl::MutexLock stripe(&StripeFor(key));
  bool had_old;
  PageInfo old, mine;
  RamCell* cell;
  {
    absl::MutexLock lock(&mu_);
    FM_RETURN_IF_ERROR(ReserveLocked(header, &had_old, &old));
    mine = sessions_[header.session_id].pages[header.page];
    cell = AllocateLocked(record_len);
  }
  uint8_t hdr[kPageHeaderBytes];
  EncodePageHeader(header, hdr);
  absl::Status s = disk_->Put(key, hdr, kPageHeaderBytes, payload, len);
  if (cell && s.ok()) {
    std::memcpy(arena_ + cell->offset, hdr, kPageHeaderBytes);
    std::memcpy(arena_ + cell->offset + kPageHeaderBytes, payload, len);
  }
  absl::MutexLock lock(&mu_);
  if (!s.ok()) {
    RollbackLocked(header, had_old, old);
    if (cell) ram_->Unpin(cell);
    return s;
  }
  if (cell) {
    // Publish only if no newer put of this page (or a delete) overtook this one.
    auto sit = sessions_.find(header.session_id);
    bool current = sit != sessions_.end() && sit->second.pages.contains(header.page) &&
                   sit->second.pages[header.page].version == mine.version;
    if (current) {
      PublishLocked(cell, key, header.session_id);
      *in_ram = true;
    }
    ram_->Unpin(cell);
  }
  if (header.page == kEpochPage) {
    if (auto it = sessions_.find(header.session_id); it != sessions_.end())
      it->second.epoch = std::max(it->second.epoch, header.spec_hash);
  }
  if (header.page == kClosedMarkPage) {
    if (header.spec_hash != 0)
      closed_[header.session_id] = static_cast<int64_t>(header.spec_hash);
    else
      closed_.erase(header.session_id);
  } else {
    *reopened = closed_.erase(header.session_id) > 0;
  }
  if (puts_metric_) {
    puts_metric_->Add();
    put_bytes_metric_->Add(record_len);
  }
  return absl::OkStatus();
}

absl::StatusOr<RamCell*> KvStoreImpl::PinInRam(
    const PageRef& ref, const std::string& key, bool* promoted,
    const std::function<void(const uint8_t*, size_t)>* fallback) {
  *promoted = false;
  uint64_t version;
  {
    absl::MutexLock lock(&mu_);
    auto sit = sessions_.find(ref.session_id);
    if (sit == sessions_.end())
      return absl::NotFoundError(absl::StrCat("unknown session \"", ref.session_id, "\""));
    auto pit = sit->second.pages.find(ref.page);
    if (pit == sit->second.pages.end())
      return absl::NotFoundError(
          absl::StrCat("page ", ref.page, " of session \"", ref.session_id, "\" not found"));
    version = pit->second.version;
    if (RamCell* c = ram_->Find(key)) {
      ram_->Pin(c);
      ++hits_;
      ++sit->second.hits;
      return c;
    }
    ++misses_;
    ++sit->second.misses;
  }
  RamCell* result = nullptr;
  absl::Status s = disk_->Get(key, [&](const uint8_t* rec, size_t len) -> absl::Status {
    FM_RETURN_IF_ERROR(VerifyPageRecord(rec, len, ref.session_id, ref.page));
    RamCell* c;
    {
      absl::MutexLock lock(&mu_);
      ++spill_reads_;
      if ((c = ram_->Find(key)) != nullptr) {  // promoted meanwhile by another reader
        ram_->Pin(c);
        result = c;
        return absl::OkStatus();
      }
      c = AllocateLocked(len);
    }
    if (c == nullptr) {
      if (fallback) (*fallback)(rec, len);
      return absl::OkStatus();
    }
    std::memcpy(arena_ + c->offset, rec, len);
    absl::MutexLock lock(&mu_);
    auto sit = sessions_.find(ref.session_id);
    bool current = sit != sessions_.end() && sit->second.pages.contains(ref.page) &&
                   sit->second.pages[ref.page].version == version;
    if (!current) {
      ram_->Unpin(c);  // overtaken by a put or delete: drop the stale copy
      return absl::AbortedError("page changed while being read back; retry");
    }
    PublishLocked(c, key, ref.session_id);
    *promoted = true;
    result = c;
    return absl::OkStatus();
  });
  if (s.code() == absl::StatusCode::kNotFound)
    return absl::NotFoundError(
        absl::StrCat("page ", ref.page, " of session \"", ref.session_id, "\" not found"));
  FM_RETURN_IF_ERROR(s);
  return result;
}

absl::Status KvStoreImpl::Read(const PageRef& ref,
                               const std::function<void(const uint8_t*, size_t)>& sink,
                               bool* from_spill) {
  FM_RETURN_IF_ERROR(ValidateSessionId(ref.session_id));
  const std::string key = EncodePageKey(ref.session_id, ref.page);
  bool got_fallback = false;
  std::function<void(const uint8_t*, size_t)> fallback = [&](const uint8_t* rec, size_t len) {
    got_fallback = true;
    sink(rec, len);
  };
  absl::StatusOr<RamCell*> cell;
  for (int attempt = 0; attempt < 3; ++attempt) {
    cell = PinInRam(ref, key, from_spill, &fallback);
    if (cell.status().code() != absl::StatusCode::kAborted) break;
  }
  FM_RETURN_IF_ERROR(cell.status());
  if (got_fallback) {
    *from_spill = true;
    return absl::OkStatus();
  }
  RamCell* c = *cell;
  sink(arena_ + c->offset, c->record_len);
  if (read_bytes_metric_) read_bytes_metric_->Add(c->record_len);
  absl::MutexLock lock(&mu_);
  ram_->Unpin(c);
  return absl::OkStatus();
}

void KvStoreImpl::ReaperLoop() {
  std::unique_lock<std::mutex> lock(reaper_mu_);
  for (uint64_t round = 0; !stop_; ++round) {
    reaper_cv_.wait_for(lock, std::chrono::milliseconds(50));
    if (stop_) break;
    lock.unlock();
    ExpireLeases();
    if (round % 20 == 0) ExpireClosedSessions();  // about once a second
    lock.lock();
  }
}

absl::StatusOr<uint64_t> KvStoreImpl::DeleteSession(const std::string& sid, uint64_t epoch) {
  FM_RETURN_IF_ERROR(ValidateSessionId(sid));
  // Every stripe, in index order: no write of this session is between its reservation and
  // its publication while the pages go, so none lands after the range delete.
  for (auto& m : write_stripes_) m.Lock();
  struct Unlock {
    std::array<absl::Mutex, kWriteStripes>& m;
    ~Unlock() {
      for (size_t i = m.size(); i-- > 0;) m[i].Unlock();
    }
  } unlock{write_stripes_};
  uint64_t n;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(sid);
    if (it == sessions_.end())
      return absl::NotFoundError(absl::StrCat("unknown session \"", sid, "\""));
    FM_RETURN_IF_ERROR(FenceLocked(sid, epoch));
    n = it->second.pages.size();
    for (const auto& [page, info] : it->second.pages) ram_->Erase(EncodePageKey(sid, page));
    sessions_.erase(it);
    closed_.erase(sid);
  }
  FM_RETURN_IF_ERROR(disk_->DeleteSession(sid));
  return n;
}

absl::StatusOr<KvStats> KvStoreImpl::Stats(const std::string& session) {
  absl::MutexLock lock(&mu_);
  KvStats st;
  st.ram_bytes = ram_->used_bytes();
  st.ram_pages = ram_->pages();
  st.ram_capacity = ram_->capacity_bytes();
  st.evictions = ram_->evictions();
  st.pinned_pages = ram_->pinned_pages();
  st.hits = hits_;
  st.misses = misses_;
  st.spill_reads = spill_reads_;
  st.active_leases = leases_.size();
  for (const auto& [sid, ss] : sessions_) {
    st.disk_pages += ss.pages.size();
    st.disk_bytes += ss.bytes;
    if (session == "*" || session == sid)
      st.sessions.push_back(
          KvSessionStats{sid, ss.pages.size(), ss.bytes, ss.ram_pages, ss.hits, ss.misses});
  }
  if (!session.empty() && session != "*" && st.sessions.empty())
    return absl::NotFoundError(absl::StrCat("unknown session \"", session, "\""));
  return st;
}

void KvStoreImpl::RenderMetrics(std::string* out) {
  absl::StatusOr<KvStats> st = Stats("*");
  if (!st.ok()) return;
  auto one = [&](const char* name, const char* help, const char* type, uint64_t v) {
    AppendMetricFamily(out, name, help, type, {{"", double(v)}});
  };
  one("fm_kvstore_ram_bytes", "Record bytes in the RAM tier.", "gauge", st->ram_bytes);
  one("fm_kvstore_ram_pages", "Pages in the RAM tier.", "gauge", st->ram_pages);
  one("fm_kvstore_ram_capacity_bytes", "RAM tier budget.", "gauge", st->ram_capacity);
  one("fm_kvstore_disk_bytes", "Record bytes in RocksDB.", "gauge", st->disk_bytes);
  one("fm_kvstore_disk_pages", "Pages in RocksDB.", "gauge", st->disk_pages);
  one("fm_kvstore_pinned_pages", "RAM pages under a lease.", "gauge", st->pinned_pages);
  one("fm_kvstore_active_leases", "Leases not yet released or expired.", "gauge",
      st->active_leases);
  one("fm_kvstore_hits_total", "Reads served from RAM.", "counter", st->hits);
  one("fm_kvstore_misses_total", "Reads not in RAM.", "counter", st->misses);
  one("fm_kvstore_evictions_total", "Pages evicted from RAM.", "counter", st->evictions);
  one("fm_kvstore_spill_reads_total", "Pages read back from RocksDB.", "counter", st->spill_reads);
  std::vector<MetricSample> bytes, pages;
  for (const auto& s : st->sessions) {
    const std::string labels = absl::StrCat("session=\"", PrometheusLabelValue(s.session_id), "\"");
    bytes.push_back({labels, double(s.bytes)});
    pages.push_back({labels, double(s.pages)});
  }
  AppendMetricFamily(out, "fm_kvstore_session_bytes", "Durable bytes per session.", "gauge", bytes);
  AppendMetricFamily(out, "fm_kvstore_session_pages", "Durable pages per session.", "gauge", pages);
}

}  // namespace fm
