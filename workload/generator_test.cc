#include "workload/generator.h"

#include <gtest/gtest.h>

#include <cmath>

#include "common/codecs.h"
#include "common/status_matchers.h"

namespace fm::workload {
namespace {
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;

SessionConfig TinyConfig(uint64_t seed = 5) {
  SessionConfig c;
  c.spec = *PresetSpec("tiny");
  c.seed = seed;
  c.prefill_tokens = 4000;
  c.steps = 128;
  c.knobs.episode_tokens = 256;
  c.knobs.focus_steps = 40;
  c.knobs.session_topics = 6;
  c.knobs.needles = 2;
  return c;
}

TEST(Generator, IsDeterministicPerSeedAndDiffersAcrossSeeds) {
  auto a = Session::Generate(TinyConfig(5));
  auto b = Session::Generate(TinyConfig(5));
  auto c = Session::Generate(TinyConfig(6));
  ASSERT_THAT(a.status(), IsOk());
  ASSERT_THAT(b.status(), IsOk());
  ASSERT_THAT(c.status(), IsOk());
  EXPECT_EQ((*a)->index_keys(0), (*b)->index_keys(0));
  EXPECT_NE((*a)->index_keys(0), (*c)->index_keys(0));
  const uint32_t hd = (*a)->spec().hidden_dim;
  EXPECT_EQ(std::memcmp((*a)->hidden(1), (*b)->hidden(1), hd * 4), 0);
  EXPECT_EQ(std::memcmp((*a)->page_mass(77), (*b)->page_mass(77), (*a)->pages_at(77) * 4), 0);
}

TEST(Generator, PageMassesAreDistributionsWithTheSinkShare) {
  auto s = Session::Generate(TinyConfig());
  ASSERT_THAT(s.status(), IsOk());
  for (uint32_t st = 0; st < (*s)->config().steps; ++st) {
    const float* pm = (*s)->page_mass(st);
    double sum = 0;
    for (uint64_t p = 0; p < (*s)->pages_at(st); ++p) sum += pm[p];
    ASSERT_NEAR(sum, 1.0, 1e-4) << st;
    ASSERT_GE(pm[0], 0.15 - 1e-4) << st;  // the sink chunk lives in page 0
    for (uint64_t p = (*s)->pages_at(st); p < (*s)->total_pages(); ++p) ASSERT_EQ(pm[p], 0.0f);
  }
}

// The pages and queries the generator emits give, under plain softmax attention, exactly the
// page masses it reports (fp32 spec, so no K rounding).
TEST(Generator, DenseAttentionOverEmittedPagesMatchesPageMasses) {
  auto s = Session::Generate(TinyConfig());
  ASSERT_THAT(s.status(), IsOk());
  const Session& ss = **s;
  const ModelSpec& sp = ss.spec();
  std::vector<std::vector<uint8_t>> pages(ss.total_pages(), std::vector<uint8_t>(sp.PageBytes()));
  for (uint64_t p = 0; p < pages.size(); ++p) ss.FillPage(p, pages[p].data());
  std::vector<float> q(sp.head_dim);
  for (uint32_t st : {0u, 63u, 100u, ss.needles()[0].step, ss.needles()[1].step}) {
    const uint64_t n = ss.tokens_at(st);
    std::vector<double> pm(ss.pages_at(st), 0.0), logit(n);
    for (uint32_t l = 0; l < sp.layers; ++l)
      for (uint32_t h = 0; h < sp.q_heads; ++h) {
        ss.ModelQuery(st, l, h, q.data());
        const uint32_t g = h / (sp.q_heads / sp.kv_heads);
        double mx = -1e300, z = 0;
        for (uint64_t t = 0; t < n; ++t) {
          const float* k = reinterpret_cast<const float*>(pages[t / sp.page_tokens].data()) +
                           sp.ElemOffset(l, 0, g, t % sp.page_tokens);
          double d = 0;
          for (uint32_t i = 0; i < sp.head_dim; ++i) d += double(q[i]) * k[i];
          mx = std::max(mx, logit[t] = d * sp.Scale());
        }
        for (uint64_t t = 0; t < n; ++t) z += std::exp(logit[t] - mx);
        for (uint64_t t = 0; t < n; ++t)
          pm[t / sp.page_tokens] += std::exp(logit[t] - mx) / z / (sp.layers * sp.q_heads);
      }
    for (uint64_t p = 0; p < pm.size(); ++p)
      ASSERT_NEAR(pm[p], ss.page_mass(st)[p], 2e-4) << "step " << st << " page " << p;
  }
}

TEST(Generator, LabelsCoverTheSinkAndEachNeedleInItsCycle) {
  auto s = Session::Generate(TinyConfig());
  ASSERT_THAT(s.status(), IsOk());
  const Session& ss = **s;
  ASSERT_EQ(ss.needles().size(), 2u);
  for (uint32_t cy = 0; cy < ss.cycles(); ++cy) {
    EXPECT_EQ(ss.labels(cy)[0], 1);
    uint64_t positives = 0;
    for (uint64_t j = 0; j < ss.total_chunks(); ++j) positives += ss.labels(cy)[j];
    EXPECT_GT(positives, 1u);
    for (uint64_t j = ss.indexed_chunks(cy * ss.config().knobs.tau); j < ss.total_chunks(); ++j)
      ASSERT_EQ(ss.labels(cy)[j], 0) << j;
  }
  for (const Needle& n : ss.needles()) {
    EXPECT_EQ(ss.labels(n.step / ss.config().knobs.tau)[n.chunk], 1) << n.chunk;
    // The needle step puts a large share of its attention on the needle's page.
    EXPECT_GT(ss.page_mass(n.step)[n.chunk / ss.spec().ChunksPerPage()], 0.2);
  }
}

TEST(Generator, RejectsConfigsItCannotServe) {
  SessionConfig c = TinyConfig();
  c.steps = 100;  // not whole cycles
  EXPECT_THAT(Session::Generate(c).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  c = TinyConfig();
  c.spec.index_layers = 0;
  EXPECT_THAT(Session::Generate(c).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  c = TinyConfig();
  c.prefill_tokens = 10;
  EXPECT_THAT(Session::Generate(c).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  c = TinyConfig();
  c.knobs.top_p = 0;
  EXPECT_THAT(Session::Generate(c).status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace fm::workload
