#include "services/decode/decode_core.h"
#include "services/decode/decode_core_impl.h"  // UpgradeState, kStateLayout
#include "services/decode/local_peers.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "common/status_matchers.h"
#include "flashmemory/kernels/indexer.h"
#include "services/kvstore/kv_store.h"
#include "tests/process_util.h"
#include "tools/replay/replay.h"
#include "workload/generator.h"
#include "workload/trace.h"

namespace fm::decode {
namespace {

using ::absl::StatusCode;
using ::fm::testing::IsOk;

// A generated tiny-spec session driven through a DecodeCore backed by an in-process kvstore
// and indexer.
class DecodeCoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("decode-core");
    KvStoreOptions ko;
    ko.db_path = dir_ + "/kv";
    ko.ram_bytes = 64 << 20;
    ko.enable_ucx = false;
    auto kv = KvStore::Open(ko, nullptr);
    ASSERT_TRUE(kv.ok()) << kv.status();
    kv_ = std::move(*kv);
    store_ = LocalPageStore(kv_.get());
    predictor_ = &indexer_;
    spec_ = PresetSpec("tiny").value();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<workload::Session> Generate(uint64_t tokens, uint32_t steps, uint64_t seed) {
    workload::SessionConfig c;
    c.spec = spec_;
    c.knobs.tau = 16;
    c.seed = seed;
    c.prefill_tokens = tokens;
    c.steps = steps;
    auto s = workload::Session::Generate(c);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  }

  std::unique_ptr<DecodeCore> Core(uint64_t reserve_bytes = 32 << 20, uint32_t tau = 16,
                                   bool miss_check = false, const std::string& trace_dir = "") {
    DecodeOptions o;
    o.trace_dir = trace_dir;
    o.reserve_bytes = reserve_bytes;
    o.tau = tau;
    o.switch_lag = 2;
    o.miss_check = miss_check;
    return std::make_unique<DecodeCore>(o, store_.get(), predictor_);
  }

  SessionOptions Options(const workload::Session& g, Mode mode, float budget,
                         indexer::Policy policy) {
    SessionOptions o;
    o.spec = spec_;
    o.mode = mode;
    o.budget = budget;
    o.policy = policy;
    o.max_tokens = g.config().prefill_tokens + g.config().steps;
    return o;
  }

  // Prefills the generated history in two calls (the second ends in a partial page when
  // the history does).
  void Prefill(DecodeCore& core, const std::string& id, const workload::Session& g) {
    const uint64_t tokens = g.config().prefill_tokens, P = spec_.page_tokens;
    const uint64_t pages = spec_.PagesForTokens(tokens), pb = spec_.PageBytes();
    std::vector<uint8_t> payload(pages * pb);
    for (uint64_t p = 0; p < pages; ++p) g.FillPage(p, payload.data() + p * pb);
    const uint64_t first = pages / 2, chunks = tokens / spec_.chunk_tokens;
    const uint64_t first_chunks = first * spec_.ChunksPerPage();
    auto keys = [&](uint64_t c0, uint64_t n) {
      std::vector<uint8_t> k;
      const size_t kb = spec_.IndexKeyBytes();
      for (uint32_t l = 0; l < spec_.index_layers; ++l)
        k.insert(k.end(), g.index_keys(l).begin() + c0 * kb,
                 g.index_keys(l).begin() + (c0 + n) * kb);
      return k;
    };
    auto k1 = keys(0, first_chunks);
    ASSERT_THAT(core.Prefill(id, payload.data(), first, first * P, k1.data(), 0, first_chunks),
                IsOk());
    auto k2 = keys(first_chunks, chunks - first_chunks);
    ASSERT_THAT(core.Prefill(id, payload.data() + first * pb, pages - first, tokens, k2.data(),
                             first_chunks, chunks - first_chunks),
                IsOk());
  }

  // The request of (step, layer) from the generated session: the model's queries, the new
  // token's K and V (read back from its page), and the chunk keys when the token completes
  // one; the hidden state at cycle starts on layer 0.
  struct StepData {
    std::vector<float> q, k, v, hidden, out;
    std::vector<uint8_t> keys;
  };
  StepData Data(const workload::Session& g, uint32_t step, uint32_t layer, uint32_t tau) {
    StepData d;
    const uint32_t D = spec_.head_dim;
    d.q.resize(size_t{spec_.q_heads} * D);
    for (uint32_t h = 0; h < spec_.q_heads; ++h) g.ModelQuery(step, layer, h, d.q.data() + h * D);
    const uint64_t pos = g.position(step), P = spec_.page_tokens;
    std::vector<uint8_t> page(spec_.PageBytes());
    g.FillPage(pos / P, page.data());
    const float* f = reinterpret_cast<const float*>(page.data());  // tiny is fp32
    for (uint32_t h = 0; h < spec_.kv_heads; ++h) {
      const float* k = f + spec_.ElemOffset(layer, 0, h, pos % P);
      const float* v = f + spec_.ElemOffset(layer, 1, h, pos % P);
      d.k.insert(d.k.end(), k, k + D);
      d.v.insert(d.v.end(), v, v + D);
    }
    if ((pos + 1) % spec_.chunk_tokens == 0) {
      const uint64_t c = pos / spec_.chunk_tokens;
      const size_t kb = spec_.IndexKeyBytes();
      for (uint32_t l = 0; l < spec_.index_layers; ++l)
        d.keys.insert(d.keys.end(), g.index_keys(l).begin() + c * kb,
                      g.index_keys(l).begin() + (c + 1) * kb);
    }
    if (step % tau == 0 && layer == 0)
      d.hidden.assign(g.hidden(step), g.hidden(step) + spec_.hidden_dim);
    d.out.resize(d.q.size());
    return d;
  }
  LayerStep Request(const std::string& id, uint32_t step, uint32_t layer, StepData& d) {
    LayerStep r;
    r.session = id;
    r.step = step;
    r.layer = layer;
    r.q = d.q;
    r.k = d.k;
    r.v = d.v;
    r.hidden = d.hidden;
    r.index_keys = d.keys;
    r.out = d.out.data();
    return r;
  }

  // Decodes every layer of one step; returns its outputs [layer][q_heads * head_dim].
  std::vector<std::vector<float>> DecodeStep(DecodeCore& core, const std::string& id,
                                             const workload::Session& g, uint32_t st,
                                             uint32_t tau) {
    std::vector<std::vector<float>> outs;
    for (uint32_t l = 0; l < spec_.layers; ++l) {
      StepData d = Data(g, st, l, tau);
      LayerStep r = Request(id, st, l, d);
      EXPECT_THAT(core.Step({&r, 1})[0], IsOk()) << "step " << st << " layer " << l;
      outs.push_back(std::move(d.out));
    }
    return outs;
  }

  // Decodes every step; returns the outputs [step][layer][q_heads * head_dim].
  std::vector<std::vector<std::vector<float>>> Decode(DecodeCore& core, const std::string& id,
                                                      const workload::Session& g, uint32_t tau) {
    std::vector<std::vector<std::vector<float>>> outs;
    for (uint32_t st = 0; st < g.config().steps; ++st)
      outs.push_back(DecodeStep(core, id, g, st, tau));
    return outs;
  }

  std::string dir_;
  std::unique_ptr<KvStore> kv_;
  indexer::IndexerCore indexer_;
  std::unique_ptr<PageStore> store_;
  Predictor* predictor_ = nullptr;
  ModelSpec spec_;
};

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::abs(a[i] - b[i])));
  return m;
}

TEST_F(DecodeCoreTest, DenseOutputsEqualTheModelsAttention) {
  auto g = Generate(2000, 32, 11);  // a partial last prefill page
  auto core = Core();
  ASSERT_THAT(core->Open("d", Options(*g, Mode::kDense, 1.0f, indexer::Policy::kDefault)), IsOk());
  Prefill(*core, "d", *g);
  auto outs = Decode(*core, "d", *g, 16);
  EXPECT_LT(
      replay::CompareToModel(*g, 32, 5, [&](uint32_t st, uint32_t l) { return outs[st][l].data(); })
          .max_abs,
      1e-4);
  auto st = core->Stats("d");
  ASSERT_THAT(st.status(), IsOk());
  EXPECT_EQ(st->tokens, 2032u);
  EXPECT_EQ(st->steps, 32u);
  EXPECT_EQ(st->total_pages, 32u);
  EXPECT_EQ(st->predictions, 0u);
  EXPECT_EQ(st->stalls, 0u);
  EXPECT_DOUBLE_EQ(st->footprint, 1.0);  // every page, the open one included
}

