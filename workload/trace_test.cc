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
  auto s = Session::Generate(c);
  ASSERT_THAT(s.status(), IsOk());
  const std::string path = ::testing::TempDir() + "/trace.safetensors";
  ASSERT_THAT(WriteTrace(**s, path, /*with_pages=*/true), IsOk());
  auto t = ReadTrace(path);
  ASSERT_THAT(t.status(), IsOk());
  EXPECT_EQ(ModelSpecHash(t->spec), ModelSpecHash(c.spec));
  EXPECT_EQ(t->cycles, 2u);
  EXPECT_EQ(t->chunks, (*s)->total_chunks());
  EXPECT_EQ(std::memcmp(t->keys(0), (*s)->index_keys(0).data(), (*s)->index_keys(0).size()), 0);
  EXPECT_EQ(std::memcmp(t->hidden_at(1), (*s)->hidden(1), c.spec.hidden_dim * 4), 0);
  EXPECT_EQ(std::memcmp(t->labels_at(1), (*s)->labels(1), t->chunks), 0);
  EXPECT_EQ(std::memcmp(t->page_mass_at(100), (*s)->page_mass(100), t->pages * 4), 0);
  std::vector<float> q(c.spec.head_dim);
  (*s)->ModelQuery(64, 1, 3, q.data());
  EXPECT_EQ(std::memcmp(t->queries_at(1) + (1 * c.spec.q_heads + 3) * c.spec.head_dim, q.data(),
                        q.size() * 4),
            0);
  auto pages = t->file->Get("pages", StDType::kU8, {int64_t(t->pages), int64_t(c.spec.PageBytes())});
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
