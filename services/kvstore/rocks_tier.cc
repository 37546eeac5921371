#include "services/kvstore/rocks_tier.h"

#include <rocksdb/cache.h>
#include <rocksdb/db.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace fm {
namespace {

absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat(what, ": not found"));
  if (s.IsCorruption()) return absl::DataLossError(absl::StrCat(what, ": ", s.ToString()));
  if (s.IsNoSpace()) return absl::ResourceExhaustedError(absl::StrCat(what, ": ", s.ToString()));
  return absl::InternalError(absl::StrCat(what, ": ", s.ToString()));
}

std::string SessionPrefix(absl::string_view sid) {
  std::string k;
  k.push_back(static_cast<char>(sid.size()));
  k.append(sid.data(), sid.size());
  return k;
}

}  // namespace

std::string EncodePageKey(absl::string_view sid, uint64_t page) {
  std::string k = SessionPrefix(sid);
  for (int i = 7; i >= 0; --i) k.push_back(static_cast<char>((page >> (8 * i)) & 0xff));
  return k;
}

bool DecodePageKey(absl::string_view key, std::string* sid, uint64_t* page) {
  if (key.empty()) return false;
  size_t n = static_cast<uint8_t>(key[0]);
  if (key.size() != 1 + n + 8) return false;
  sid->assign(key.data() + 1, n);
  uint64_t p = 0;
  for (size_t i = 0; i < 8; ++i) p = (p << 8) | static_cast<uint8_t>(key[1 + n + i]);
  *page = p;
  return true;
}

absl::StatusOr<std::unique_ptr<RocksTier>> RocksTier::Open(const RocksTierOptions& options) {
  std::unique_ptr<RocksTier> t(new RocksTier());
  t->options_ = options;
  rocksdb::Options opts;
  opts.create_if_missing = true;
  opts.create_missing_column_families = true;
  opts.IncreaseParallelism(2);
  rocksdb::ColumnFamilyOptions pages;
  rocksdb::BlockBasedTableOptions table;
  table.block_cache = rocksdb::NewLRUCache(options.block_cache_bytes);
  table.block_size = 64 << 10;
  pages.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  pages.write_buffer_size = 128u << 20;
  pages.compression = rocksdb::kNoCompression;  // KV payloads do not compress
  pages.enable_blob_files = false;  // measured: inline values read back faster (fm-bench kvstore)
  pages.min_blob_size = 4096;
  rocksdb::ColumnFamilyOptions meta;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{rocksdb::kDefaultColumnFamilyName, pages},
                                                      {"meta", meta}};
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* db = nullptr;
  rocksdb::DBOptions dbo(opts);
  rocksdb::Status s = rocksdb::DB::Open(dbo, options.path, cfs, &handles, &db);
  if (!s.ok()) return FromRocks(s, absl::StrCat("open RocksDB at ", options.path));
  t->db_.reset(db);
  t->pages_cf_ = handles[0];
  t->meta_cf_ = handles[1];
  return t;
}

RocksTier::~RocksTier() {
  if (db_) {
    db_->DestroyColumnFamilyHandle(meta_cf_);
    db_->DestroyColumnFamilyHandle(pages_cf_);
    rocksdb::Status s = db_->Close();
    (void)s;  // closing on shutdown: nothing left to report to
  }
}

absl::Status RocksTier::Put(const std::string& key, const uint8_t* header, size_t header_len,
                            const uint8_t* payload, size_t payload_len) {
  rocksdb::WriteBatch batch;
  rocksdb::Slice key_slice(key);
  rocksdb::Slice parts[2] = {rocksdb::Slice(reinterpret_cast<const char*>(header), header_len),
                             rocksdb::Slice(reinterpret_cast<const char*>(payload), payload_len)};
  rocksdb::Status s =
      batch.Put(pages_cf_, rocksdb::SliceParts(&key_slice, 1), rocksdb::SliceParts(parts, 2));
  if (s.ok()) s = batch.Put(meta_cf_, key_slice, parts[0]);
  if (!s.ok()) return FromRocks(s, "batch");
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync_writes;
  return FromRocks(db_->Write(wo, &batch), "RocksDB write");
}

absl::Status RocksTier::Get(const std::string& key,
                            const std::function<absl::Status(const uint8_t*, size_t)>& consume) {
  rocksdb::PinnableSlice value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), pages_cf_, key, &value);
  if (!s.ok()) return FromRocks(s, "RocksDB get");
  return consume(reinterpret_cast<const uint8_t*>(value.data()), value.size());
}

absl::Status RocksTier::DeleteSession(absl::string_view sid) {
  std::string begin = SessionPrefix(sid);
  std::string end = begin + std::string(9, '\xff');  // beyond every 8-byte page suffix
  rocksdb::WriteBatch batch;
  rocksdb::Status s = batch.DeleteRange(pages_cf_, begin, end);
  if (s.ok()) s = batch.DeleteRange(meta_cf_, begin, end);
  if (!s.ok()) return FromRocks(s, "batch");
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync_writes;
  if (absl::Status st = FromRocks(db_->Write(wo, &batch), "RocksDB delete range"); !st.ok())
    return st;
  // Give the disk back now: a range tombstone alone frees nothing until compaction reaches
  // it, and long-context sessions are gigabytes.
  rocksdb::Slice b(begin), e(end);
  rocksdb::CompactRangeOptions co;
  co.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
  for (auto* cf : {pages_cf_, meta_cf_}) {
    rocksdb::Status cs = db_->CompactRange(co, cf, &b, &e);
    (void)cs;  // the delete itself is durable; compaction is housekeeping
  }
  return absl::OkStatus();
}

absl::Status RocksTier::ScanHeaders(
    const std::function<void(absl::string_view, absl::string_view)>& fn) {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), meta_cf_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    fn(absl::string_view(it->key().data(), it->key().size()),
       absl::string_view(it->value().data(), it->value().size()));
  }
  return FromRocks(it->status(), "RocksDB scan");
}

uint64_t RocksTier::ApproximateBytes() const {
  uint64_t sst = 0, blob = 0, mem = 0;
  db_->GetIntProperty(pages_cf_, "rocksdb.total-sst-files-size", &sst);
  db_->GetIntProperty(pages_cf_, "rocksdb.total-blob-file-size", &blob);
  db_->GetIntProperty(pages_cf_, "rocksdb.cur-size-all-mem-tables", &mem);
  return sst + blob + mem;
}

}  // namespace fm