TEST_F(DecodeCoreTest, SparseWithEveryPageEqualsDense) {
  auto g = Generate(4096, 48, 12);
  auto core = Core();
  ASSERT_THAT(core->Open("dense", Options(*g, Mode::kDense, 1.0f, indexer::Policy::kDefault)),
              IsOk());
  ASSERT_THAT(core->Open("sparse", Options(*g, Mode::kSparse, 1.0f, indexer::Policy::kDense)),
              IsOk());
  Prefill(*core, "dense", *g);
  Prefill(*core, "sparse", *g);
  auto a = Decode(*core, "dense", *g, 16);
  auto b = Decode(*core, "sparse", *g, 16);
  double worst = 0;
  for (size_t st = 0; st < a.size(); ++st)
    for (size_t l = 0; l < a[st].size(); ++l)
      worst = std::max(worst, MaxAbsDiff(a[st][l], b[st][l]));
  EXPECT_LT(worst, 1e-5);
  auto st = core->Stats("sparse");
  ASSERT_THAT(st.status(), IsOk());
  EXPECT_EQ(st->predictions, 3u);  // steps 0, 16, 32
  EXPECT_EQ(st->prediction_failures, 0u);
  EXPECT_EQ(st->deferred_pages, 0u);
  EXPECT_EQ(st->resident_pages, 65u);  // 64 sealed + the open page
}

// Steps run their attention kernel without the session's lock: readers, the cycle's jobs
// and a close on other threads meet them only between kernels.
TEST_F(DecodeCoreTest, StepsMeetReadersAndACloseOnOtherThreadsOnlyBetweenKernels) {
  auto g = Generate(4096, 48, 12);
  auto core = Core();
  for (const char* id : {"serial", "watched"}) {
    ASSERT_THAT(core->Open(id, Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest)), IsOk());
    Prefill(*core, id, *g);
  }
  auto want = Decode(*core, "serial", *g, 16);
  std::atomic<bool> done{false};
  std::atomic<uint64_t> reads{0};
  std::thread reader([&] {
    while (!done) {
      auto st = core->Stats("watched");
      auto res = core->Resident("watched", {0, 1, 2, 3});
      EXPECT_THAT(st.status(), IsOk());
      EXPECT_THAT(res.status(), IsOk());
      ++reads;
    }
  });
  auto got = Decode(*core, "watched", *g, 16);
  done = true;
  reader.join();
  EXPECT_GT(reads.load(), 0u);
  auto stats = core->Stats("watched");
  ASSERT_THAT(stats.status(), IsOk());
  EXPECT_EQ(stats->predictions, 3u);
  EXPECT_EQ(stats->prediction_failures, 0u);
  ASSERT_EQ(got.size(), want.size());
  for (size_t st = 0; st < got.size(); ++st)
    for (size_t l = 0; l < got[st].size(); ++l) ASSERT_EQ(got[st][l], want[st][l]) << st << " " << l;

  // A close while another thread streams steps: the steps after it get NOT_FOUND and the
  // session's cells all go back.
  ASSERT_THAT(core->Open("closed", Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest)),
              IsOk());
  Prefill(*core, "closed", *g);
  const uint64_t used_before = core->Reserve().used_cells;
  std::atomic<uint32_t> steps_ok{0};
  std::atomic<bool> saw_not_found{false};
  std::thread stepper([&] {
    for (uint32_t st = 0; st < g->config().steps && !saw_not_found; ++st)
      for (uint32_t l = 0; l < spec_.layers; ++l) {
        StepData d = Data(*g, st, l, 16);
        LayerStep r = Request("closed", st, l, d);
        absl::Status s = core->Step({&r, 1})[0];
        if (s.code() == StatusCode::kNotFound) {
          saw_not_found = true;
          break;
        }
        EXPECT_THAT(s, IsOk());
        if (l == 0 && st == 8) steps_ok = 1;
      }
  });
  while (steps_ok == 0 && !saw_not_found) std::this_thread::yield();
  ASSERT_THAT(core->Close("closed", /*drop_history=*/true), IsOk());
  stepper.join();
  EXPECT_TRUE(saw_not_found);
  EXPECT_LT(core->Reserve().used_cells, used_before);
  EXPECT_EQ(core->Stats("closed").status().code(), StatusCode::kNotFound);
}

// A predictor whose Predict takes `delay` longer than the indexer's.
class SlowPredictor : public Predictor {
 public:
  SlowPredictor(Predictor* inner, std::chrono::milliseconds delay) : in_(inner), delay_(delay) {}
  absl::Status Register(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                        uint64_t chunks, uint64_t tokens, const float* bounds,
                        uint64_t bound_pages) override {
    return in_->Register(session, spec, keys, chunks, tokens, bounds, bound_pages);
  }
  absl::Status Append(const std::string& session, const ModelSpec& spec, const uint8_t* keys,
                      uint64_t first_chunk, uint64_t chunks, uint64_t tokens, const float* bounds,
                      uint64_t first_page, uint64_t bound_pages) override {
    return in_->Append(session, spec, keys, first_chunk, chunks, tokens, bounds, first_page,
                       bound_pages);
  }
  absl::StatusOr<indexer::Prediction> Predict(const std::string& session,
                                              const indexer::PredictArgs& args) override {
    std::this_thread::sleep_for(delay_);
    {
      absl::MutexLock l(&mu_);
      history_[args.step] = args.history_pages;
    }
    return in_->Predict(session, args);
  }
  absl::Status Drop(const std::string& session) override { return in_->Drop(session); }
  // The history each prediction named, by the step it was for.
  std::map<uint64_t, uint64_t> history() const {
    absl::MutexLock l(&mu_);
    return history_;
  }

 private:
  Predictor* in_;
  std::chrono::milliseconds delay_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, uint64_t> history_ ABSL_GUARDED_BY(mu_);
};

TEST_F(DecodeCoreTest, StalledStepsReportTheTimeTheyWaited) {
  // A 60 ms Predict against a 2-step lag of sub-millisecond steps: the switches of the
  // cycles at steps 16 and 32 wait for most of it (the first prediction is the warm-up).
  auto g = Generate(4096, 48, 12);
  SlowPredictor slow(predictor_, std::chrono::milliseconds(60));
  DecodeOptions o;
  o.reserve_bytes = 32 << 20;
  o.tau = 16;
  o.switch_lag = 2;
  DecodeCore core(o, store_.get(), &slow);
  ASSERT_THAT(core.Open("s", Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest)), IsOk());
  Prefill(core, "s", *g);
  Decode(core, "s", *g, 16);
  auto st = core.Stats("s");
  ASSERT_THAT(st.status(), IsOk());
  EXPECT_EQ(st->predictions, 3u);
  EXPECT_EQ(st->warmup_waits, 1u);
  EXPECT_GE(st->stalls, 2u);
  EXPECT_GE(st->stall_ms, 2 * 30.0);
  EXPECT_GE(core.Reserve().stall_us, static_cast<uint64_t>(st->stall_ms * 1000) - st->stalls);
  EXPECT_EQ(core.Reserve().stalls, st->stalls);
}

// A page store whose reads of more than `pages` pages take `delay` longer.
class SlowStore : public PageStore {
 public:
  SlowStore(PageStore* inner, size_t pages, std::chrono::milliseconds delay)
      : in_(inner), pages_(pages), delay_(delay) {}
  absl::Status Put(const PageHeaderData& header, const uint8_t* payload) override {
    return in_->Put(header, payload);
  }
  absl::Status Read(const std::string& session, const std::vector<uint64_t>& pages,
                    size_t payload_bytes, const std::vector<uint8_t*>& dst) override {
    if (pages.size() > pages_) std::this_thread::sleep_for(delay_);
    return in_->Read(session, pages, payload_bytes, dst);
  }
  absl::StatusOr<std::string> ReadPayload(const std::string& session, uint64_t page) override {
    return in_->ReadPayload(session, page);
  }
  absl::Status DeleteSession(const std::string& session, uint64_t epoch) override {
    return in_->DeleteSession(session, epoch);
  }
  absl::Status CloseSession(const std::string& session, uint64_t epoch) override {
    return in_->CloseSession(session, epoch);
  }
  absl::StatusOr<uint64_t> ClaimSession(const std::string& session) override {
    return in_->ClaimSession(session);
  }

 private:
  PageStore* in_;
  size_t pages_;
  std::chrono::milliseconds delay_;
};

