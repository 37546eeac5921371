// Shape validation, planning and state merging shared by every backend.
#include <algorithm>
#include <cmath>
#include <limits>

#include "flashmemory/kernels/attention.h"

namespace fm::kernels {

size_t ElemSize(ElemType t) {
  switch (t) {
    case ElemType::kF32:
      return 4;
    case ElemType::kF16:
      return 2;
    case ElemType::kBf16:
      return 2;
  }
  return 0;
}

const char* KernelStatusName(KernelStatus s) {
  switch (s) {
    case KernelStatus::kOk:
      return "ok";
    case KernelStatus::kInvalidShape:
      return "invalid shape";
    case KernelStatus::kEmptyPageList:
      return "empty page list";
    case KernelStatus::kBadPageIndex:
      return "bad page index";
  }
  return "unknown";
}

float AttentionShape::Scale() const {
  return scale > 0 ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

KernelStatus AttentionShape::Validate(std::string* why) const {
  auto bad = [&](const char* m) {
    if (why) *why = m;
    return KernelStatus::kInvalidShape;
  };
  if (layers == 0) return bad("layers must be > 0");
  if (kv_heads == 0 || q_heads == 0 || q_heads % kv_heads != 0)
    return bad("q_heads must be a positive multiple of kv_heads");
  if (q_heads / kv_heads > 64) return bad("at most 64 query heads per KV head");
  if (head_dim < 32 || head_dim > 256 || head_dim % 16 != 0)
    return bad("head_dim must be a multiple of 16 in [32, 256]");
  if (page_tokens == 0 || page_tokens > 1024) return bad("page_tokens must be in [1, 1024]");
  if (ElemSize(dtype) == 0) return bad("dtype must be f32, f16 or bf16");
  if (!(scale >= 0) || !std::isfinite(scale)) return bad("scale must be finite and >= 0");
  return KernelStatus::kOk;
}

KernelStatus BuildDecodePlan(const AttentionShape& shape, const std::vector<PageList>& seqs,
                             const PagePool& pool, uint32_t num_threads,
                             uint32_t min_pages_per_unit, DecodePlan* plan, std::string* why) {
  KernelStatus st = shape.Validate(why);
  if (st != KernelStatus::kOk) return st;
  if (pool.base == nullptr || pool.cell_stride < pool.cell_offset + shape.PageBytes()) {
    if (why) *why = "page pool is null or its cells are smaller than a page";
    return KernelStatus::kInvalidShape;
  }
  uint64_t total = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const PageList& p = seqs[s];
    if (p.count == 0) {
      if (why) *why = "sequence " + std::to_string(s) + " attends to no page";
      return KernelStatus::kEmptyPageList;
    }
    for (uint32_t i = 0; i < p.count; ++i) {
      if (p.cells[i] >= pool.num_cells || p.valid[i] == 0 || p.valid[i] > shape.page_tokens) {
        if (why)
          *why = "sequence " + std::to_string(s) + " page " + std::to_string(i) +
                 ": cell or valid count out of range";
        return KernelStatus::kBadPageIndex;
      }
    }
    total += p.count;
  }
  plan->shape = shape;
  plan->seqs = seqs;
  plan->units.clear();
  plan->num_threads = std::max(1u, num_threads);
  // Aim for several units per thread so uneven sequences still balance.
  uint64_t work = total * shape.kv_heads;
  uint64_t target =
      std::max<uint64_t>(std::max(1u, min_pages_per_unit),
                         (work + plan->num_threads * 4 - 1) / (plan->num_threads * 4));
  uint32_t partials = 0;
  plan->seq_units.assign(1, 0);
  for (uint32_t s = 0; s < seqs.size(); ++s) {
    uint32_t n = seqs[s].count;
    uint32_t pieces = static_cast<uint32_t>(std::max<uint64_t>(1, (n + target - 1) / target));
    for (uint32_t h = 0; h < shape.kv_heads; ++h) {
      for (uint32_t k = 0; k < pieces; ++k) {
        uint32_t b = static_cast<uint32_t>(uint64_t{n} * k / pieces),
                 e = static_cast<uint32_t>(uint64_t{n} * (k + 1) / pieces);
        plan->units.push_back(
            {s, h, b, e, pieces == 1 ? -1 : static_cast<int32_t>(partials++), pieces});
      }
    }
    plan->seq_units.push_back(static_cast<uint32_t>(plan->units.size()));
  }
  plan->num_partials = partials;
  return KernelStatus::kOk;
}

void MergeAttentionStates(uint32_t heads, uint32_t d, const float* o_a, const float* lse_a,
                          const float* o_b, const float* lse_b, float* o, float* lse) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (uint32_t h = 0; h < heads; ++h) {
    float a = lse_a[h], b = lse_b[h];
    float m = std::max(a, b);
    float wa = a == ninf ? 0.0f : std::exp(a - m);
    float wb = b == ninf ? 0.0f : std::exp(b - m);
    float sum = wa + wb;
    if (sum == 0) {  // neither side saw a token
      for (uint32_t i = 0; i < d; ++i) o[h * d + i] = 0;
      lse[h] = ninf;
      continue;
    }
    wa /= sum;
    wb /= sum;
    for (uint32_t i = 0; i < d; ++i) o[h * d + i] = wa * o_a[h * d + i] + wb * o_b[h * d + i];
    lse[h] = m + std::log(sum);
  }
}

}  // namespace fm::kernels
