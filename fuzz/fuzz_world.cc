#include "fuzz/fuzz_world.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "services/indexer/flags.h"

namespace fm::fuzz {

absl::Status MemPageStore::Put(const PageHeaderData& header, const uint8_t* payload) {
  std::lock_guard<std::mutex> l(mu_);
  pages_[{header.session_id, header.page}] = {
      header, std::string(reinterpret_cast<const char*>(payload), header.payload_bytes)};
  return absl::OkStatus();
}

absl::Status MemPageStore::Read(const std::string& session, const std::vector<uint64_t>& pages,
                                size_t payload_bytes, const std::vector<uint8_t*>& dst) {
  std::lock_guard<std::mutex> l(mu_);
  for (size_t i = 0; i < pages.size(); ++i) {
    auto it = pages_.find({session, pages[i]});
    if (it == pages_.end())
      return absl::NotFoundError(absl::StrCat("page ", pages[i], " of ", session));
    if (it->second.second.size() != payload_bytes)
      return absl::DataLossError(absl::StrCat("page ", pages[i], " has ",
                                              it->second.second.size(), " bytes"));
    EncodePageHeader(it->second.first, dst[i]);
    std::memcpy(dst[i] + kPageHeaderBytes, it->second.second.data(), payload_bytes);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> MemPageStore::ReadPayload(const std::string& session, uint64_t page) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = pages_.find({session, page});
  if (it == pages_.end()) return absl::NotFoundError(absl::StrCat("page ", page, " of ", session));
  return it->second.second;
}

absl::Status MemPageStore::DeleteSession(const std::string& session, uint64_t epoch) {
  std::lock_guard<std::mutex> l(mu_);
  for (auto it = pages_.begin(); it != pages_.end();)
    it = it->first.first == session ? pages_.erase(it) : std::next(it);
  return absl::OkStatus();
}

std::vector<decode::LayerStep> StepsOf(const World& w, const std::string& session,
                                       const flashmemory::v1::LayerRequest& r,
                                       std::vector<std::vector<float>>* buffers) {
  const ModelSpec& sp = w.g->spec();  // fp32: the request's bytes are the floats
  const size_t qs = size_t{sp.q_heads} * sp.head_dim, ks = size_t{sp.kv_heads} * sp.head_dim;
  const uint32_t n = std::max<uint32_t>(1, r.layer_count());
  auto floats = [&](const std::string& b) {
    buffers->emplace_back(b.size() / 4);
    if (!b.empty()) std::memcpy(buffers->back().data(), b.data(), buffers->back().size() * 4);
    return buffers->size() - 1;
  };
  buffers->reserve(buffers->size() + 5);
  const size_t q = floats(r.q()), k = floats(r.k()), v = floats(r.v()), h = floats(r.hidden());
  buffers->emplace_back(size_t{n} * (qs + sp.q_heads));
  const size_t o = buffers->size() - 1;
  std::vector<decode::LayerStep> steps;
  for (uint32_t j = 0; j < n; ++j) {
    decode::LayerStep s;
    s.session = session;
    s.step = r.step();
    s.layer = r.layer() + j;
    s.q = absl::MakeConstSpan((*buffers)[q].data() + j * qs, qs);
    s.k = absl::MakeConstSpan((*buffers)[k].data() + j * ks, ks);
    s.v = absl::MakeConstSpan((*buffers)[v].data() + j * ks, ks);
    if (j == 0) {
      s.hidden = (*buffers)[h];
      if (r.has_index_keys())
        s.index_keys = absl::MakeConstSpan(
            reinterpret_cast<const uint8_t*>(r.index_keys().data().data()),
            r.index_keys().data().size());
    }
    s.out = (*buffers)[o].data() + j * qs;
    s.lse = (*buffers)[o].data() + n * qs + j * sp.q_heads;
    steps.push_back(std::move(s));
  }
  return steps;
}

namespace {

void Check(const absl::Status& st, const char* what) {
  if (st.ok()) return;
  std::fprintf(stderr, "fuzz world: %s: %s\n", what, st.ToString().c_str());
  std::abort();
}

World* Build() {
  auto* w = new World();
  workload::SessionConfig c;
  c.spec = *PresetSpec("tiny");
  c.knobs.tau = 16;
  c.seed = 11;
  c.prefill_tokens = 1024;
  c.steps = 64;
  auto g = workload::Session::Generate(c);
  Check(g.status(), "generate");
  w->g = std::move(*g);
  indexer::IndexerFlags f;
  f.default_policy = "quest";
  auto ix = indexer::MakeIndexerCore(f);
  Check(ix.status(), "indexer");
  w->indexer = std::move(*ix);
  decode::DecodeOptions o;
  o.reserve_bytes = 16 << 20;
  o.threads = 1;
  w->core = std::make_unique<decode::DecodeCore>(o, &w->store, w->indexer.get());
  decode::SessionOptions& so = w->options;
  so.spec = w->g->spec();
  so.mode = decode::Mode::kSparse;
  so.policy = indexer::Policy::kQuest;
  so.budget = 0.25f;
  so.tau = 16;
  so.max_tokens = w->g->position(c.steps);
  Check(w->core->Open("s", so), "open");
  const replay::PrefillData p = replay::MakePrefill(*w->g);
  Check(w->core->Prefill("s", p.pages.data(), p.n_pages, c.prefill_tokens, p.keys.data(), 0,
                         p.chunks),
        "prefill");
  replay::StepSource src(*w->g, "s", 16);
  for (uint32_t st = 0; st < 32; ++st) {
    std::vector<std::vector<float>> buffers;
    const flashmemory::v1::LayerRequest req = src.Request(st, 0, w->g->spec().layers);
    const auto steps = StepsOf(*w, "s", req, &buffers);
    for (const auto& s : steps) Check(w->core->Step(absl::MakeConstSpan(&s, 1))[0], "step");
  }
  Check(w->core->Close("s"), "close");
  auto state = w->store.ReadPayload("s", decode::kStatePage);
  Check(state.status(), "state");
  w->state = *state;
  std::vector<uint8_t> rec(kPageHeaderBytes + w->state.size());
  Check(w->store.Read("s", {decode::kStatePage}, w->state.size(), {rec.data()}), "state record");
  Check(DecodePageHeader(rec.data(), &w->state_header), "state header");
  if (const char* out = std::getenv("FM_FUZZ_WRITE_SEED")) {  // the corpus's seed
    FILE* f = std::fopen(out, "wb");
    if (f) {
      std::fwrite(w->state.data(), 1, w->state.size(), f);
      std::fclose(f);
    }
  }
  return w;
}

}  // namespace

World& TheWorld() {
  static World* w = Build();
  return *w;
}

}  // namespace fm::fuzz