TEST_F(DecodeCoreTest, StallsOnACatchUpAreCountedApart) {
  // Random sets change almost wholly at every switch; the catch-ups of the rest (4 pages
  // each) take 60 ms against a catch-up lag of 2 sub-millisecond steps: each stalls.
  auto g = Generate(4096, 48, 14);
  SlowStore slow(store_.get(), 2, std::chrono::milliseconds(60));
  DecodeOptions o;
  o.reserve_bytes = 32 << 20;
  o.tau = 16;
  o.switch_lag = 2;
  DecodeCore core(o, &slow, predictor_);
  ASSERT_THAT(core.Open("s", Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kRandom)),
              IsOk());
  Prefill(core, "s", *g);
  Decode(core, "s", *g, 16);
  auto st = core.Stats("s");
  ASSERT_THAT(st.status(), IsOk());
  EXPECT_GE(st->catch_up_stalls, 2u);
  EXPECT_LE(st->catch_up_stalls, st->stalls);
  EXPECT_EQ(core.Reserve().catch_up_stalls, st->catch_up_stalls);

  // Slow predictions instead: their switches stall, and those stalls are not catch-up ones.
  SlowPredictor late(predictor_, std::chrono::milliseconds(60));
  DecodeCore core2(o, store_.get(), &late);
  ASSERT_THAT(core2.Open("t", Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest)),
              IsOk());
  Prefill(core2, "t", *g);
  Decode(core2, "t", *g, 16);
  st = core2.Stats("t");
  ASSERT_THAT(st.status(), IsOk());
  EXPECT_GE(st->stalls - st->catch_up_stalls, 2u);  // the switches at steps 18 and 34
}

TEST_F(DecodeCoreTest, OutputsDoNotDependOnWhenAJobRuns) {
  // A job decides against the session as it was when the job was posted. A prediction that
  // answers 40 ms late (after the miss check launched with it placed a page the prediction
  // wants; after the page that sealed in its launch step reached the indexer) serves the
  // same set as one that answers at once.
  // Recency at a history of 4079 tokens: pages seal at steps 16 and 80, where predictions
  // launch; each names the pages sealed before its step, whatever the indexer holds when it
  // runs.
  for (const auto& [history, policy] : std::vector<std::pair<uint64_t, indexer::Policy>>{
           {4000, indexer::Policy::kQuest}, {4079, indexer::Policy::kSinkRecency}}) {
    SCOPED_TRACE(absl::StrCat("history ", history));
    auto g = Generate(history, 96, 16);
    SessionOptions so = Options(*g, Mode::kSparse, 0.25f, policy);
    so.switch_lag = 4;
    DecodeOptions o;
    o.reserve_bytes = 32 << 20;
    o.tau = 16;
    o.miss_check = true;
    SlowPredictor late(predictor_, std::chrono::milliseconds(40));
    std::vector<std::vector<std::vector<float>>> outs[2];
    uint64_t stalls[2];
    for (int i = 0; i < 2; ++i) {
      DecodeCore core(o, store_.get(), i ? &late : predictor_);
      const std::string id = absl::StrCat("s", history, i ? "-late" : "");
      ASSERT_THAT(core.Open(id, so), IsOk());
      Prefill(core, id, *g);
      outs[i] = Decode(core, id, *g, 16);
      auto st = core.Stats(id);
      ASSERT_THAT(st.status(), IsOk());
      stalls[i] = st->stalls;
    }
    EXPECT_GE(stalls[1], 2u);  // the late predictions held up the switches at 20 and 36
    if (history == 4079) {
      EXPECT_EQ(late.history(), (std::map<uint64_t, uint64_t>{
                                    {0, 63}, {16, 63}, {32, 64}, {48, 64}, {64, 64}, {80, 64}}));
    }
    for (size_t st = 0; st < outs[0].size(); ++st)
      for (size_t l = 0; l < outs[0][st].size(); ++l)
        ASSERT_LT(MaxAbsDiff(outs[0][st][l], outs[1][st][l]), 1e-6)
            << "step " << st << " layer " << l;
  }
}

TEST_F(DecodeCoreTest, SparseKeepsItsBudgetAndRotatesPages) {
  auto g = Generate(8192, 64, 13);
  auto core = Core();
  ASSERT_THAT(core->Open("s", Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest)), IsOk());
  Prefill(*core, "s", *g);
  auto outs = Decode(*core, "s", *g, 16);
  auto st = core->Stats("s");
  ASSERT_THAT(st.status(), IsOk());
  EXPECT_EQ(st->predictions, 4u);
  EXPECT_EQ(st->prediction_failures, 0u);
  EXPECT_EQ(st->warmup_waits, 1u);
  EXPECT_GT(st->fetched_pages, 0u);
  // The budget caps the footprint: 25 % of 129 pages is 33 cells, the open page and the
  // pages fetched while the previous set served included.
  EXPECT_EQ(st->reserved_cells, 33u);
  EXPECT_LE(st->peak_resident_pages, 33u);
  EXPECT_LE(st->footprint, 33.0 / 129);
  // The set: the cap less the open page and two cells for pages sealing before a switch
  // (the fetch headroom is part of the set outside the switch lag).
  EXPECT_GE(st->peak_resident_pages, 30u);
  EXPECT_EQ(st->tau, 16u);
  EXPECT_EQ(st->switch_lag, 2u);  // the worker's
  // The sparse outputs are close to the model's dense attention (quest at 25 %).
  EXPECT_GT(
      replay::CompareToModel(*g, 64, 3, [&](uint32_t st, uint32_t l) { return outs[st][l].data(); })
          .cosine,
      0.9);
}

TEST_F(DecodeCoreTest, PagesBeyondTheSpareCellsComeInCatchUpsTwoStepsApart) {
  // A random 25 % set: each prediction replaces most of the set, more pages than the cells
  // left free while the previous set serves. The rest come after the switch into the cells
  // the old set leaves, a quarter of the set (8 pages) every 2 steps, before the next cycle.
  auto g = Generate(8192, 48, 21);
  auto core = Core();
  ASSERT_THAT(core->Open("s", Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kRandom)),
              IsOk());
  Prefill(*core, "s", *g);
  std::vector<uint64_t> resident;
  for (uint32_t step = 0; step < g->config().steps; ++step) {
    DecodeStep(*core, "s", *g, step, 16);
    auto st = core->Stats("s");
    ASSERT_THAT(st.status(), IsOk());
    resident.push_back(st->resident_pages);
  }
  auto st = core->Stats("s");
  ASSERT_THAT(st.status(), IsOk());
  ASSERT_EQ(st->tau, 16u);
  ASSERT_EQ(st->switch_lag, 2u);
  EXPECT_GT(st->deferred_pages, 8u);
  const uint64_t full = resident[15];  // cycle 0's set and the open page
  EXPECT_EQ(full, 31u);
  for (uint32_t cycle = 1; cycle < 3; ++cycle) {
    const uint32_t sw = cycle * 16 + 2;
    EXPECT_LT(resident[sw], full - 8) << "cycle " << cycle << ": most of the set comes later";
    EXPECT_EQ(resident[sw + 2], resident[sw] + 8) << "cycle " << cycle << ": the first catch-up";
    for (uint32_t step = sw + 1; step < (cycle + 1) * 16; ++step) {
      if ((step - sw) % 2 == 0) {  // a catch-up lands
        EXPECT_LE(resident[step], resident[step - 1] + 8) << "step " << step;
      } else {
        EXPECT_EQ(resident[step], resident[step - 1]) << "step " << step;
      }
    }
    EXPECT_EQ(resident[(cycle + 1) * 16 - 1], full) << "cycle " << cycle << " is whole";
  }
  // At a lag of 4 steps: the session frees a headroom of 5 % of its set at each cycle start
  // (30 - 30 / 1.05 = 2 pages, its least wanted) for the new set's most wanted pages; between
  // the switch and the next cycle start the set holds those cells too.
  SessionOptions slow = Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kRandom);
  slow.switch_lag = 4;
  ASSERT_THAT(core->Open("h", slow), IsOk());
  Prefill(*core, "h", *g);
  std::vector<uint64_t> held;
  for (uint32_t step = 0; step < 32; ++step) {
    DecodeStep(*core, "h", *g, step, 16);
    held.push_back(core->Stats("h")->resident_pages);
  }
  auto h = core->Stats("h");
  ASSERT_THAT(h.status(), IsOk());
  EXPECT_EQ(h->reserved_cells, 33u);
  EXPECT_EQ(h->peak_resident_pages, 31u);  // two cells stay free for pages sealing
  EXPECT_EQ(held[15], 31u);  // the whole set (30 pages, sink and tail included) and the open page
  for (uint32_t step = 16; step < 20; ++step)
    EXPECT_EQ(held[step], 29u) << "step " << step << ": the headroom is free until the switch";
  // Catch-ups of a quarter of the set (8 pages) serve every 2 steps from the switch, not
  // every 4: the catch-up lag is at most 2 whatever the switch lag.
  EXPECT_EQ(held[21], held[20]);
  EXPECT_EQ(held[22], held[20] + 8);
  EXPECT_EQ(held[24], held[22] + 8);
  EXPECT_EQ(held[31], 31u) << "whole again after the switch and its catch-ups";

  // --catch_up_share 0.5: half of the set (15 pages) per lag.
  DecodeOptions o;
  o.reserve_bytes = 32 << 20;
  o.tau = 16;
  o.switch_lag = 2;
  o.catch_up_share = 0.5;
  DecodeCore halves(o, store_.get(), predictor_);
  ASSERT_THAT(halves.Open("s", Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kRandom)),
              IsOk());
  Prefill(halves, "s", *g);
  std::vector<uint64_t> res;
  for (uint32_t step = 0; step < 21; ++step) {
    DecodeStep(halves, "s", *g, step, 16);
    res.push_back(halves.Stats("s")->resident_pages);
  }
  EXPECT_LT(res[18], full - 15) << "most of the set comes later";
  EXPECT_EQ(res[20], res[18] + 15) << "the first catch-up";
}

