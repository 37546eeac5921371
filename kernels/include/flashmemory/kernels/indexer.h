// Neural Memory Indexer kernels (DESIGN §3): the query tower, chunk scoring over compressed
// fp8-e4m3 keys, and page selection. The trainer (PyTorch) implements the same arithmetic;
// parity is tested on shared traces.
//
// Per index layer l:
//   a  = W_a . h                                  [rank]
//   n  = a / sqrt(mean(a^2) + eps) * g            RMSNorm with weight g
//   qv = W_b . n, reshaped [Hi][di]
//   qv = RoPE_yarn(qv, position) on the last rope_dims dims of each head (NeoX half split)
//   q  = H qv / sqrt(di)                          normalized Walsh-Hadamard per head
//   w  = (W_w . h) * di^-1/2 * Hi^-1/2            [Hi]
//   k_c = fp8_e4m3(bytes[0:di]) * fp32(bytes[di:di+4])
//   logit_l(c) = sum_h w_h * relu(q_h . k_c)
//   score(c) = max_l sigmoid(logit_l(c))          (or the mean over layers)
// Selection: chunks with score > theta are kept; a page's score is its number of kept
// chunks; the resident set is sink + tail + the top-kmax other pages by page score (ties by
// the page's best chunk score, then by the higher page number).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "flashmemory/kernels/attention.h"

namespace fm::kernels {

struct IndexerShape {
  uint32_t layers = 3;                    // Li
  uint32_t heads = 16;                    // Hi
  uint32_t dim = 128;                     // di: a power of two in [64, 1024]
  uint32_t hidden = 0;                    // model hidden size fed to the tower; 0 = tower unused
  uint32_t rank = 0;                      // W_a output size
  uint32_t rope_dims = 64;                // rotated dims at the end of each head (even, <= dim)
  float rope_theta = 10000.0f;            // RoPE base
  float yarn_factor = 1.0f;               // YaRN context extension factor s (1 = plain RoPE)
  uint32_t yarn_original_context = 4096;  // L0
  float yarn_beta_fast = 32.0f, yarn_beta_slow = 1.0f;
  float rms_eps = 1e-6f;

