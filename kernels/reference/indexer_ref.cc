// Scalar reference of the indexer kernels: plain loops in float (double for the RoPE angle).
#include <cmath>
#include <cstring>

#include "common/codecs.h"
#include "flashmemory/kernels/indexer.h"

namespace fm::kernels {

KernelStatus IndexerShape::Validate(std::string* why) const {
  auto bad = [&](const char* m) {
    if (why) *why = m;
    return KernelStatus::kInvalidShape;
  };
  if (layers == 0 || layers > 16) return bad("index layers must be in [1, 16]");
  if (heads == 0 || heads > 256) return bad("index heads must be in [1, 256]");
  if (dim < 64 || dim > 1024 || (dim & (dim - 1)))
    return bad("index dim must be a power of two in [64, 1024]");
  if (rope_dims % 2 || rope_dims > dim) return bad("rope_dims must be even and <= dim");
  return KernelStatus::kOk;
}

namespace internal {

// YaRN-scaled inverse frequency of rotary pair i (of rope_dims / 2), and the attention
// temperature mscale applied to the rotated dims.
double YarnInvFreq(const IndexerShape& s, uint32_t i) {
  const double base = std::pow(double{s.rope_theta}, -2.0 * i / s.rope_dims);
  if (s.yarn_factor <= 1.0f) return base;
  const double wavelength = 2 * M_PI / base;
  const double rotations = s.yarn_original_context / wavelength;  // turns over the original context
  double ramp = (rotations - s.yarn_beta_slow) / (s.yarn_beta_fast - s.yarn_beta_slow);
  ramp = std::min(1.0, std::max(0.0, ramp));  // 1: high frequency, extrapolate; 0: interpolate
  return base * (ramp + (1 - ramp) / s.yarn_factor);
}

double YarnMscale(const IndexerShape& s) {
  return s.yarn_factor <= 1.0f ? 1.0 : 0.1 * std::log(s.yarn_factor) + 1.0;
}

void RopeAndHadamard(const IndexerShape& s, uint64_t pos, float* qh) {
  const uint32_t r0 = s.dim - s.rope_dims, half = s.rope_dims / 2;
  const double ms = YarnMscale(s);
  for (uint32_t i = 0; i < half; ++i) {
    const double ang = double(pos) * YarnInvFreq(s, i);
    const double c = std::cos(ang) * ms, sn = std::sin(ang) * ms;
    const double x1 = qh[r0 + i], x2 = qh[r0 + half + i];
    qh[r0 + i] = static_cast<float>(x1 * c - x2 * sn);
    qh[r0 + half + i] = static_cast<float>(x2 * c + x1 * sn);
  }
  for (uint32_t len = 1; len < s.dim; len <<= 1)
    for (uint32_t i = 0; i < s.dim; i += 2 * len)
      for (uint32_t j = i; j < i + len; ++j) {
        const float a = qh[j], b = qh[j + len];
        qh[j] = a + b;
        qh[j + len] = a - b;
      }
  const float norm = 1.0f / std::sqrt(static_cast<float>(s.dim));
  for (uint32_t j = 0; j < s.dim; ++j) qh[j] *= norm;
}

}  // namespace internal

void RotateIndexVector(const IndexerShape& s, uint64_t pos, float* v) {
  internal::RopeAndHadamard(s, pos, v);
}

void CompressIndexKey(uint32_t dim, const float* k, uint8_t* out) {
  float amax = 0;
  for (uint32_t j = 0; j < dim; ++j) amax = std::max(amax, std::abs(k[j]));
  const float scale = amax > 0 ? amax / 448.0f : 1.0f;
  for (uint32_t j = 0; j < dim; ++j) out[j] = FloatToFp8E4m3(k[j] / scale);
  std::memcpy(out + dim, &scale, 4);
}

namespace reference {

KernelStatus IndexerQuery(const IndexerShape& s, const IndexerLayerWeights& wts, const float* h,
                          uint64_t pos, float* q, float* w) {
  KernelStatus st = s.Validate(nullptr);
  if (st != KernelStatus::kOk) return st;
  if (s.hidden == 0 || s.rank == 0) return KernelStatus::kInvalidShape;
  std::vector<float> a(s.rank);
  double ss = 0;
  for (uint32_t r = 0; r < s.rank; ++r) {
    float acc = 0;
    for (uint32_t i = 0; i < s.hidden; ++i) acc += wts.w_a[size_t{r} * s.hidden + i] * h[i];
    a[r] = acc;
    ss += double{acc} * acc;
  }
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / s.rank) + s.rms_eps);
  for (uint32_t r = 0; r < s.rank; ++r) a[r] = a[r] * inv * wts.g[r];
  for (uint32_t o = 0; o < s.heads * s.dim; ++o) {
    float acc = 0;
    for (uint32_t r = 0; r < s.rank; ++r) acc += wts.w_b[size_t{o} * s.rank + r] * a[r];
    q[o] = acc;
  }
  for (uint32_t hh = 0; hh < s.heads; ++hh)
    internal::RopeAndHadamard(s, pos, q + size_t{hh} * s.dim);
  const float wscale = 1.0f / std::sqrt(static_cast<float>(s.dim) * s.heads);
  for (uint32_t hh = 0; hh < s.heads; ++hh) {
    float acc = 0;
    for (uint32_t i = 0; i < s.hidden; ++i) acc += wts.w_w[size_t{hh} * s.hidden + i] * h[i];
    w[hh] = acc * wscale;
  }
  return KernelStatus::kOk;
}

KernelStatus ScoreChunks(const IndexerShape& s, const float* q, const float* w,
                         const uint8_t* const* keys, uint64_t chunks, float* logits) {
  KernelStatus st = s.Validate(nullptr);
  if (st != KernelStatus::kOk) return st;
  std::vector<float> k(s.dim);
  for (uint32_t l = 0; l < s.layers; ++l) {
    for (uint64_t c = 0; c < chunks; ++c) {
      const uint8_t* kb = keys[l] + c * s.KeyBytes();
      float scale;
      std::memcpy(&scale, kb + s.dim, 4);
      for (uint32_t j = 0; j < s.dim; ++j) k[j] = Fp8E4m3ToFloat(kb[j]) * scale;
      float logit = 0;
      for (uint32_t hh = 0; hh < s.heads; ++hh) {
        const float* qh = q + (size_t{l} * s.heads + hh) * s.dim;
        float dot = 0;
        for (uint32_t j = 0; j < s.dim; ++j) dot += qh[j] * k[j];
        logit += w[size_t{l} * s.heads + hh] * std::max(dot, 0.0f);
      }
      logits[size_t{l} * chunks + c] = logit;
    }
  }
  return KernelStatus::kOk;
}

}  // namespace reference
}  // namespace fm::kernels
