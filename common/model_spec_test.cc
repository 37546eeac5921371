#include "common/model_spec.h"

#include <gtest/gtest.h>

#include "common/status_matchers.h"

namespace fm {
namespace {
using ::fm::testing::StatusIs;

TEST(ModelSpec, PresetsMatchDesignTable) {
  auto tiny = PresetSpec("tiny").value();
  EXPECT_EQ(tiny.KvBytesPerToken(), 2048u);
  auto bench = PresetSpec("bench").value();
  EXPECT_EQ(bench.KvBytesPerToken(), 16384u);
  EXPECT_EQ(bench.PageBytes(), 1u << 20);
  auto lng = PresetSpec("long").value();
  EXPECT_EQ(lng.KvBytesPerToken(), 2048u);
  EXPECT_EQ(lng.IndexKeyBytes(), 132u);
  for (auto* s : {&tiny, &bench, &lng}) EXPECT_TRUE(s->Validate().ok()) << s->name;
  EXPECT_THAT(PresetSpec("huge"), StatusIs(absl::StatusCode::kNotFound));
}

TEST(ModelSpec, ValidateNamesTheField) {
  auto s = PresetSpec("bench").value();
  s.q_heads = 30;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, "q_heads"));
  s = PresetSpec("bench").value();
  s.head_dim = 72;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, "head_dim"));
  s.head_dim = 272;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, "head_dim"));
  s = PresetSpec("bench").value();
  s.chunk_tokens = 3;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, "chunk_tokens"));
  for (uint32_t d = 32; d <= 256; d += 16) {
    s = PresetSpec("bench").value();
    s.head_dim = d;
    EXPECT_TRUE(s.Validate().ok()) << d;
  }
}

TEST(ModelSpec, LayoutOffsetsTileThePage) {
  auto s = PresetSpec("tiny").value();
  // Last element of the last block ends exactly at the page end.
  size_t last = s.ElemOffset(s.layers - 1, 1, s.kv_heads - 1, s.page_tokens - 1) + s.head_dim;
  EXPECT_EQ(last * DTypeSize(s.dtype), s.PageBytes());
  EXPECT_EQ(s.ElemOffset(0, 1, 0, 0), s.kv_heads * s.HeadBlockElems());
  EXPECT_EQ(s.ElemOffset(1, 0, 0, 0), 2 * s.kv_heads * s.HeadBlockElems());
  EXPECT_EQ(s.PagesForTokens(0), 0u);
  EXPECT_EQ(s.PagesForTokens(65), 2u);
}

TEST(ModelSpec, HashIgnoresNameAndSeesShape) {
  auto a = PresetSpec("bench").value();
  auto b = a;
  b.name = "other";
  EXPECT_EQ(ModelSpecHash(a), ModelSpecHash(b));
  b.head_dim = 64;
  EXPECT_NE(ModelSpecHash(a), ModelSpecHash(b));
  b = a;
  b.softmax_scale = 1.0f / std::sqrt(128.0f);  // explicit default equals implicit default
  EXPECT_EQ(ModelSpecHash(a), ModelSpecHash(b));
}

TEST(DType, Parse) {
  EXPECT_EQ(ParseDType("bf16").value(), DType::kBf16);
  EXPECT_THAT(ParseDType("int8"), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace fm