TEST_F(DecodeCoreTest, MissCheckFetchesASurpriseWithinTheReservation) {
  // A needle the 25 % quest set leaves out is found by the per-step check and fetched.
  auto g = Generate(8192, 64, 13);
  auto core = Core(32 << 20, 16, /*miss_check=*/true);
  ASSERT_THAT(core->Open("s", Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest)), IsOk());
  Prefill(*core, "s", *g);
  auto outs = Decode(*core, "s", *g, 16);
  auto st = core->Stats("s");
  ASSERT_THAT(st, IsOk());
  EXPECT_GT(st->surprise_fetches, 0u);
  EXPECT_LE(st->peak_resident_pages, st->reserved_cells);
  EXPECT_EQ(st->prediction_failures, 0u);
}

// A budget share too small for a session's own miss check is raised to the worker's floor
// (DecodeOptions::min_session_cells, 32); without the check, or with an explicit
// max_pages, the cap stands.
TEST_F(DecodeCoreTest, MissCheckedSessionsGetTheCellFloor) {
  auto g = Generate(8192, 48, 13);
  auto core = Core(64 << 20, 16);
  SessionOptions o = Options(*g, Mode::kSparse, 0.05f, indexer::Policy::kRecency);
  ASSERT_THAT(core->Open("plain", o), IsOk());
  o.miss_ratio = 1.0f;
  ASSERT_THAT(core->Open("checked", o), IsOk());
  o.max_pages = 12;
  ASSERT_THAT(core->Open("explicit", o), IsOk());
  EXPECT_LT(core->Stats("plain")->reserved_cells, 32u);
  EXPECT_EQ(core->Stats("checked")->reserved_cells, 32u);
  EXPECT_EQ(core->Stats("explicit")->reserved_cells, 12u);
}

// The session's own synchronous miss check on the generator (whose index keys are not the
// model's K: the check is the Quest bound alone): at a 10 % recency set the needles and topic
// returns are misses. A layer whose check fires reads the flagged pages before it answers
// and reports a stall. Checks run on every index layer of every step and fire on a
// minority; without a ratio none runs; the session stays within its reservation. A bad
// ratio is refused.
TEST_F(DecodeCoreTest, SynchronousMissCheckReadsFlaggedPagesBeforeTheLayerAnswers) {
  auto g = Generate(8192, 48, 13);
  auto core = Core(64 << 20, 16);
  uint64_t fired_layers = 0;
  for (int with : {0, 1}) {
    const std::string id = with ? "checked" : "plain";
    SessionOptions o = Options(*g, Mode::kSparse, 0.1f, indexer::Policy::kRecency);
    o.miss_ratio = with ? 8.0f : 0.0f;
    ASSERT_THAT(core->Open(id, o), IsOk());
    Prefill(*core, id, *g);
    for (uint32_t st = 0; st < g->config().steps; ++st) {
      for (uint32_t l = 0; l < spec_.layers; ++l) {
        StepData d = Data(*g, st, l, 16);
        LayerStep r = Request(id, st, l, d);
        bool stalled = false;
        r.stalled = &stalled;
        const SessionStats before = *core->Stats(id);
        ASSERT_THAT(core->Step({&r, 1})[0], IsOk());
        if (!with) continue;
        const SessionStats after = *core->Stats(id);
        if (after.miss_fires > before.miss_fires) {
          ++fired_layers;
          EXPECT_TRUE(stalled) << "step " << st << " layer " << l;
          EXPECT_GT(after.surprise_fetches, before.surprise_fetches);
        }
      }
    }
    auto stats = core->Stats(id);
    ASSERT_THAT(stats, IsOk());
    EXPECT_LE(stats->peak_resident_pages, stats->reserved_cells);
    if (with) {
      EXPECT_EQ(stats->miss_checks, uint64_t{g->config().steps} * spec_.index_layers);
      EXPECT_GT(stats->miss_fires, 0u);
      EXPECT_LT(stats->miss_fires, stats->miss_checks);
      EXPECT_EQ(fired_layers, stats->miss_fires);
      EXPECT_GE(stats->surprise_fetches, stats->miss_fires);
      EXPECT_GE(stats->stalls, stats->miss_fires);
    } else {
      EXPECT_EQ(stats->miss_checks, 0u);
      EXPECT_EQ(stats->surprise_fetches, 0u);
    }
  }
  SessionOptions bad = Options(*g, Mode::kSparse, 0.1f, indexer::Policy::kRecency);
  bad.miss_ratio = -1;
  EXPECT_THAT(core->Open("bad", bad), fm::testing::StatusIs(absl::StatusCode::kInvalidArgument));
  bad.miss_ratio = std::nanf("");
  EXPECT_THAT(core->Open("bad", bad), fm::testing::StatusIs(absl::StatusCode::kInvalidArgument));
}

// A model whose index keys are its own K (docs/own-model.md): the miss check scores the
// pages its bound lets through exactly. A query that turns to one token of page 9, which a
// recency set at a 15 % cap does not hold, gets the page read before the layer answers: the
// step stalls, the page is resident after it and the heads that read it answer as dense
// attention does; the query before it (no such token) fires nothing.
TEST_F(DecodeCoreTest, MissCheckOnModelKeysServesTheNeedleInTheStepThatAsksForIt) {
  ModelSpec sp;
  sp.name = "own";
  sp.layers = 1;
  sp.q_heads = 4;
  sp.kv_heads = 2;
  sp.head_dim = 32;
  sp.dtype = DType::kFp32;
  sp.index_layers = 1;
  sp.index_heads = 4;
  sp.index_dim = 4 * 2 * 32;
  sp.chunk_tokens = 4;
  ASSERT_THAT(sp.Validate(), IsOk());
  const uint64_t P = 64, n_pages = 40, tokens = n_pages * P, D = 32;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 0.3f);
  std::vector<float> k(tokens * 2 * D), v(tokens * 2 * D);  // [token][kv][d]
  for (float& x : k) x = nd(rng);
  for (float& x : v) x = nd(rng);
  std::vector<float> needle_q(4 * D), calm_q(4 * D);
  for (uint32_t i = 0; i < D; ++i) {
    needle_q[i] = needle_q[D + i] = (i % 2 ? 1.0f : -1.0f) * 3;  // heads 0, 1: KV head 0
    k[(9 * P + 17) * 2 * D + i] = (i % 2 ? 1.0f : -1.0f);
  }
  for (float& x : calm_q) x = nd(rng) * 0.1f;
  std::vector<uint8_t> pages(n_pages * sp.PageBytes());
  float* f = reinterpret_cast<float*>(pages.data());
  for (uint64_t t = 0; t < tokens; ++t)
    for (uint32_t h = 0; h < 2; ++h)
      for (uint32_t i = 0; i < D; ++i) {
        const uint64_t page = t / P, row = t % P;
        float* base = f + page * (sp.PageBytes() / 4);
        base[sp.ElemOffset(0, 0, h, row) + i] = k[(t * 2 + h) * D + i];
        base[sp.ElemOffset(0, 1, h, row) + i] = v[(t * 2 + h) * D + i];
      }
  const uint64_t chunks = tokens / 4;
  std::vector<uint8_t> keys(chunks * sp.IndexKeyBytes());
  for (uint64_t c = 0; c < chunks; ++c)
    kernels::CompressIndexKey(sp.index_dim, k.data() + c * sp.index_dim,
                              keys.data() + c * sp.IndexKeyBytes());
  auto core = Core(64 << 20, 8);
  SessionOptions o;
  o.spec = sp;
  o.max_tokens = tokens + 8;
  o.mode = Mode::kDense;
  ASSERT_THAT(core->Open("dense", o), IsOk());
  o.mode = Mode::kSparse;
  o.policy = indexer::Policy::kRecency;
  o.budget = 0.15f;
  o.miss_ratio = 1.0f;
  ASSERT_THAT(core->Open("sparse", o), IsOk());
  for (const char* id : {"dense", "sparse"})
    ASSERT_THAT(core->Prefill(id, pages.data(), n_pages, tokens, keys.data(), 0, chunks), IsOk());
  std::vector<float> nk(2 * D), nv(2 * D);
  for (float& x : nk) x = nd(rng);
  for (float& x : nv) x = nd(rng);
  std::map<std::string, std::vector<std::vector<float>>> outs;
  std::vector<bool> stalled(2);
  for (uint32_t step = 0; step < 2; ++step)
    for (const char* id : {"dense", "sparse"}) {
      std::vector<float> out(4 * D);
      bool st = false;
      LayerStep r;
      r.session = id;
      r.step = step;
      r.layer = 0;
      r.q = step == 0 ? calm_q : needle_q;
      r.k = nk;
      r.v = nv;
      r.out = out.data();
      r.stalled = &st;
      ASSERT_THAT(core->Step({&r, 1})[0], IsOk()) << id << " step " << step;
      outs[id].push_back(out);
      if (std::string(id) == "sparse") {
        stalled[step] = st;
        auto stats = core->Stats(id);
        ASSERT_THAT(stats, IsOk());
        EXPECT_EQ(stats->miss_fires, step) << "step " << step;
        EXPECT_EQ(*core->Resident(id, {9}), std::vector<bool>{step == 1}) << "step " << step;
      }
    }
  EXPECT_FALSE(stalled[0]);
  EXPECT_TRUE(stalled[1]);
  // Heads 0 and 1 (the needle's KV group) answer as dense does; heads 2 and 3 attend evenly.
  outs["sparse"][1].resize(2 * D);
  outs["dense"][1].resize(2 * D);
  EXPECT_LT(MaxAbsDiff(outs["sparse"][1], outs["dense"][1]), 1e-3);  // the rest: ~1e-4 mass
  EXPECT_GT(MaxAbsDiff(outs["sparse"][0], outs["dense"][0]), 1e-3) << "the set is sparse";
}