  size_t KeyBytes() const { return size_t{dim} + 4; }
  KernelStatus Validate(std::string* why) const;
};

// Weights of one index layer, fp32 row-major.
struct IndexerLayerWeights {
  const float* w_a = nullptr;  // [rank][hidden]
  const float* g = nullptr;    // [rank]
  const float* w_b = nullptr;  // [heads * dim][rank]
  const float* w_w = nullptr;  // [heads][hidden]
};

// q [heads][dim] and w [heads] of one layer for hidden state h at token position `pos`.
KernelStatus IndexerQuery(const IndexerShape& s, const IndexerLayerWeights& wts, const float* h,
                          uint64_t pos, float* q, float* w);

// The positional and mixing transform the tower applies to each head of q, for keys: RoPE
// (YaRN) at token position `pos` on the last rope_dims dims, then the normalized
// Walsh-Hadamard transform, in place on v [dim]. Keys get it at their chunk's first token
// before compression, so that q . k keeps the raw dot product of the unrotated dims.
void RotateIndexVector(const IndexerShape& s, uint64_t pos, float* v);

// Compresses a raw key [dim] to the stored format: scale = max|k| / 448 (1 when k is all
// zero), fp8 = e4m3(k / scale) with round-to-nearest-even.
void CompressIndexKey(uint32_t dim, const float* k, uint8_t* out);

// logits[l * chunks + c] for every layer l and chunk c. keys[l] holds `chunks` keys of
// KeyBytes() each. Parallel on the kernel thread pool.
KernelStatus ScoreChunks(const IndexerShape& s, const float* q, const float* w,
                         const uint8_t* const* keys, uint64_t chunks, float* logits);

// The scan layout of index keys: blocks of kKeyBlock chunks, each block holding [dim][32]
// fp8 bytes (dimension-major: one 32-byte row is one dimension of 32 chunks) followed by
// [32] fp32 scales. It holds exactly the bytes of 32 stored keys; a scan loads one row per
// dimension instead of reducing across lanes. Unfilled slots of the last block have scale 0.
inline constexpr uint32_t kKeyBlock = 32;
inline size_t KeyBlockBytes(uint32_t dim) { return (size_t{dim} + 4) * kKeyBlock; }
inline size_t KeyBlocksBytes(uint32_t dim, uint64_t chunks) {
  return KeyBlockBytes(dim) * ((chunks + kKeyBlock - 1) / kKeyBlock);
}

// Writes n stored keys (KeyBytes() each, chunk after chunk) as chunks [first, first + n) of
// a blocked array of KeyBlocksBytes(dim, first + n) bytes or more.
void PackIndexKeys(uint32_t dim, const uint8_t* keys, uint64_t first, uint64_t n,
                   uint8_t* blocks);
// Reads chunk c of a blocked array back as one stored key.
void UnpackIndexKey(uint32_t dim, const uint8_t* blocks, uint64_t c, uint8_t* key);

// Arithmetic of the blocked scan. kExact: fp32 products and sums (the reference's
// arithmetic up to summation order). kFast: on CPUs with AVX512-FP16, q rounded to fp16 and
// products summed in fp16 over spans of up to 128 dimensions, in fp32 across spans and heads
// (error within 5e-4 of sum_h |w_h| |q_h| |k|, about 2e-4 measured); else, on AVX-512 CPUs
// with VNNI and VBMI, q per head scaled to 13-bit integers and key values to multiples of
// 1/16 of their scaled fp8 value (exact for |v| >= 1/2), products summed exactly in int32
// over 32 dimensions (about 2e-5 measured, for keys as CompressIndexKey writes them);
// elsewhere kExact.
enum class ScoreMath : uint8_t { kExact = 0, kFast = 1 };

// ScoreChunks over blocked keys: blocks[l] holds `chunks` chunks of layer l.
KernelStatus ScoreKeyBlocks(const IndexerShape& s, const float* q, const float* w,
                            const uint8_t* const* blocks, uint64_t chunks, ScoreMath math,
                            float* logits);
// Which code path ScoreKeyBlocks takes for `math` on this CPU ("avx512fp16", "avx512vnni",
// "avx512vbmi" or a Highway target name).
std::string ScoreKeyBlocksPath(ScoreMath math);

// Index keys that hold the model's own K (policy model_query; docs/own-model.md): chunk c's
// key is [token][kv_head][head_dim] of its `tokens` tokens, so dim = tokens * kv_heads *
// head_dim, compressed as one stored key (fp8 + one scale). With the model's own decode
// query q [q_heads][head_dim] (already scaled as the model scales it), the logit of query
// head h on token t of the history is exactly the model's attention logit, up to the fp8
// rounding of K:   logit(h, t) = scale * q_h . k_{t, h / (q_heads / kv_heads)}
struct TokenKeyShape {
  uint32_t tokens = 4;  // tokens per chunk
  uint32_t kv_heads = 1, q_heads = 1, head_dim = 64;
  float scale = 0.125f;  // softmax scale (the spec's)
  uint32_t dim() const { return tokens * kv_heads * head_dim; }
};
// logits[h * chunks * tokens + t] for every query head h and history token t < chunks *
// tokens, over blocked keys (the scan layout). kInvalidShape when q_heads is not a multiple
// of kv_heads or dim() is not a stored key's size.
KernelStatus TokenKeyLogits(const TokenKeyShape& s, uint32_t key_dim, const float* q,
                            const uint8_t* blocks, uint64_t chunks, float* logits);

enum class LayerCombine : uint8_t { kMax = 0, kMean = 1 };

struct SelectParams {
  uint32_t chunk_tokens = 4;
  uint32_t page_tokens = 64;
  uint64_t total_pages = 0;  // pages in the history (the last may be partial)
  float theta = 0.5f;
  uint32_t kmax = 0;  // pages beyond sink and tail
  uint32_t sink = 1, tail = 2;
  LayerCombine combine = LayerCombine::kMax;
  // Share of kmax given first to the pages with the best single chunk (a lone sharply
  // wanted chunk — a needle — loses to topic pages in the kept-count order); the rest by
  // kept count as above. 0 = kept count only (DESIGN §3).
  float best_share = 0.0f;
};

struct ScoredPageOut {
  uint64_t page;
  float score;  // kept-chunk count; a best-chunk quota page: chunks per page + its best
                // chunk's score (above every count: fetched first); sink and tail: +inf
};

// Combines layer logits, counts kept chunks per page and picks the resident set, ascending
// by page number: sink, tail, floor(kmax * best_share) pages by best chunk score (ties: kept
// count, then the newer page), then the rest by kept count (ties: best chunk score, then the
// newer page).
KernelStatus SelectPages(uint32_t layers, const float* logits, uint64_t chunks,
                         const SelectParams& p, std::vector<ScoredPageOut>* out);

namespace reference {
KernelStatus IndexerQuery(const IndexerShape& s, const IndexerLayerWeights& wts, const float* h,
                          uint64_t pos, float* q, float* w);
KernelStatus ScoreChunks(const IndexerShape& s, const float* q, const float* w,
                         const uint8_t* const* keys, uint64_t chunks, float* logits);
}  // namespace reference

}  // namespace fm::kernels
