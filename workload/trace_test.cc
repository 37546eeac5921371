#include "workload/trace.h"

#include <gtest/gtest.h>

#include "common/status_matchers.h"

namespace fm::workload {
namespace {
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;

TEST(Trace, WritesAndReadsBackEveryTensor) {
  SessionConfig c;
  c.spec = *PresetSpec("tiny");
  c.seed = 3;
  c.prefill_tokens = 2000;
  c.steps = 128;
  c.knobs.tau = 64;
  auto s = Session::Generate(c);
  ASSERT_THAT(s.status(), IsOk());
  const std::string path = ::testing::TempDir() + "/trace.safetensors";
  ASSERT_THAT(WriteTrace(**s, path, {.pages = true, .step_queries = true, .outputs = true}),
              IsOk());
  auto t = ReadTrace(path);
  ASSERT_THAT(t.status(), IsOk());
  EXPECT_EQ(ModelSpecHash(t->spec), ModelSpecHash(c.spec));
  EXPECT_EQ(t->cycles, 2u);
  EXPECT_EQ(t->chunks, (*s)->total_chunks());
  EXPECT_EQ(std::memcmp(t->keys(0), (*s)->index_keys(0).data(), (*s)->index_keys(0).size()), 0);
  EXPECT_EQ(std::memcmp(t->hidden_at(77), (*s)->hidden(77), c.spec.hidden_dim * 4), 0);
  EXPECT_EQ(std::memcmp(t->labels_at(1), (*s)->labels(1), t->chunks), 0);
  EXPECT_EQ(std::memcmp(t->page_mass_at(100), (*s)->page_mass(100), t->pages * 4), 0);
  std::vector<float> q(c.spec.head_dim);
  (*s)->ModelQuery(64, 1, 3, q.data());
  EXPECT_EQ(std::memcmp(t->queries_at(1) + (1 * c.spec.q_heads + 3) * c.spec.head_dim, q.data(),
                        q.size() * 4),
            0);
  // Per-step queries and dense outputs; the output is softmax(q . K) V over the emitted pages.
  auto sq = t->file->GetFloats("step_queries", {128, 2, 4, 64});
  ASSERT_THAT(sq.status(), IsOk());
  (*s)->ModelQuery(99, 0, 1, q.data());
  EXPECT_EQ(std::memcmp(sq->data() + (99 * 8 + 1) * 64, q.data(), 64 * 4), 0);
  auto outs = t->file->GetFloats("outputs", {128, 2, 4, 64});
  ASSERT_THAT(outs.status(), IsOk());
  {
    const uint32_t st = 99, l = 1, h = 2, g = h / 2;
    (*s)->ModelQuery(st, l, h, q.data());
    const uint64_t n = (*s)->tokens_at(st);
    std::vector<uint8_t> pg(c.spec.PageBytes());
    std::vector<double> logit(n), o(64, 0.0);
    double mx = -1e300, z = 0;
    std::vector<std::vector<float>> vals(n);
    for (uint64_t tk = 0; tk < n; ++tk) {
      if (tk % 64 == 0) (*s)->FillPage(tk / 64, pg.data());
      const float* k =
          reinterpret_cast<const float*>(pg.data()) + c.spec.ElemOffset(l, 0, g, tk % 64);
      const float* v =
          reinterpret_cast<const float*>(pg.data()) + c.spec.ElemOffset(l, 1, g, tk % 64);
      double d = 0;
      for (int i = 0; i < 64; ++i) d += double(q[i]) * k[i];
      mx = std::max(mx, logit[tk] = d * c.spec.Scale());
      vals[tk].assign(v, v + 64);
    }
    for (uint64_t tk = 0; tk < n; ++tk) {
      const double p = std::exp(logit[tk] - mx);
      z += p;
      for (int i = 0; i < 64; ++i) o[i] += p * vals[tk][i];
    }
    const float* got = outs->data() + (size_t{st} * 8 + l * 4 + h) * 64;
    for (int i = 0; i < 64; ++i) ASSERT_NEAR(got[i], o[i] / z, 1e-4) << i;
  }
  auto pages =
      t->file->Get("pages", StDType::kU8, {int64_t(t->pages), int64_t(c.spec.PageBytes())});
  ASSERT_THAT(pages.status(), IsOk());
  std::vector<uint8_t> page(c.spec.PageBytes());
  (*s)->FillPage(5, page.data());
  EXPECT_EQ(std::memcmp(pages->data + 5 * page.size(), page.data(), page.size()), 0);
}

TEST(Trace, RejectsFilesThatAreNotTraces) {
  const std::string path = ::testing::TempDir() + "/not_a_trace.safetensors";
  SafetensorsWriter w;
  std::vector<float> x(4);
  w.Add("x", StDType::kF32, {4}, x);
  ASSERT_THAT(w.Write(path, {{"format", "something-else"}}), IsOk());
  EXPECT_THAT(ReadTrace(path).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ReadTrace(path + ".missing").status(), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace fm::workload
