#include "services/decode/session_proto.h"

#include "absl/strings/str_cat.h"
#include "common/spec_proto.h"

namespace fm::decode {

namespace v1 = flashmemory::v1;

void SessionOptionsToProto(const SessionOptions& o, v1::OpenSessionRequest* req, bool with_oracle) {
  SpecToProto(o.spec, req->mutable_spec());
  req->set_mode(o.mode == Mode::kDense   ? v1::DECODE_MODE_DENSE
                : o.mode == Mode::kTrace ? v1::DECODE_MODE_TRACE
                                         : v1::DECODE_MODE_SPARSE);
  req->set_policy(static_cast<v1::Policy>(o.policy));
  req->set_budget(o.budget);
  req->set_max_pages(o.max_pages);
  req->set_tau(o.tau);
  req->set_switch_lag(o.switch_lag);
  req->set_level2_topk(o.level2_topk);
  req->set_trace_path(o.trace_name);
  req->set_max_tokens(o.max_tokens);
  req->set_resume(o.resume);
  req->set_miss_ratio(o.miss_ratio);
  if (with_oracle)
    req->mutable_oracle_page_mass()->Assign(o.oracle_page_mass.begin(), o.oracle_page_mass.end());
}

absl::StatusOr<SessionOptions> SessionOptionsFromProto(const v1::OpenSessionRequest& req) {
  SessionOptions o;
  o.spec = SpecFromProto(req.spec());
  if (req.mode() < v1::DECODE_MODE_UNSPECIFIED || req.mode() > v1::DECODE_MODE_TRACE)
    return absl::InvalidArgumentError(
        absl::StrCat("unknown mode ", static_cast<int>(req.mode()),
                     "; expected 0 (sparse), 1 sparse, 2 dense or 3 trace"));
  o.mode = req.mode() == v1::DECODE_MODE_DENSE   ? Mode::kDense
           : req.mode() == v1::DECODE_MODE_TRACE ? Mode::kTrace
                                                 : Mode::kSparse;
  if (req.policy() < 0 || req.policy() > static_cast<int>(indexer::Policy::kModelQuery))
    return absl::InvalidArgumentError(
        absl::StrCat("unknown policy ", static_cast<int>(req.policy())));
  o.policy = static_cast<indexer::Policy>(req.policy());
  o.budget = req.budget() == 0.0f ? 0.1f : req.budget();
  o.max_pages = req.max_pages();
  o.tau = req.tau();
  o.switch_lag = req.switch_lag();
  o.level2_topk = req.level2_topk();
  o.trace_name = req.trace_path();
  o.max_tokens = req.max_tokens();
  o.resume = req.resume();
  o.miss_ratio = req.miss_ratio();
  o.oracle_page_mass.assign(req.oracle_page_mass().begin(), req.oracle_page_mass().end());
  return o;
}

}  // namespace fm::decode
