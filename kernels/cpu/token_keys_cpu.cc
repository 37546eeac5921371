// TokenKeyLogits (flashmemory/kernels/indexer.h): the model's own query against index keys
// that hold the model's own K. Per block of 32 chunks the fp8 rows are decoded once, then
// every query head accumulates over its KV head's dims for the 32 chunks of each token slot
// at a time (the inner loop runs over the block's 32 lanes and vectorizes).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/codecs.h"
#include "flashmemory/kernels/indexer.h"

namespace fm::kernels {

KernelStatus TokenKeyLogits(const TokenKeyShape& s, uint32_t key_dim, const float* q,
                            const uint8_t* blocks, uint64_t chunks, float* logits) {
  if (s.kv_heads == 0 || s.q_heads % s.kv_heads != 0 || s.tokens == 0 || s.head_dim == 0 ||
      s.dim() != key_dim)
    return KernelStatus::kInvalidShape;
  const uint32_t dim = key_dim, group = s.q_heads / s.kv_heads, T = s.tokens;
  const uint64_t history = chunks * T;
  std::vector<float> row(size_t{dim} * kKeyBlock);
  float acc[kKeyBlock];
  for (uint64_t b0 = 0; b0 < chunks; b0 += kKeyBlock) {
    const uint8_t* blk = blocks + (b0 / kKeyBlock) * KeyBlockBytes(dim);
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(kKeyBlock, chunks - b0));
    float scales[kKeyBlock];
    std::memcpy(scales, blk + size_t{dim} * kKeyBlock, sizeof(scales));
    Fp8E4m3ToFloatN(blk, row.data(), row.size());
    for (uint32_t h = 0; h < s.q_heads; ++h) {
      const float* qh = q + size_t{h} * s.head_dim;
      const uint32_t g = h / group;
      for (uint32_t t = 0; t < T; ++t) {
        const float* r = row.data() + (size_t{t} * s.kv_heads + g) * s.head_dim * kKeyBlock;
        for (uint32_t j = 0; j < kKeyBlock; ++j) acc[j] = 0;
        for (uint32_t i = 0; i < s.head_dim; ++i) {
          const float qi = qh[i];
          const float* ri = r + size_t{i} * kKeyBlock;
          for (uint32_t j = 0; j < kKeyBlock; ++j) acc[j] += qi * ri[j];
        }
        float* out = logits + size_t{h} * history;
        for (uint32_t j = 0; j < n; ++j) out[(b0 + j) * T + t] = acc[j] * scales[j] * s.scale;
      }
    }
  }
  return KernelStatus::kOk;
}

}  // namespace fm::kernels