TEST_F(DecodeCoreTest, BadInputGetsPreciseStatusAndLeavesTheSessionIntact) {
  auto g = Generate(2048, 32, 14);
  auto core = Core();
  ASSERT_THAT(core->Open("a", Options(*g, Mode::kDense, 1.0f, indexer::Policy::kDefault)), IsOk());
  EXPECT_EQ(core->Open("a", Options(*g, Mode::kDense, 1.0f, indexer::Policy::kDefault)).code(),
            StatusCode::kAlreadyExists);
  SessionOptions bad = Options(*g, Mode::kSparse, 1.5f, indexer::Policy::kDefault);
  EXPECT_EQ(core->Open("b", bad).code(), StatusCode::kInvalidArgument);
  bad.budget = 0.1f;
  bad.max_tokens = 0;
  EXPECT_EQ(core->Open("b", bad).code(), StatusCode::kInvalidArgument);
  bad.max_tokens = UINT64_MAX;  // was admitted with 3 cells
  EXPECT_THAT(core->Open("b", bad),
              ::fm::testing::StatusIs(StatusCode::kInvalidArgument, "max_tokens must be in [1, 16777216]"));
  bad.max_tokens = 4096;
  bad.tau = UINT32_MAX;
  EXPECT_THAT(core->Open("b", bad),
              ::fm::testing::StatusIs(StatusCode::kInvalidArgument, "tau must be in [0, 1024]"));
  bad.tau = 0;
  bad.switch_lag = 16;  // the set of a cycle must take over within it (tau 16)
  auto lag = core->Open("b", bad);
  EXPECT_EQ(lag.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(lag.message().find("switch_lag must be below tau (16), got 16"), std::string::npos)
      << lag;
  bad.tau = 32;  // its own tau
  EXPECT_THAT(core->Open("b", bad), IsOk());
  ASSERT_THAT(core->Close("b", false), IsOk());
  SessionOptions other = Options(*g, Mode::kDense, 1.0f, indexer::Policy::kDefault);
  other.spec.head_dim = 128;  // pages of another size than the reserve's
  EXPECT_EQ(core->Open("b", other).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(core->Prefill("nope", nullptr, 0, 1, nullptr, 0, 0).code(), StatusCode::kNotFound);
  {  // A NaN or infinity in a prefill page's K or V (steps refuse them too); padding rows of
     // a partial page are not read.
    std::vector<uint8_t> page(spec_.PageBytes());
    g->FillPage(0, page.data());
    float* f = reinterpret_cast<float*>(page.data());
    f[spec_.ElemOffset(1, 1, 0, 5)] = INFINITY;
    EXPECT_THAT(core->Prefill("a", page.data(), 1, 64, nullptr, 0, 0),
                ::fm::testing::StatusIs(StatusCode::kInvalidArgument,
                                        "prefill page 0 holds a NaN or infinity (layer 1, V"));
    ASSERT_THAT(core->Open("c", Options(*g, Mode::kDense, 1.0f, indexer::Policy::kDefault)),
                IsOk());
    EXPECT_THAT(core->Prefill("c", page.data(), 1, 5, nullptr, 0, 0), IsOk());  // row 5: padding
    ASSERT_THAT(core->Close("c", true), IsOk());
  }
  Prefill(*core, "a", *g);

  StepData d = Data(*g, 0, 0, 16);
  LayerStep r = Request("ghost", 0, 0, d);
  EXPECT_EQ(core->Step({&r, 1})[0].code(), StatusCode::kNotFound);
  r = Request("a", 1, 0, d);  // step 1 before step 0
  EXPECT_EQ(core->Step({&r, 1})[0].code(), StatusCode::kFailedPrecondition);
  r = Request("a", 0, 1, d);  // layer 1 before layer 0
  EXPECT_EQ(core->Step({&r, 1})[0].code(), StatusCode::kFailedPrecondition);
  StepData shortq = d;
  shortq.q.pop_back();
  r = Request("a", 0, 0, shortq);
  auto res = core->Step({&r, 1});
  EXPECT_EQ(res[0].code(), StatusCode::kInvalidArgument);
  EXPECT_NE(res[0].message().find("expected q [4][64]"), std::string::npos) << res[0];
  StepData nan = d;
  nan.k[3] = std::nanf("");
  r = Request("a", 0, 0, nan);
  EXPECT_EQ(core->Step({&r, 1})[0].code(), StatusCode::kInvalidArgument);
  StepData badkeys = d;
  badkeys.keys.assign(7, 0);
  r = Request("a", 0, 0, badkeys);
  EXPECT_EQ(core->Step({&r, 1})[0].code(), StatusCode::kInvalidArgument);

  // Step 3 completes a chunk: its last layer must bring (or follow) the chunk's keys.
  for (uint32_t st = 0; st < 3; ++st) DecodeStep(*core, "a", *g, st, 16);
  StepData s3 = Data(*g, 3, 0, 16), s3b = Data(*g, 3, 1, 16);
  s3.keys.clear();
  s3b.keys.clear();
  LayerStep q0 = Request("a", 3, 0, s3), q1 = Request("a", 3, 1, s3b);
  ASSERT_THAT(core->Step({&q0, 1})[0], IsOk());
  EXPECT_EQ(core->Step({&q1, 1})[0].code(), StatusCode::kInvalidArgument);

  // A batch mixing sessions: the bad request fails alone. Restarting step 3 at layer 0
  // (a client whose stream broke) and finishing it gives the same result as a clean run.
  StepData a0 = Data(*g, 3, 0, 16), a1 = Data(*g, 3, 1, 16);
  LayerStep batch[3] = {Request("a", 3, 0, a0), Request("ghost", 0, 0, d), Request("a", 3, 1, a1)};
  res = core->Step(batch);
  EXPECT_THAT(res[0], IsOk());
  EXPECT_EQ(res[1].code(), StatusCode::kNotFound);
  EXPECT_THAT(res[2], IsOk());
  std::vector<float> ref(spec_.head_dim);
  for (uint32_t h = 0; h < spec_.q_heads; ++h) {
    g->DenseOutput(3, 1, h, ref.data());
    for (uint32_t i = 0; i < spec_.head_dim; ++i)
      EXPECT_NEAR(a1.out[h * spec_.head_dim + i], ref[i], 1e-4);
  }
  auto st = core->Stats("a");
  ASSERT_THAT(st.status(), IsOk());
  EXPECT_EQ(st->steps, 4u);
  EXPECT_EQ(st->tokens, 2052u);
  ASSERT_THAT(core->Close("a"), IsOk());
  EXPECT_EQ(core->Close("a").code(), StatusCode::kNotFound);
  r = Request("a", 4, 0, d);
  EXPECT_EQ(core->Step({&r, 1})[0].code(), StatusCode::kNotFound);
}

TEST_F(DecodeCoreTest, AnIndexerThatLostTheSessionIsGivenItAgain) {
  // An indexer restarted empty (here: the session dropped from it) answers NOT_FOUND; the
  // worker re-registers the history from the keys records in the kvstore and the outputs
  // stay those of an undisturbed session.
  auto g = Generate(4000, 64, 17);
  // Quest: its page scores come from the Quest bounds, which the records carry too.
  const SessionOptions so = Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  auto core = Core();
  ASSERT_THAT(core->Open("ref", so), IsOk());
  Prefill(*core, "ref", *g);
  auto ref = Decode(*core, "ref", *g, 16);
  ASSERT_THAT(core->Open("s", so), IsOk());
  Prefill(*core, "s", *g);
  for (uint32_t st = 0; st < 64; ++st) {
    // Lost before the predictions of steps 16 (nothing to append: Predict finds it gone),
    // 32 (page 62 sealed at step 31: the append finds it gone) and 48.
    if (st == 10 || st == 20 || st == 40) {
      ASSERT_THAT(indexer_.Drop("s"), IsOk());
    }
    for (uint32_t l = 0; l < spec_.layers; ++l) {
      StepData d = Data(*g, st, l, 16);
      LayerStep r = Request("s", st, l, d);
      ASSERT_THAT(core->Step({&r, 1})[0], IsOk()) << "step " << st;
      ASSERT_LT(MaxAbsDiff(d.out, ref[st][l]), 1e-6) << "step " << st << " layer " << l;
    }
  }
  auto st = core->Stats("s");
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->reregistrations, 3u);
  EXPECT_EQ(st->prediction_failures, 0u);
  EXPECT_EQ(st->predictions, 4u);
  // The worker's totals: both sessions.
  const ReserveStats r = core->Reserve();
  EXPECT_EQ(r.steps, 128u);
  EXPECT_EQ(r.predictions, 8u);
  EXPECT_EQ(r.reregistrations, 3u);
  EXPECT_EQ(r.prediction_failures, 0u);
}

TEST_F(DecodeCoreTest, TraceModeWritesTheModelsTraceWithItsGoldenLabels) {
  // A trace session decodes dense and, at close, writes the trace a trainer reads: on a
  // generated session its index keys, hidden states, page masses and golden labels are the
  // generator's own.
  auto g = Generate(4000, 48, 18);
  EXPECT_EQ(Core()->Open("t", Options(*g, Mode::kTrace, 1.0f, indexer::Policy::kDefault)).code(),
            StatusCode::kFailedPrecondition);  // no trace directory
  const std::string traces = dir_ + "/traces";
  std::filesystem::create_directories(traces);
  auto core = Core(32 << 20, 16, false, traces);
  ASSERT_THAT(core->Open("d", Options(*g, Mode::kDense, 1.0f, indexer::Policy::kDefault)), IsOk());
  const std::string id = "trace/1";  // not a plain file name
  ASSERT_THAT(core->Open(id, Options(*g, Mode::kTrace, 1.0f, indexer::Policy::kDefault)), IsOk());
  Prefill(*core, "d", *g);
  Prefill(*core, id, *g);
  auto dense = Decode(*core, "d", *g, 16);
  auto traced = Decode(*core, id, *g, 16);
  for (size_t st = 0; st < dense.size(); ++st)
    for (size_t l = 0; l < dense[st].size(); ++l)
      ASSERT_EQ(MaxAbsDiff(dense[st][l], traced[st][l]), 0.0) << "step " << st;
  ASSERT_THAT(core->Close(id), IsOk());
  EXPECT_EQ(TraceFileName(id), "=74726163652f31.safetensors");
  // A client may name the file, inside the trace directory only.
  SessionOptions named = Options(*g, Mode::kTrace, 1.0f, indexer::Policy::kDefault);
  named.trace_name = "../escape.safetensors";
  EXPECT_EQ(core->Open("named", named).code(), StatusCode::kInvalidArgument);
  named.trace_name = "named.safetensors";
  ASSERT_THAT(core->Open("named", named), IsOk());
  Prefill(*core, "named", *g);
  Decode(*core, "named", *g, 16);
  ASSERT_THAT(core->Close("named"), IsOk());
  EXPECT_TRUE(std::filesystem::exists(traces + "/named.safetensors"));
  auto t = workload::ReadTrace(traces + "/" + TraceFileName(id));
  ASSERT_THAT(t, IsOk());
  EXPECT_EQ(t->prefill_tokens, 4000u);
  EXPECT_EQ(t->steps, 48u);
  EXPECT_EQ(t->tau, 16u);
  ASSERT_EQ(t->cycles, 3u);
  ASSERT_EQ(t->chunks, (4000u + 48) / spec_.chunk_tokens);
  const size_t kb = spec_.IndexKeyBytes();
  for (uint32_t l = 0; l < spec_.index_layers; ++l)
    EXPECT_EQ(std::memcmp(t->keys(l), g->index_keys(l).data(), t->chunks * kb), 0);
  for (uint32_t c = 0; c < t->cycles; ++c)
    EXPECT_EQ(std::memcmp(t->hidden_at(c * 16), g->hidden(c * 16), spec_.hidden_dim * 4), 0);
  double worst = 0;
  for (uint32_t st = 0; st < t->steps; ++st)
    for (uint64_t p = 0; p < t->pages_at(st); ++p)
      worst = std::max(worst, std::abs(double(t->page_mass_at(st)[p]) - g->page_mass(st)[p]));
  EXPECT_LT(worst, 1e-4);
  uint64_t agree = 0, total = 0, labelled = 0;
  for (uint32_t c = 0; c < t->cycles; ++c)
    for (uint64_t j = 0; j < t->chunks; ++j) {
      agree += t->labels_at(c)[j] == g->labels(c)[j];
      labelled += t->labels_at(c)[j];
      ++total;
    }
  EXPECT_GT(labelled, 2u * t->cycles);
  EXPECT_GE(double(agree) / total, 0.999) << agree << " of " << total;
}

TEST_F(DecodeCoreTest, LevelTwoAttendsToTheTopKTokensOfTheResidentSet) {
  auto g = Generate(4000, 32, 19);
  auto core = Core();
  SessionOptions so = Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  SessionOptions bad = so;
  bad.level2_topk = 2049;
  EXPECT_EQ(core->Open("bad", bad).code(), StatusCode::kInvalidArgument);
  std::vector<std::vector<std::vector<float>>> outs[3];
  const uint32_t topk[3] = {0, 2048, 64};  // off; above the resident tokens; 64 of them
  for (int i = 0; i < 3; ++i) {
    so.level2_topk = topk[i];
    const std::string id = "l2-" + std::to_string(topk[i]);
    ASSERT_THAT(core->Open(id, so), IsOk());
    Prefill(*core, id, *g);
    outs[i] = Decode(*core, id, *g, 16);
  }
  double same = 0, apart = 0;
  for (size_t st = 0; st < outs[0].size(); ++st)
    for (size_t l = 0; l < outs[0][st].size(); ++l) {
      same = std::max(same, MaxAbsDiff(outs[0][st][l], outs[1][st][l]));
      apart = std::max(apart, MaxAbsDiff(outs[0][st][l], outs[2][st][l]));
    }
  EXPECT_LT(same, 1e-5);  // top-k of every resident token is the plain sparse attention
  EXPECT_GT(apart, 1e-3);
  // 64 tokens per layer still carry most of what the model attends to.
  EXPECT_GT(replay::CompareToModel(*g, 32, 3,
                                   [&](uint32_t st, uint32_t l) { return outs[2][st][l].data(); })
                .cosine,
            0.8);
}

TEST_F(DecodeCoreTest, ResumedSessionsContinueWithIdenticalOutputs) {
  // With and without the miss check (whose fetches in flight are part of the state; a
  // check the close cut short runs again on resume), at the worker's lag of 2 and at 4 (the
  // headroom freed at each cycle start follows the saved ranking of the set).
  for (const auto& [mc, lag] : std::vector<std::pair<bool, uint32_t>>{
           {false, 0}, {true, 0}, {false, 4}, {true, 4}}) {
    SCOPED_TRACE(absl::StrCat(mc ? "miss check" : "no miss check", ", lag ", lag));
    const std::string sfx = absl::StrCat(mc ? "-mc" : "", lag ? "-lag" : "");
    auto g = Generate(4000, 64, 16);
    SessionOptions so = Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest);
    so.switch_lag = lag;
    auto ref_core = Core(32 << 20, 16, mc);
    ASSERT_THAT(ref_core->Open("ref" + sfx, so), IsOk());
    Prefill(*ref_core, "ref" + sfx, *g);
    auto ref = Decode(*ref_core, "ref" + sfx, *g, 16);

    auto run = [&](DecodeCore& core, const std::string& id, uint32_t from, uint32_t to,
                   std::vector<std::vector<std::vector<float>>>* outs) {
      for (uint32_t st = from; st < to; ++st)
        for (uint32_t l = 0; l < spec_.layers; ++l) {
          StepData d = Data(*g, st, l, 16);
          LayerStep r = Request(id, st, l, d);
          ASSERT_THAT(core.Step({&r, 1})[0], IsOk()) << "step " << st;
          (*outs)[st][l] = d.out;
        }
    };
    std::vector<std::vector<std::vector<float>>> outs(64, std::vector<std::vector<float>>(2));
    // Closed at step 33, between a cycle's prediction (32) and its switch (34 or 36); resumed
    // on another worker.
    {
      auto a = Core(32 << 20, 16, mc);
      ASSERT_THAT(a->Open("s" + sfx, so), IsOk());
      Prefill(*a, "s" + sfx, *g);
      run(*a, "s" + sfx, 0, 33, &outs);
      ASSERT_THAT(a->Close("s" + sfx), IsOk());
    }
    auto b = Core(32 << 20, 16, mc);
    SessionOptions resume;
    resume.resume = true;
    ASSERT_THAT(b->Open("s" + sfx, resume), IsOk());
    auto st = b->Stats("s" + sfx);
    ASSERT_THAT(st, IsOk());
    EXPECT_EQ(st->next_step, 33u);
    EXPECT_EQ(st->tokens, 4033u);
    run(*b, "s" + sfx, 33, 64, &outs);
    for (uint32_t s = 0; s < 64; ++s)
      for (uint32_t l = 0; l < spec_.layers; ++l)
        ASSERT_LT(MaxAbsDiff(outs[s][l], ref[s][l]), 1e-6) << "step " << s << " layer " << l;

    // A worker lost without closing: the state saved at the last seal (step 31) resumes and
    // the client replays the steps since.
    {
      auto c = Core(32 << 20, 16, mc);
      ASSERT_THAT(c->Open("t" + sfx, so), IsOk());
      Prefill(*c, "t" + sfx, *g);
      run(*c, "t" + sfx, 0, 50, &outs);
    }  // destroyed: nothing saved at the end
    ASSERT_THAT(b->Open("t" + sfx, resume), IsOk());
    st = b->Stats("t" + sfx);
    ASSERT_THAT(st, IsOk());
    EXPECT_EQ(st->next_step, 32u);
    EXPECT_EQ(st->tokens, 4032u);
    run(*b, "t" + sfx, 32, 64, &outs);
    for (uint32_t s = 32; s < 64; ++s)
      for (uint32_t l = 0; l < spec_.layers; ++l)
        ASSERT_LT(MaxAbsDiff(outs[s][l], ref[s][l]), 1e-6) << "step " << s << " layer " << l;
    EXPECT_EQ(b->Open("never" + sfx, resume).code(), StatusCode::kNotFound);

    // A worker lost before the session's first seal (step 31): the state saved when the
    // prefill completed resumes it from step 0.
    {
      auto c = Core(32 << 20, 16, mc);
      ASSERT_THAT(c->Open("u" + sfx, so), IsOk());
      Prefill(*c, "u" + sfx, *g);
      run(*c, "u" + sfx, 0, 5, &outs);
    }
    ASSERT_THAT(b->Open("u" + sfx, resume), IsOk());
    st = b->Stats("u" + sfx);
    ASSERT_THAT(st, IsOk());
    EXPECT_EQ(st->next_step, 0u);
    EXPECT_EQ(st->tokens, 4000u);
    run(*b, "u" + sfx, 0, 64, &outs);
    EXPECT_EQ(b->Stats("u" + sfx)->prediction_failures, 0u);
    for (uint32_t s = 0; s < 64; ++s)
      for (uint32_t l = 0; l < spec_.layers; ++l)
        ASSERT_LT(MaxAbsDiff(outs[s][l], ref[s][l]), 1e-6) << "step " << s << " layer " << l;
  }
}

