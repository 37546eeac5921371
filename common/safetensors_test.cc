#include "common/safetensors.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

#include "common/codecs.h"
#include "common/status_matchers.h"

namespace fm {
namespace {
using ::fm::testing::IsOk;
using ::fm::testing::StatusIs;

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/" + name + ".safetensors";
}

void WriteRaw(const std::string& path, const std::string& header, const std::string& data) {
  std::ofstream f(path, std::ios::binary);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) f.put(static_cast<char>(n >> (8 * i)));
  f << header << data;
}

TEST(Safetensors, RoundTripsTensorsAndMetadata) {
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f};
  const std::vector<uint8_t> b = {1, 2, 3};
  const std::vector<uint16_t> c = {FloatToBf16(2.5f), FloatToBf16(-1.0f)};
  const std::vector<int64_t> e;  // a zero-element tensor
  SafetensorsWriter w;
  w.Add("a", StDType::kF32, {2, 3}, a);
  w.Add("bytes", StDType::kU8, {3}, b);
  w.Add("c", StDType::kBF16, {2}, c);
  w.Add("empty", StDType::kI64, {0, 4}, e);
  const std::string path = TempPath("roundtrip");
  ASSERT_THAT(w.Write(path, {{"kind", "trace"}, {"seed", "7"}}), IsOk());
  auto f = SafetensorsFile::Open(path);
  ASSERT_THAT(f.status(), IsOk());
  EXPECT_EQ((*f)->metadata().at("kind"), "trace");
  EXPECT_EQ((*f)->metadata().at("seed"), "7");
  EXPECT_EQ((*f)->names(), (std::vector<std::string>{"a", "bytes", "c", "empty"}));
  auto va = (*f)->Get("a", StDType::kF32, {2, 3});
  ASSERT_THAT(va.status(), IsOk());
  EXPECT_EQ(va->bytes, 24u);
  EXPECT_EQ(std::memcmp(va->data, a.data(), 24), 0);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(va->data) % 8, 0u);  // data is 8-byte aligned
  auto vb = (*f)->Get("bytes", StDType::kU8, {-1});
  ASSERT_THAT(vb.status(), IsOk());
  EXPECT_EQ(vb->data[2], 3);
  auto fc = (*f)->GetFloats("c", {2});
  ASSERT_THAT(fc.status(), IsOk());
  EXPECT_EQ(*fc, (std::vector<float>{2.5f, -1.0f}));
  auto ve = (*f)->Get("empty", StDType::kI64, {0, 4});
  ASSERT_THAT(ve.status(), IsOk());
  EXPECT_EQ(ve->bytes, 0u);
}

TEST(Safetensors, ReportsMismatchesAndMissingTensors) {
  const std::vector<float> a(6, 1.0f);
  SafetensorsWriter w;
  w.Add("a", StDType::kF32, {2, 3}, a);
  const std::string path = TempPath("mismatch");
  ASSERT_THAT(w.Write(path, {}), IsOk());
  auto f = SafetensorsFile::Open(path);
  ASSERT_THAT(f.status(), IsOk());
  EXPECT_THAT((*f)->Get("b").status(), StatusIs(absl::StatusCode::kNotFound));
  auto bad = (*f)->Get("a", StDType::kF32, {3, 2});
  EXPECT_THAT(bad.status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_NE(bad.status().message().find("is F32 [2, 3]; expected F32 [3, 2]"), std::string::npos)
      << bad.status();
  EXPECT_THAT((*f)->Get("a", StDType::kBF16).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(SafetensorsFile::Open(TempPath("does-not-exist")).status(),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(Safetensors, RejectsMalformedFilesWithoutCrashing) {
  const std::string path = TempPath("bad");
  struct Case {
    std::string header, data;
    absl::StatusCode code;
  };
  const Case cases[] = {
      {"not json", "", absl::StatusCode::kInvalidArgument},
      {"[1, 2]", "", absl::StatusCode::kInvalidArgument},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", "1234",
       absl::StatusCode::kDataLoss},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", "12345678",
       absl::StatusCode::kInvalidArgument},
      {R"({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}})", "12345678",
       absl::StatusCode::kInvalidArgument},
      {R"({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", "12345678",
       absl::StatusCode::kInvalidArgument},
      {R"({"a": {"dtype": "F32", "shape": [2]}})", "12345678", absl::StatusCode::kInvalidArgument},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", "12345678",
       absl::StatusCode::kDataLoss},
      {R"({"__metadata__": {"k": 3}})", "", absl::StatusCode::kInvalidArgument},
  };
  for (const Case& c : cases) {
    WriteRaw(path, c.header, c.data);
    EXPECT_THAT(SafetensorsFile::Open(path).status(), StatusIs(c.code)) << c.header;
  }
  // A header length beyond the file.
  {
    std::ofstream f(path, std::ios::binary);
    const char len[8] = {static_cast<char>(0xff), 0x7f, 0, 0, 0, 0, 0, 0};
    f.write(len, 8);
    f << "{}";
  }
  EXPECT_THAT(SafetensorsFile::Open(path).status(), StatusIs(absl::StatusCode::kDataLoss));
  {
    std::ofstream f(path, std::ios::binary);
    f << "abc";
  }
  EXPECT_THAT(SafetensorsFile::Open(path).status(), StatusIs(absl::StatusCode::kDataLoss));
}

}  // namespace
}  // namespace fm
