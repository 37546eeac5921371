#include "services/decode/session_proto.h"

#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "common/model_spec.h"

namespace fm::decode {
namespace {

namespace v1 = flashmemory::v1;

TEST(SessionProto, EveryFieldSurvivesTheRoundTrip) {
  SessionOptions o;
  o.spec = *PresetSpec("tiny");
  o.mode = Mode::kTrace;
  o.budget = 0.05f;
  o.max_pages = 77;
  o.policy = indexer::Policy::kModelQuery;
  o.max_tokens = 123456;
  o.tau = 16;
  o.switch_lag = 3;
  o.level2_topk = 64;
  o.trace_name = "run-7.safetensors";
  o.miss_ratio = 2.5f;
  o.oracle_page_mass = {0.25f, 0.75f};
  o.resume = true;
  v1::OpenSessionRequest req;
  SessionOptionsToProto(o, &req);
  auto back = SessionOptionsFromProto(req);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(ModelSpecHash(back->spec), ModelSpecHash(o.spec));
  EXPECT_EQ(back->mode, Mode::kTrace);
  EXPECT_EQ(back->budget, 0.05f);
  EXPECT_EQ(back->max_pages, 77u);
  EXPECT_EQ(back->policy, indexer::Policy::kModelQuery);
  EXPECT_EQ(back->max_tokens, 123456u);
  EXPECT_EQ(back->tau, 16u);
  EXPECT_EQ(back->switch_lag, 3u);
  EXPECT_EQ(back->level2_topk, 64u);
  EXPECT_EQ(back->trace_name, "run-7.safetensors");
  EXPECT_EQ(back->miss_ratio, 2.5f);
  EXPECT_EQ(back->oracle_page_mass, (std::vector<float>{0.25f, 0.75f}));
  EXPECT_TRUE(back->resume);
}

TEST(SessionProto, DefaultsResolveOnceAndBadEnumsAreRefused) {
  v1::OpenSessionRequest req;
  auto o = SessionOptionsFromProto(req);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->budget, 0.1f);
  EXPECT_EQ(o->mode, Mode::kSparse);
  EXPECT_EQ(o->policy, indexer::Policy::kDefault);
  req.set_mode(static_cast<v1::DecodeMode>(9));
  EXPECT_EQ(SessionOptionsFromProto(req).status(),
            absl::InvalidArgumentError(
                "unknown mode 9; expected 0 (sparse), 1 sparse, 2 dense or 3 trace"));
  req.set_mode(v1::DECODE_MODE_DENSE);
  req.set_policy(static_cast<v1::Policy>(42));
  EXPECT_EQ(SessionOptionsFromProto(req).status(),
            absl::InvalidArgumentError("unknown policy 42"));
}

}  // namespace
}  // namespace fm::decode
