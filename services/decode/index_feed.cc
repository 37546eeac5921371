// What the worker hands its peers as a session grows: pages to the kvstore, index keys and
// bounds to the indexer (and their records, for a resume), re-registration.
#include "services/decode/decode_core_impl.h"

namespace fm::decode {

absl::Status DecodeCore::Impl::Flush(Session& s) {
  const ModelSpec& sp = s.opt.spec;
  const uint64_t cpp = sp.ChunksPerPage();
  const uint64_t ready = ReadyPages(s);
  const uint64_t pages = ready > s.sent_pages ? ready - s.sent_pages : 0;
  const uint64_t chunks = pages * cpp;
  if (s.registered && pages == 0) return absl::OkStatus();
  const size_t kb = sp.IndexKeyBytes(), bf = indexer::IndexerBoundsFloats(sp);
  std::vector<uint8_t> keys;
  keys.reserve(sp.index_layers * chunks * kb);
  for (uint32_t l = 0; l < sp.index_layers; ++l)
    keys.insert(keys.end(), s.keys[l].begin(), s.keys[l].begin() + chunks * kb);
  if (absl::Status st = PersistKeys(s); !st.ok()) return st;
  auto send = [&] {
    return s.registered ? predictor->Append(s.id, sp, keys.data(), s.sent_chunks, chunks, s.tokens,
                                            s.bounds.data(), s.sent_pages, pages)
                        : predictor->Register(s.id, sp, keys.data(), chunks, s.tokens,
                                              s.bounds.data(), pages);
  };
  absl::Status st = send();
  // The indexer lost the session (NOT_FOUND), or holds an older history of it than this
  // worker sent (FAILED_PRECONDITION: a close's drop that did not reach it): it gets the
  // history again.
  if ((absl::IsNotFound(st) || absl::IsFailedPrecondition(st)) && s.registered) {
    if (absl::Status r = Reregister(s); !r.ok()) return r;
    st = send();
  }
  if (!st.ok()) return st;
  s.registered = true;
  for (uint32_t l = 0; l < sp.index_layers; ++l)
    s.keys[l].erase(s.keys[l].begin(), s.keys[l].begin() + chunks * kb);
  s.bounds.erase(s.bounds.begin(), s.bounds.begin() + pages * bf);
  s.sent_chunks += chunks;
  s.sent_pages += pages;
  return absl::OkStatus();
}

absl::Status DecodeCore::Impl::PersistKeys(Session& s) {
  const ModelSpec& sp = s.opt.spec;
  const uint64_t cpp = sp.ChunksPerPage(), ready = ReadyPages(s);
  const size_t kb = sp.IndexKeyBytes(), bf = indexer::IndexerBoundsFloats(sp);
  std::vector<uint8_t> rec(KeysRecordBytes(sp));
  for (uint64_t p = std::max(s.persisted_pages, s.sent_pages); p < ready; ++p) {
    const uint64_t i = p - s.sent_pages;  // s.keys and s.bounds start at sent_pages
    uint8_t* o = rec.data();
    for (uint32_t l = 0; l < sp.index_layers; ++l, o += cpp * kb)
      std::memcpy(o, s.keys[l].data() + i * cpp * kb, cpp * kb);
    std::memcpy(o, s.bounds.data() + i * bf, bf * 4);
    const PageHeaderData h = MakePageHeader(s.id, kKeysPage + p, ModelSpecHash(sp), sp.page_tokens,
                                            DType::kFp32, rec.data(), rec.size());
    if (absl::Status st = Write(s, h, rec.data()); !st.ok()) return st;
    s.persisted_pages = p + 1;
  }
  return absl::OkStatus();
}

absl::Status DecodeCore::Impl::Reregister(Session& s) {
  const ModelSpec& sp = s.opt.spec;
  const uint64_t cpp = sp.ChunksPerPage(), n = s.sent_pages;
  const size_t kb = sp.IndexKeyBytes(), bf = indexer::IndexerBoundsFloats(sp);
  const size_t rb = KeysRecordBytes(sp);
  std::vector<uint8_t> keys(size_t{sp.index_layers} * n * cpp * kb);
  std::vector<float> bounds(n * bf);
  constexpr uint64_t kBatch = 256;
  std::vector<uint8_t> buf(kBatch * (kPageHeaderBytes + rb));
  for (uint64_t p0 = 0; p0 < n; p0 += kBatch) {
    std::vector<uint64_t> pages;
    std::vector<uint8_t*> dst;
    for (uint64_t p = p0; p < std::min(n, p0 + kBatch); ++p) {
      pages.push_back(kKeysPage + p);
      dst.push_back(buf.data() + (p - p0) * (kPageHeaderBytes + rb));
    }
    if (absl::Status r = store->Read(s.id, pages, rb, dst); !r.ok())
      return absl::Status(r.code(), absl::StrCat("re-registering session \"", s.id,
                                                 "\" with the indexer: ", r.message()));
    for (size_t i = 0; i < pages.size(); ++i) {
      const uint64_t p = p0 + i;
      const uint8_t* in = dst[i] + kPageHeaderBytes;
      for (uint32_t l = 0; l < sp.index_layers; ++l, in += cpp * kb)
        std::memcpy(keys.data() + (size_t{l} * n * cpp + p * cpp) * kb, in, cpp * kb);
      std::memcpy(bounds.data() + p * bf, in, bf * 4);
    }
  }
  if (absl::Status st =
          predictor->Register(s.id, sp, keys.data(), n * cpp, s.tokens, bounds.data(), n);
      !st.ok())
    return st;
  ++s.stats.reregistrations;
  ++totals.reregistrations;
  return absl::OkStatus();
}

absl::Status DecodeCore::Impl::Write(Session& s, PageHeaderData h, const uint8_t* payload) {
  h.epoch = s.epoch;
  absl::Status st = store->Put(h, payload);
  if (absl::IsAborted(st) && !s.moved) {
    s.moved = true;
    FM_LOG_WARN("decode: session \"%s\" moved to another worker: %s", s.id.c_str(),
                st.ToString().c_str());
  }
  return st;
}

absl::Status DecodeCore::Impl::PutPage(Session& s, uint64_t page, const uint8_t* payload,
                                       uint32_t valid) {
  const ModelSpec& sp = s.opt.spec;
  const PageHeaderData h =
      MakePageHeader(s.id, page, ModelSpecHash(sp), valid, sp.dtype, payload, sp.PageBytes());
  return Write(s, h, payload);
}

}  // namespace fm::decode