// A saved state in layout 1 (the flat fields a worker wrote before the nested layout), as
// that worker would have written it: the inverse of UpgradeState.
flashmemory::v1::DecodeSessionState FlatLayout(const flashmemory::v1::DecodeSessionState& st) {
  flashmemory::v1::DecodeSessionState old;
  const auto& o = st.options();
  *old.mutable_spec() = o.spec();
  old.set_mode(o.mode());
  old.set_policy(o.policy());
  old.set_budget(o.budget());
  old.set_max_pages(o.max_pages());
  old.set_tau(o.tau());
  old.set_switch_lag(o.switch_lag());
  old.set_level2_topk(o.level2_topk());
  old.set_miss_ratio(o.miss_ratio());
  old.set_max_tokens(o.max_tokens());
  const auto& p = st.position();
  old.set_tokens(p.tokens());
  old.set_next_step(p.next_step());
  old.set_decoding(p.decoding());
  old.set_key_chunks(p.key_chunks());
  old.set_sent_chunks(p.sent_chunks());
  old.set_sent_pages(p.sent_pages());
  old.set_pending_keys(p.pending_keys());
  old.set_have_set(p.have_set());
  *old.mutable_wanted() = p.wanted();
  *old.mutable_ranked() = p.ranked();
  old.set_launched_for(p.launched_for());
  if (st.has_saved_job()) {
    const auto& j = st.saved_job();
    old.set_job(true);
    old.set_job_step(j.step());
    old.set_switch_step(j.switch_step());
    old.set_job_cells(j.cells());
    old.set_job_catch_up(j.catch_up());
    *old.mutable_job_pages() = j.pages();
    old.set_job_sealed(j.sealed());
    *old.mutable_job_resident() = j.resident();
    old.set_job_has_hidden(j.has_hidden());
    old.set_job_hidden(j.hidden());
    old.set_job_query(j.query());
    old.set_job_done(j.done());
    *old.mutable_job_wanted() = j.wanted();
    *old.mutable_job_ranked() = j.ranked();
    *old.mutable_job_fetched() = j.fetched();
    *old.mutable_job_deferred_pages() = j.deferred_pages();
  }
  if (st.has_saved_recovery()) {
    const auto& r = st.saved_recovery();
    old.set_recovery(true);
    old.set_recovery_install_step(r.install_step());
    old.set_recovery_cells(r.cells());
    old.set_recovery_q(r.q());
    old.set_recovery_lse(r.lse());
    *old.mutable_recovery_pages() = r.pages();
    old.set_recovery_done(r.done());
    *old.mutable_recovery_fetched() = r.fetched();
  }
  const auto& c = st.stats();
  old.set_steps(c.steps());
  old.set_stalls(c.stalls());
  old.set_stall_ms(c.stall_ms());
  old.set_catch_up_stalls(c.catch_up_stalls());
  old.set_predictions(c.predictions());
  old.set_surprise_fetches(c.surprise_fetches());
  old.set_miss_checks(c.miss_checks());
  old.set_miss_fires(c.miss_fires());
  return old;
}

