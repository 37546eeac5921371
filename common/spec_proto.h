// ModelSpec <-> flashmemory.v1.ModelSpec, for every service that takes a spec on the wire.
#pragma once

#include "common/model_spec.h"
#include "flashmemory/v1/common.pb.h"

namespace fm {

// Zero page_tokens / chunk_tokens mean the defaults (64 / 4); the result is not validated.
ModelSpec SpecFromProto(const flashmemory::v1::ModelSpec& p);
void SpecToProto(const ModelSpec& s, flashmemory::v1::ModelSpec* p);

}  // namespace fm
