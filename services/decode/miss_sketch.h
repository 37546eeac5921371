// The session miss check's scoring of pages that are not resident, for sessions whose index
// keys hold the model's own K ([chunk][token][kv head][head dim], fp8; policy model_query):
//
//   1. a low-rank sketch of each token's key (KeySketch) bounds the page's attention mass
//      from above at about a third of the cost of scoring it, so that almost every page is
//      ruled out without its keys;
//   2. the few it cannot rule out are scored exactly from their stored keys (ExactPageMass).
//
// Both answer in the same unit: max over query heads of log(sum over the page's tokens of
// exp(scale q_h . k_t)) - lse_h, where lse_h is the head's log-sum-exp over the resident
// pages. A page is a miss when that exceeds log(miss_ratio).
#pragma once

#include <cstdint>
#include <vector>

#include "common/model_spec.h"

namespace fm::decode {

// The page's keys from its stored index keys (ChunksPerPage chunks of IndexKeyBytes each),
// decoded and scaled, laid out [kv head][dim][token] (`out` holds kv_heads * head_dim *
// page_tokens floats): each query dimension then adds one row over the page's tokens.
// `chunk` holds index_dim floats of room.
void DecodePageKeys(const ModelSpec& sp, const uint8_t* page_keys, float* out, float* chunk);

// The page's exact log-mass against `lse` (see above) from its stored keys; -inf as soon
// as no head can exceed `margin` (a head's log-mass is at most its best token's logit +
// log(page_tokens)). `scratch` is reused between calls.
float ExactPageMass(const ModelSpec& sp, const float* q, const float* lse,
                    const uint8_t* page_keys, float margin, std::vector<float>* scratch);

// A rank-r sketch of one index layer's keys: per KV head a mean m and an orthonormal basis
// B (r x d, the keys' top principal directions), and per token its coordinates c = B(k - m)
// and the norm of what the basis leaves out, n = |k - m - B^T c|. Then, exactly,
//
//   q . k = q . m + (Bq) . c + q . (k - m - B^T c) <= q . m + (Bq) . c + |q - B^T B q| n,
//
// a bound that holds for any basis and is tight when the keys are close to a rank-r space
// (trained models' keys are: on the zoo's models at 64K, rank 8 of head_dim 32 leaves 0.1-
// 0.3 % of the pages for the exact score, against 98 % for the pages' Quest boxes).
// 9 multiply-adds per token and head instead of 32, with no fp8 decoding.
//
// The basis comes from the keys sketched first and is rebuilt from all keys whenever their
// count has doubled, until it was made from kSettledPages pages (16K tokens of 64-token
// pages: a session decoding far past a short prefill); a stale basis only loosens the
// bound, and a long session never pays a rebuild of its whole history in one step.
// 36 bytes per token and KV head at rank 8.
class KeySketch {
 public:
  static constexpr uint32_t kDefaultRank = 8;
  static constexpr uint64_t kSettledPages = 256;

  explicit KeySketch(uint32_t rank = kDefaultRank) : rank_(rank) {}

  // Sketches the whole pages of `keys` (the layer's stored index keys from chunk 0 on) that
  // it has not yet; rebuilds the basis when their count has doubled since it was made (and
  // it was made from fewer than kSettledPages).
  void Sync(const ModelSpec& sp, const std::vector<uint8_t>& keys);
  uint64_t pages() const { return pages_; }
  uint64_t basis_pages() const { return basis_pages_; }  // the pages its basis came from
  uint32_t rank() const { return rank_; }

  // The query's projections, per query head: B q, q . m, |q - B^T B q| and |q|.
  struct Query {
    std::vector<float> qr, qm, qperp, qnorm;
  };
  Query Project(const ModelSpec& sp, const float* q) const;

  // An upper bound of page p's log-mass against `lse` (page p < pages()); as soon as it
  // shows no head can exceed `margin`, -inf.
  float PageBound(const ModelSpec& sp, const Query& q, const float* lse, uint64_t p,
                  float margin, std::vector<float>* scratch) const;

 private:
  void Rebuild(const ModelSpec& sp, const std::vector<uint8_t>& keys, uint64_t pages);
  void Append(const ModelSpec& sp, const uint8_t* page_keys, std::vector<float>* scratch);

  uint32_t rank_;
  uint32_t d_ = 0, hkv_ = 0, tokens_ = 0;
  uint64_t pages_ = 0, basis_pages_ = 0;
  float max_norm_ = 0;  // the largest |k| sketched (the rounding slack's scale)
  std::vector<float> mean_;    // [kv head][d]
  std::vector<float> basis_;   // [kv head][rank][d], orthonormal rows
  std::vector<float> coords_;  // [page][kv head][rank + 1][token]: coordinates, then n
};

}  // namespace fm::decode