TEST_F(DecodeCoreTest, AStateSavedInTheFlatLayoutResumesWithIdenticalOutputs) {
  auto g = Generate(4000, 64, 16);
  SessionOptions so = Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  auto ref_core = Core(32 << 20, 16, true);
  ASSERT_THAT(ref_core->Open("ref", so), IsOk());
  Prefill(*ref_core, "ref", *g);
  auto ref = Decode(*ref_core, "ref", *g, 16);
  std::vector<std::vector<std::vector<float>>> outs;
  {
    auto a = Core(32 << 20, 16, true);
    ASSERT_THAT(a->Open("s", so), IsOk());
    Prefill(*a, "s", *g);
    for (uint32_t st = 0; st < 33; ++st) outs.push_back(DecodeStep(*a, "s", *g, st, 16));
    ASSERT_THAT(a->Close("s"), IsOk());
  }
  // The state as the closing worker wrote it (layout 2), then in layout 1.
  auto blob = store_->ReadPayload("s", kStatePage);
  ASSERT_THAT(blob, IsOk());
  flashmemory::v1::DecodeSessionState st;
  ASSERT_TRUE(st.ParseFromString(*blob));
  ASSERT_EQ(st.layout(), kStateLayout);
  ASSERT_TRUE(st.has_saved_job());  // closed between a cycle's prediction and its switch
  const flashmemory::v1::DecodeSessionState flat = FlatLayout(st);
  EXPECT_EQ(flat.layout(), 0u);
  EXPECT_EQ(UpgradeState(flat).SerializeAsString(), st.SerializeAsString());
  auto put = [&](const flashmemory::v1::DecodeSessionState& m) {
    const std::string b = m.SerializeAsString();
    ASSERT_THAT(store_->Put(MakePageHeader("s", kStatePage, ModelSpecHash(spec_), 1, spec_.dtype,
                                           b.data(), b.size()),
                            reinterpret_cast<const uint8_t*>(b.data())),
                IsOk());
  };
  SessionOptions resume;
  resume.resume = true;
  // A layout this worker does not know is refused, and the session stays resumable.
  flashmemory::v1::DecodeSessionState newer = st;
  newer.set_layout(kStateLayout + 1);
  put(newer);
  auto b = Core(32 << 20, 16, true);
  const absl::Status refused = b->Open("s", resume);
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(refused.message(),
            "the saved state of \"s\" has layout 3, newer than this worker's (2): resume it on "
            "a newer worker");
  put(flat);
  ASSERT_THAT(b->Open("s", resume), IsOk());
  EXPECT_EQ(b->Stats("s")->next_step, 33u);
  for (uint32_t st = 33; st < 64; ++st) outs.push_back(DecodeStep(*b, "s", *g, st, 16));
  for (uint32_t s = 0; s < 64; ++s)
    for (uint32_t l = 0; l < spec_.layers; ++l)
      ASSERT_LT(MaxAbsDiff(outs[s][l], ref[s][l]), 1e-6) << "step " << s << " layer " << l;
}

