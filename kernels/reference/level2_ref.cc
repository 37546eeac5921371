// Scalar reference of level-2 top-k decode.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/reference/elem.h"
#include "flashmemory/kernels/level2.h"

namespace fm::kernels::reference {

KernelStatus TopKDecode(const AttentionShape& s, const PagePool& pool, const PageList& pages,
                        uint32_t layer, uint32_t topk, const float* q, float* out, float* lse) {
  if (s.Validate(nullptr) != KernelStatus::kOk || layer >= s.layers)
    return KernelStatus::kInvalidShape;
  if (topk == 0 || topk > kMaxLevel2TopK) return KernelStatus::kInvalidShape;
  if (pages.count == 0) return KernelStatus::kEmptyPageList;
  const uint32_t d = s.head_dim, g = s.q_heads / s.kv_heads;
  const float scale = s.Scale();
  struct Tok {
    const uint8_t* k;
    const uint8_t* v;
    uint32_t t;
  };
  for (uint32_t kvh = 0; kvh < s.kv_heads; ++kvh) {
    std::vector<Tok> toks;
    for (uint32_t i = 0; i < pages.count; ++i) {
      if (pages.cells[i] >= pool.num_cells || pages.valid[i] == 0 || pages.valid[i] > s.page_tokens)
        return KernelStatus::kBadPageIndex;
      const uint8_t* cell =
          pool.base + size_t{pages.cells[i]} * pool.cell_stride + pool.cell_offset;
      for (uint32_t t = 0; t < pages.valid[i]; ++t)
        toks.push_back({cell + s.BlockElemOffset(layer, 0, kvh) * ElemSize(s.dtype),
                        cell + s.BlockElemOffset(layer, 1, kvh) * ElemSize(s.dtype), t});
    }
    // scores[h][i] for the group's heads; token score = max over heads.
    std::vector<std::vector<float>> sc(g, std::vector<float>(toks.size()));
    std::vector<float> best(toks.size(), -std::numeric_limits<float>::infinity());
    for (uint32_t hh = 0; hh < g; ++hh)
      for (size_t i = 0; i < toks.size(); ++i) {
        float dot = 0;
        for (uint32_t j = 0; j < d; ++j)
          dot +=
              q[size_t{kvh * g + hh} * d + j] * LoadElem(s.dtype, toks[i].k, size_t{toks[i].t} * d + j);
        sc[hh][i] = dot * scale;
        best[i] = std::max(best[i], sc[hh][i]);
      }
    std::vector<size_t> order(toks.size());
    std::iota(order.begin(), order.end(), 0);
    const size_t k = std::min<size_t>(topk, toks.size());
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](size_t a, size_t b) {
      return best[a] != best[b] ? best[a] > best[b] : a < b;
    });
    order.resize(k);
    for (uint32_t hh = 0; hh < g; ++hh) {
      const uint32_t h = kvh * g + hh;
      float m = -std::numeric_limits<float>::infinity();
      for (size_t i : order) m = std::max(m, sc[hh][i]);
      float sum = 0;
      std::vector<float> p(k);
      for (size_t r = 0; r < k; ++r) sum += (p[r] = std::exp(sc[hh][order[r]] - m));
      for (uint32_t j = 0; j < d; ++j) {
        float acc = 0;
        for (size_t r = 0; r < k; ++r)
          acc += p[r] * LoadElem(s.dtype, toks[order[r]].v, size_t{toks[order[r]].t} * d + j);
        out[size_t{h} * d + j] = acc / sum;
      }
      if (lse) lse[h] = m + std::log(sum);
    }
  }
  return KernelStatus::kOk;
}

}  // namespace fm::kernels::reference
