// Scalar reference of paged decode attention: plain loops in float, two passes (max, then
// exp-sum), no tiling. The ground truth the SIMD and CUDA kernels are tested against.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/reference/elem.h"
#include "flashmemory/kernels/attention.h"

namespace fm::kernels::reference {

KernelStatus PagedDecode(const AttentionShape& shape, const PagePool& pool, const PageList& pages,
                         uint32_t layer, const float* q, float* out, float* lse) {
  std::string why;
  KernelStatus st = shape.Validate(&why);
  if (st != KernelStatus::kOk) return st;
  if (pages.count == 0) return KernelStatus::kEmptyPageList;
  if (layer >= shape.layers) return KernelStatus::kInvalidShape;
  const uint32_t g = shape.q_heads / shape.kv_heads, d = shape.head_dim;
  const float scale = shape.Scale();
  for (uint32_t h = 0; h < shape.q_heads; ++h) {
    const uint32_t kvh = h / g;
    std::vector<float> scores;
    std::vector<std::pair<const uint8_t*, uint32_t>> vrows;  // (V block, token)
    for (uint32_t i = 0; i < pages.count; ++i) {
      if (pages.cells[i] >= pool.num_cells || pages.valid[i] == 0 ||
          pages.valid[i] > shape.page_tokens)
        return KernelStatus::kBadPageIndex;
      const uint8_t* cell = pool.base + pages.cells[i] * pool.cell_stride + pool.cell_offset;
      const uint8_t* kb = cell + shape.BlockElemOffset(layer, 0, kvh) * ElemSize(shape.dtype);
      const uint8_t* vb = cell + shape.BlockElemOffset(layer, 1, kvh) * ElemSize(shape.dtype);
      for (uint32_t t = 0; t < pages.valid[i]; ++t) {
        float dot = 0;
        for (uint32_t j = 0; j < d; ++j)
          dot += q[h * d + j] * LoadElem(shape.dtype, kb, size_t{t} * d + j);
        scores.push_back(dot * scale);
        vrows.push_back({vb, t});
      }
    }
    float m = -std::numeric_limits<float>::infinity();
    for (float s : scores) m = std::max(m, s);
    float sum = 0;
    for (float& s : scores) sum += (s = std::exp(s - m));
    for (uint32_t j = 0; j < d; ++j) {
      float acc = 0;
      for (size_t r = 0; r < scores.size(); ++r)
        acc += scores[r] * LoadElem(shape.dtype, vrows[r].first, size_t{vrows[r].second} * d + j);
      out[h * d + j] = acc / sum;
    }
    if (lse) lse[h] = m + std::log(sum);
  }
  return KernelStatus::kOk;
}

}  // namespace fm::kernels::reference