// One client steps a session while two others close and resume it in a loop on the same
// worker: no call crashes the worker, every call answers OK or a precise code, and every
// step answered OK gives the uninterrupted run's output (a step cut by a close fails whole;
// the client restarts at the step the session expects).
TEST_F(DecodeCoreTest, StepsResumesAndClosesRacingOnOneSessionNeverMixOutputs) {
  auto g = Generate(4000, 64, 16);
  const SessionOptions so = Options(*g, Mode::kSparse, 0.25f, indexer::Policy::kQuest);
  std::vector<std::vector<std::vector<float>>> ref;
  {
    auto ref_core = Core();
    ASSERT_THAT(ref_core->Open("ref", so), IsOk());
    Prefill(*ref_core, "ref", *g);
    ref = Decode(*ref_core, "ref", *g, 16);
  }
  auto core = Core();
  ASSERT_THAT(core->Open("x", so), IsOk());
  Prefill(*core, "x", *g);
  std::atomic<bool> done{false};
  std::atomic<int> closes{0}, resumes{0}, bad_codes{0};

  auto allowed = [&](const absl::Status& st) {
    if (!st.ok() && st.code() != StatusCode::kNotFound && st.code() != StatusCode::kUnavailable &&
        st.code() != StatusCode::kAlreadyExists) {
      ADD_FAILURE() << st;
      ++bad_codes;
    }
  };
  SessionOptions resume;
  resume.resume = true;
  auto closer = [&](int seed) {
    std::mt19937 rng(seed);
    const auto stop = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!done && std::chrono::steady_clock::now() < stop) {
      absl::Status c = core->Close("x");
      allowed(c);
      if (c.ok()) ++closes;
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
      absl::Status o = core->Open("x", resume);
      allowed(o);
      if (o.ok()) ++resumes;
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
    }
  };
  std::thread b(closer, 1), c(closer, 2);
  uint64_t ok_steps = 0, wrong = 0, retries = 0;
  uint32_t st = 0, l = 0;
  const auto stop = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (st < 64 && std::chrono::steady_clock::now() < stop) {
    StepData d = Data(*g, st, l, 16);
    LayerStep r = Request("x", st, l, d);
    const absl::Status res = core->Step({&r, 1})[0];
    if (res.ok()) {
      ++ok_steps;
      if (MaxAbsDiff(d.out, ref[st][l]) > 1e-6) {
        ++wrong;
        ADD_FAILURE() << "step " << st << " layer " << l << " answered OK with another output";
      }
      if (++l == spec_.layers) l = 0, ++st;
      continue;
    }
    ++retries;
    if (res.code() == StatusCode::kFailedPrecondition) {  // the session went back to a step
      auto stats = core->Stats("x");
      if (stats.ok()) st = static_cast<uint32_t>(stats->next_step), l = 0;
    } else if (res.code() != StatusCode::kNotFound) {
      ADD_FAILURE() << res;
      break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  done = true;
  b.join();
  c.join();
  EXPECT_EQ(st, 64u);
  EXPECT_EQ(wrong, 0u) << "of " << ok_steps << " steps answered OK";
  EXPECT_EQ(bad_codes, 0);
  EXPECT_GE(closes, 5);  // the race really ran
  EXPECT_GE(resumes, 5);
  EXPECT_GT(retries, 0u);
  std::printf("steps ok %llu, retried %llu, closes %d, resumes %d\n",
              static_cast<unsigned long long>(ok_steps), static_cast<unsigned long long>(retries),
              closes.load(), resumes.load());
}

TEST(AutoSwitchLag, FollowsTheIndexerToAttentionWorkRatio) {
  // bench: 16 chunks x 3 x 16 x 128 scanned vs 64 x 4 x 32 x 128 x 2 x 0.075 attended per
  // page: ratio 0.63, lag 1 + 2. long: 16 x 3 x 8 x 128 vs 64 x 2 x 8 x 128 x 2 x 0.04:
  // ratio 4.7, lag 8 (the most). A denser set is cheaper to predict for relative to its steps.
  EXPECT_EQ(AutoSwitchLag(*PresetSpec("bench"), 0.075), 3u);
  EXPECT_EQ(AutoSwitchLag(*PresetSpec("long"), 0.04), 8u);
  EXPECT_EQ(AutoSwitchLag(*PresetSpec("long"), 0.25), 3u);
  EXPECT_EQ(AutoSwitchLag(*PresetSpec("long"), 0.1), 5u);
  EXPECT_EQ(AutoSwitchLag(*PresetSpec("long"), 1.0), 2u);
}


TEST(AutoCatchUpShare, IsAnEighthOfTheSetPerStepOfLagUpToAll) {
  EXPECT_EQ(AutoCatchUpShare(1), 0.125);
  EXPECT_EQ(AutoCatchUpShare(2), 0.25);
  EXPECT_EQ(AutoCatchUpShare(4), 0.5);
  EXPECT_EQ(AutoCatchUpShare(8), 1.0);
  EXPECT_EQ(AutoCatchUpShare(12), 1.0);
}

TEST(AutoCycle, IsTheSmallestPowerOfTwoOfTwoAndAHalfLags) {
  EXPECT_EQ(AutoCycle(1), 8u);
  EXPECT_EQ(AutoCycle(2), 8u);
  EXPECT_EQ(AutoCycle(3), 8u);  // the bench spec at a 10 % cap
  EXPECT_EQ(AutoCycle(4), 16u);
  EXPECT_EQ(AutoCycle(6), 16u);
  EXPECT_EQ(AutoCycle(7), 32u);
  EXPECT_EQ(AutoCycle(8), 32u);  // the long spec at 5 %
  EXPECT_EQ(AutoCycle(13), 64u);
  EXPECT_EQ(AutoCycle(100), 64u);  // the most
}

TEST_F(DecodeCoreTest, CycleFollowsTheSwitchLagWhenNobodySetsIt) {
  auto g = Generate(2048, 32, 16);
  DecodeOptions o;
  o.reserve_bytes = 32 << 20;
  o.tau = 0;
  o.switch_lag = 0;
  DecodeCore core(o, store_.get(), predictor_);
  SessionOptions so = Options(*g, Mode::kSparse, 0.5f, indexer::Policy::kQuest);
  so.tau = 0;
  so.switch_lag = 5;  // its own lag: a cycle of 16
  ASSERT_THAT(core.Open("a", so), IsOk());
  so.switch_lag = 0;  // the spec's lag at half the pages (2): a cycle of 8
  ASSERT_THAT(core.Open("b", so), IsOk());
  so.switch_lag = 9;  // its own lag: a cycle of 32
  ASSERT_THAT(core.Open("c", so), IsOk());
  const std::vector<std::pair<std::string, std::pair<uint32_t, uint32_t>>> want = {
      {"a", {16, 5}}, {"b", {8, 2}}, {"c", {32, 9}}};
  for (const auto& [id, tl] : want) {
    auto st = core.Stats(id);
    ASSERT_THAT(st.status(), IsOk());
    EXPECT_EQ(st->tau, tl.first) << id;
    EXPECT_EQ(st->switch_lag, tl.second) << id;
  }
}

TEST_F(DecodeCoreTest, AdmissionRefusesWhatTheReserveCannotHold) {
  auto g = Generate(8192, 16, 15);
  // 40 cells of 128 KiB pages (+ header): a dense 8K session needs 130, a sparse one at 10 %
  // its cap, ceil(0.1 * 129) = 13, open page and headroom included.
  auto core = Core(40 * (128 * 1024 + 256));
  auto st = core->Open("dense", Options(*g, Mode::kDense, 1.0f, indexer::Policy::kDefault));
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("needs 130 page cells"), std::string::npos) << st;
  int admitted = 0;
  for (int i = 0; i < 8; ++i)
    if (core->Open("s" + std::to_string(i),
                   Options(*g, Mode::kSparse, 0.1f, indexer::Policy::kSinkRecency))
            .ok())
      ++admitted;
  EXPECT_EQ(admitted, 3);  // 13 cells each
  EXPECT_EQ(core->Reserve().reserved_cells, 39u);
  ASSERT_THAT(core->Close("s0"), IsOk());
  EXPECT_EQ(core->Reserve().reserved_cells, 26u);
  EXPECT_THAT(core->Open("again", Options(*g, Mode::kSparse, 0.1f, indexer::Policy::kSinkRecency)),
              IsOk());
}

}  // namespace
}  // namespace fm::decode
