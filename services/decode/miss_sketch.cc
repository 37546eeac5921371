#include "services/decode/miss_sketch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/codecs.h"
#include "flashmemory/kernels/rows.h"

namespace fm::decode {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// acc[0..n) += row[0..n)^2.
inline void AddSquares(float* __restrict acc, const float* __restrict row, uint32_t n) {
  uint32_t t = 0;
  for (; t + 16 <= n; t += 16)
    for (uint32_t u = 0; u < 16; ++u) acc[t + u] += row[t + u] * row[t + u];
  for (; t < n; ++t) acc[t] += row[t] * row[t];
}

// Folds one head's logits into `best` (max over heads of log(sum exp(logits)) - lse_h):
// skipped when the head's best logit `mx` + log(n) cannot beat max(margin, best).
inline void FoldHead(const float* lg, uint32_t n, float mx, float lse, float margin, float* best) {
  if (mx + std::log(float(n)) - lse <= std::max(margin, *best)) return;  // cannot win
  float z = 0;
  for (uint32_t t = 0; t < n; ++t) z += std::exp(lg[t] - mx);
  *best = std::max(*best, mx + std::log(z) - lse);
}

float Dot(const float* a, const float* b, uint32_t n) {
  float s = 0;
  for (uint32_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

void DecodePageKeys(const ModelSpec& sp, const uint8_t* page_keys, float* out, float* chunk) {
  const uint32_t d = sp.head_dim, di = sp.index_dim, ct = sp.chunk_tokens, hkv = sp.kv_heads;
  const uint32_t P = sp.page_tokens;
  const size_t kb = sp.IndexKeyBytes();
  float* k = chunk;
  for (uint64_t c = 0; c < sp.ChunksPerPage(); ++c) {
    const uint8_t* key = page_keys + c * kb;
    float scale;
    std::memcpy(&scale, key + di, 4);
    Fp8E4m3ToFloatN(key, k, di);
    for (uint32_t t = 0; t < ct; ++t)
      for (uint32_t kv = 0; kv < hkv; ++kv) {
        const float* src = k + (size_t{t} * hkv + kv) * d;
        float* dst = out + size_t{kv} * d * P + c * ct + t;
        for (uint32_t j = 0; j < d; ++j) dst[size_t{j} * P] = src[j] * scale;
      }
  }
}

float ExactPageMass(const ModelSpec& sp, const float* q, const float* lse,
                    const uint8_t* page_keys, float margin, std::vector<float>* scratch) {
  const uint32_t d = sp.head_dim, group = sp.q_heads / sp.kv_heads, P = sp.page_tokens;
  const size_t key_floats = size_t{sp.kv_heads} * d * P;
  scratch->resize(key_floats + P + d + sp.index_dim);
  float* kt = scratch->data();        // [kv head][dim][token]
  float* lg = kt + key_floats;        // one head's logits
  float* qs = lg + P;                 // one head's scaled query
  DecodePageKeys(sp, page_keys, kt, qs + d);  // one chunk's keys go after the query
  const float s = sp.Scale();
  float best = kNegInf;
  for (uint32_t h = 0; h < sp.q_heads; ++h) {
    for (uint32_t j = 0; j < d; ++j) qs[j] = q[size_t{h} * d + j] * s;
    const float mx =
        kernels::CombineRows(kt + size_t{h / group} * d * P, P, qs, d, 0.0f, P, lg);
    FoldHead(lg, P, mx, lse[h], margin, &best);
  }
  return best;
}

void KeySketch::Sync(const ModelSpec& sp, const std::vector<uint8_t>& keys) {
  const uint64_t page_bytes = sp.ChunksPerPage() * sp.IndexKeyBytes();
  const uint64_t have = keys.size() / page_bytes;
  if (have == 0 || have == pages_) return;
  if (pages_ == 0 || (have >= 2 * basis_pages_ && basis_pages_ < kSettledPages)) {
    Rebuild(sp, keys, have);
    return;
  }
  std::vector<float> scratch;
  for (uint64_t p = pages_; p < have; ++p) Append(sp, keys.data() + p * page_bytes, &scratch);
}

void KeySketch::Rebuild(const ModelSpec& sp, const std::vector<uint8_t>& keys, uint64_t pages) {
  d_ = sp.head_dim;
  hkv_ = sp.kv_heads;
  tokens_ = sp.page_tokens;
  rank_ = std::min(rank_, d_);
  const uint64_t page_bytes = sp.ChunksPerPage() * sp.IndexKeyBytes();
  const size_t page_floats = size_t{hkv_} * d_ * tokens_;
  // The mean and covariance of each KV head's keys over up to 64 pages spread evenly.
  const uint64_t sample = std::min<uint64_t>(pages, 64);
  std::vector<float> kt(page_floats), scratch(sp.index_dim);
  std::vector<double> sum(size_t{hkv_} * d_, 0.0), cov(size_t{hkv_} * d_ * d_, 0.0);
  for (uint64_t i = 0; i < sample; ++i) {
    const uint64_t p = i * pages / sample;
    DecodePageKeys(sp, keys.data() + p * page_bytes, kt.data(), scratch.data());
    for (uint32_t kv = 0; kv < hkv_; ++kv) {
      const float* kh = kt.data() + size_t{kv} * d_ * tokens_;
      double* s = sum.data() + size_t{kv} * d_;
      double* c = cov.data() + size_t{kv} * d_ * d_;
      for (uint32_t t = 0; t < tokens_; ++t)
        for (uint32_t a = 0; a < d_; ++a) {
          const double xa = kh[size_t{a} * tokens_ + t];
          s[a] += xa;
          for (uint32_t b = 0; b <= a; ++b) c[size_t{a} * d_ + b] += xa * kh[size_t{b} * tokens_ + t];
        }
    }
  }
  const double n = double(sample) * tokens_;
  mean_.assign(size_t{hkv_} * d_, 0.0f);
  basis_.assign(size_t{hkv_} * rank_ * d_, 0.0f);
  for (uint32_t kv = 0; kv < hkv_; ++kv) {
    const double* s = sum.data() + size_t{kv} * d_;
    double* c = cov.data() + size_t{kv} * d_ * d_;
    for (uint32_t a = 0; a < d_; ++a) {
      mean_[size_t{kv} * d_ + a] = static_cast<float>(s[a] / n);
      for (uint32_t b = 0; b <= a; ++b) {
        c[size_t{a} * d_ + b] = c[size_t{a} * d_ + b] / n - (s[a] / n) * (s[b] / n);
        c[size_t{b} * d_ + a] = c[size_t{a} * d_ + b];
      }
    }
    // The top `rank` eigenvectors by orthogonal iteration from the unit axes of the largest
    // variances. The bound holds for any orthonormal basis; this only makes it tight.
    std::vector<uint32_t> axes(d_);
    for (uint32_t a = 0; a < d_; ++a) axes[a] = a;
    std::stable_sort(axes.begin(), axes.end(), [&](uint32_t x, uint32_t y) {
      return c[size_t{x} * d_ + x] > c[size_t{y} * d_ + y];
    });
    std::vector<double> v(size_t{rank_} * d_, 0.0), w(size_t{rank_} * d_);
    for (uint32_t r = 0; r < rank_; ++r) v[size_t{r} * d_ + axes[r]] = 1.0;
    auto orthonormalize = [&](std::vector<double>& m) {
      for (uint32_t r = 0; r < rank_; ++r) {
        double* row = m.data() + size_t{r} * d_;
        for (int pass = 0; pass < 2; ++pass)
          for (uint32_t o = 0; o < r; ++o) {
            const double* prev = m.data() + size_t{o} * d_;
            double dot = 0;
            for (uint32_t a = 0; a < d_; ++a) dot += row[a] * prev[a];
            for (uint32_t a = 0; a < d_; ++a) row[a] -= dot * prev[a];
          }
        double norm = 0;
        for (uint32_t a = 0; a < d_; ++a) norm += row[a] * row[a];
        norm = std::sqrt(norm);
        if (norm < 1e-12) {  // degenerate keys: any unit axis outside the rows so far
          for (uint32_t e = 0; e < d_ && norm < 0.5; ++e) {
            std::fill(row, row + d_, 0.0);
            row[axes[e]] = 1.0;
            for (uint32_t o = 0; o < r; ++o) {
              const double* prev = m.data() + size_t{o} * d_;
              double dot = 0;
              for (uint32_t a = 0; a < d_; ++a) dot += row[a] * prev[a];
              for (uint32_t a = 0; a < d_; ++a) row[a] -= dot * prev[a];
            }
            norm = 0;
            for (uint32_t a = 0; a < d_; ++a) norm += row[a] * row[a];
            norm = std::sqrt(norm);
          }
        }
        for (uint32_t a = 0; a < d_; ++a) row[a] /= norm;
      }
    };
    for (int it = 0; it < 40; ++it) {
      for (uint32_t r = 0; r < rank_; ++r)
        for (uint32_t a = 0; a < d_; ++a) {
          double acc = 0;
          for (uint32_t b = 0; b < d_; ++b) acc += c[size_t{a} * d_ + b] * v[size_t{r} * d_ + b];
          w[size_t{r} * d_ + a] = acc;
        }
      orthonormalize(w);
      v.swap(w);
    }
    for (size_t i = 0; i < v.size(); ++i)
      basis_[size_t{kv} * rank_ * d_ + i] = static_cast<float>(v[i]);
  }
  basis_pages_ = pages;
  pages_ = 0;
  max_norm_ = 0;
  coords_.clear();
  coords_.reserve(pages * hkv_ * (rank_ + 1) * tokens_);
  for (uint64_t p = 0; p < pages; ++p) Append(sp, keys.data() + p * page_bytes, &scratch);
}

void KeySketch::Append(const ModelSpec& sp, const uint8_t* page_keys, std::vector<float>* scratch) {
  const uint32_t P = tokens_;
  std::vector<float> kt(size_t{hkv_} * d_ * P), sq(P);
  scratch->resize(sp.index_dim);
  DecodePageKeys(sp, page_keys, kt.data(), scratch->data());
  const size_t at = coords_.size();
  coords_.resize(at + size_t{hkv_} * (rank_ + 1) * P);
  for (uint32_t kv = 0; kv < hkv_; ++kv) {
    float* x = kt.data() + size_t{kv} * d_ * P;  // [d][token], made k - m, then the residual
    const float* m = mean_.data() + size_t{kv} * d_;
    const float* b = basis_.data() + size_t{kv} * rank_ * d_;
    float* out = coords_.data() + at + size_t{kv} * (rank_ + 1) * P;
    std::fill(sq.begin(), sq.end(), 0.0f);
    for (uint32_t a = 0; a < d_; ++a) {
      float* row = x + size_t{a} * P;
      for (uint32_t t = 0; t < P; ++t) row[t] -= m[a];
      AddSquares(sq.data(), row, P);
    }
    const float mnorm = std::sqrt(Dot(m, m, d_));
    for (uint32_t t = 0; t < P; ++t) max_norm_ = std::max(max_norm_, mnorm + std::sqrt(sq[t]));
    // c_r = B_r . x over the page's tokens, then x -= B^T c, one dimension's row at a time.
    for (uint32_t r = 0; r < rank_; ++r)
      kernels::CombineRows(x, P, b + size_t{r} * d_, d_, 0.0f, P, out + size_t{r} * P);
    std::vector<float> col(rank_), fix(P);
    for (uint32_t a = 0; a < d_; ++a) {
      for (uint32_t r = 0; r < rank_; ++r) col[r] = -b[size_t{r} * d_ + a];
      kernels::CombineRows(out, P, col.data(), rank_, 0.0f, P, fix.data());
      float* row = x + size_t{a} * P;
      for (uint32_t t = 0; t < P; ++t) row[t] += fix[t];
    }
    // What the basis leaves out, rounded up so that rounding cannot make the bound smaller
    // than the exact score (which reads the same decoded keys).
    float* n = out + size_t{rank_} * P;
    std::fill(n, n + P, 0.0f);
    for (uint32_t a = 0; a < d_; ++a) AddSquares(n, x + size_t{a} * P, P);
    for (uint32_t t = 0; t < P; ++t) n[t] = std::sqrt(n[t]) * 1.0001f + 1e-6f;
  }
  ++pages_;
}

KeySketch::Query KeySketch::Project(const ModelSpec& sp, const float* q) const {
  const uint32_t group = sp.q_heads / sp.kv_heads;
  Query out;
  out.qr.resize(size_t{sp.q_heads} * rank_);
  out.qm.resize(sp.q_heads);
  out.qperp.resize(sp.q_heads);
  out.qnorm.resize(sp.q_heads);
  std::vector<float> rest(d_);
  for (uint32_t h = 0; h < sp.q_heads; ++h) {
    const uint32_t kv = h / group;
    const float* qh = q + size_t{h} * d_;
    const float* b = basis_.data() + size_t{kv} * rank_ * d_;
    out.qm[h] = Dot(qh, mean_.data() + size_t{kv} * d_, d_);
    out.qnorm[h] = std::sqrt(Dot(qh, qh, d_));
    std::copy(qh, qh + d_, rest.begin());
    for (uint32_t r = 0; r < rank_; ++r) {
      const float c = Dot(b + size_t{r} * d_, qh, d_);
      out.qr[size_t{h} * rank_ + r] = c;
      for (uint32_t a = 0; a < d_; ++a) rest[a] -= c * b[size_t{r} * d_ + a];
    }
    out.qperp[h] = std::sqrt(Dot(rest.data(), rest.data(), d_)) * 1.0001f;
  }
  return out;
}

float KeySketch::PageBound(const ModelSpec& sp, const Query& q, const float* lse, uint64_t p,
                           float margin, std::vector<float>* scratch) const {
  const uint32_t group = sp.q_heads / sp.kv_heads, P = tokens_, R = rank_;
  const float s = sp.Scale();
  scratch->resize(P + R + 1);
  float* lg = scratch->data();
  float* coef = lg + P;  // the head's B q, then |q - B^T B q|, scaled
  const float* page = coords_.data() + p * hkv_ * (R + 1) * P;
  float best = kNegInf;
  for (uint32_t h = 0; h < sp.q_heads; ++h) {
    for (uint32_t r = 0; r < R; ++r) coef[r] = q.qr[size_t{h} * R + r] * s;
    coef[R] = q.qperp[h] * s;
    // Rounding of the sums: a thousandth of a logit plus 1e-5 of the largest |q . k|.
    const float base = q.qm[h] * s + 1e-3f + 1e-5f * s * q.qnorm[h] * max_norm_;
    const float mx =
        kernels::CombineRows(page + size_t{h / group} * (R + 1) * P, P, coef, R + 1, base, P, lg);
    FoldHead(lg, P, mx, lse[h], margin, &best);
  }
  return best;
}

}  // namespace fm::decode
