// The CUDA paged decode kernels (device code), included by paged_decode.cu and, with
// kernels/testing/simt_emulator.h in front of it, by a CPU test that runs them on a machine
// without a GPU.
//
// Built to stream K/V at HBM speed: one thread block per (item, work unit, group of up to
// four query heads); four warps that each take every fourth page of the unit with their own
// online-softmax state; a merge of the warps' states in shared memory at the end. Every K
// and V row is read with 16-byte loads, a lane per 16 bytes and several rows per warp, four
// rows per lane in flight; scores are summed across a row's lanes with shuffles (RowSum4),
// so no page waits on a block-wide barrier. Split units write partial states that MergeKernel
// merges by log-sum-exp.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "flashmemory/kernels/attention.h"
#include "kernels/cuda/device_util.cuh"

namespace fm::kernels::cuda_decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr uint32_t kHeadsPerBlock = 4;  // query heads of a group one block attends (RowSum4)
constexpr int kUnroll = 4;              // rows per lane in flight
// Blocks per SM the register budget must allow (one fewer for rows of two vectors per
// lane, f32 with head_dim over 128): 16 warps of 2 KiB in flight each keep ~32 KiB per SM
// on the way from HBM, about what its bandwidth-latency product needs.
constexpr int kMinBlocksPerSm = 4;
constexpr int kMaxSharedBytes = 48 * 1024;

struct DevItem {
  uint32_t seq, layer;
  const float* q;
  float* out;
  float* lse;
};

struct KShape {
  uint32_t layers, q_heads, kv_heads, head_dim, page_tokens;
  float scale;
};

// How a warp covers K/V rows: a row is `chunks` 16-byte vectors; `lanes` (a power of two)
// lanes share a row, each holding vectors c0, c0 + lanes, ... (NV of them, template);
// 32 / lanes rows are read at once.
struct RowGeometry {
  uint32_t chunks, lanes, rows;
};

// 16 bytes of K or V as floats, in element order.
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void Unpack(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x), f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z), f[3] = __uint_as_float(r.w);
  }
};
// Eight 16-bit elements, two per 32-bit word (the lower half first), as floats.
template <typename Widen>
__device__ __forceinline__ void UnpackHalves(const uint4& r, float* f, Widen widen) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
  FM_UNROLL
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = widen(static_cast<unsigned short>(w[i] & 0xffffu));
    f[2 * i + 1] = widen(static_cast<unsigned short>(w[i] >> 16));
  }
}
template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void Unpack(const uint4& r, float* f) {
    UnpackHalves(r, f, [](unsigned short b) { return __uint_as_float(uint32_t(b) << 16); });
  }
};
template <>
struct Vec16<__half> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void Unpack(const uint4& r, float* f) {
    UnpackHalves(r, f, [](unsigned short b) { return __half2float(__ushort_as_half(b)); });
  }
};

__device__ __forceinline__ size_t BlockOffset(const KShape& s, uint32_t layer, uint32_t kv,
                                              uint32_t h) {
  return ((size_t(layer) * 2 + kv) * s.kv_heads + h) * s.page_tokens * s.head_dim;
}

// Shared memory: per warp the page's scores of its heads [h][token], then per warp and head
// the running max, sum and output accumulators that the final merge reads.
inline size_t SharedFloats(uint32_t d, uint32_t p) {
  return size_t(kWarps) * kHeadsPerBlock * (p + 2 + d);
}

__device__ __forceinline__ float WarpMax(float x) {
  FM_UNROLL
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float WarpSum(float x) {
  FM_UNROLL
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Loads the kUnroll rows [t0 + k * g.rows + r] (k < kUnroll) of a [token][d] block that this
// lane covers; rows at or past n and vectors past the row read as zero.
template <int NV>
__device__ __forceinline__ void LoadRows(const uint8_t* block, size_t row_bytes, uint32_t t0,
                                         uint32_t n, uint32_t r, uint32_t c0, const RowGeometry& g,
                                         uint4 (&raw)[kUnroll][NV]) {
  FM_UNROLL
  for (int k = 0; k < kUnroll; ++k) {
    const uint32_t t = t0 + k * g.rows + r;
    FM_UNROLL
    for (int v = 0; v < NV; ++v) {
      const uint32_t c = c0 + v * g.lanes;
      raw[k][v] = t < n && c < g.chunks
                      ? __ldcs(reinterpret_cast<const uint4*>(block + t * row_bytes) + c)
                      : make_uint4(0, 0, 0, 0);
    }
  }
}

// Sums four values over the `lanes` lanes of a row (a power of two, at least 4) with
// log2(lanes) + 1 shuffles instead of 4 log2(lanes): the first two exchanges each send half
// of what a lane holds and keep the other half, so that afterwards every lane holds one
// head's partial sum. Returns the full sum of head *head (the same in every lane of the row
// with the same two bits lanes / 2 and lanes / 4 of c0).
__device__ __forceinline__ float RowSum4(const float (&x)[4], uint32_t c0, uint32_t lanes,
                                         uint32_t* head) {
  const uint32_t off1 = lanes / 2, off2 = lanes / 4;
  const bool hi1 = c0 & off1, hi2 = c0 & off2;
  // Lanes with hi1 keep heads 2 and 3 and send 0 and 1 to their partner, which keeps those.
  const float s0 = __shfl_xor_sync(0xffffffffu, hi1 ? x[0] : x[2], off1);
  const float s1 = __shfl_xor_sync(0xffffffffu, hi1 ? x[1] : x[3], off1);
  const float k0 = (hi1 ? x[2] : x[0]) + s0, k1 = (hi1 ? x[3] : x[1]) + s1;
  // Then lanes with hi2 keep the second of the two.
  float v = (hi2 ? k1 : k0) + __shfl_xor_sync(0xffffffffu, hi2 ? k0 : k1, off2);
  for (uint32_t off = off2 / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  *head = 2 * hi1 + hi2;
  return v;
}

// Calls fn(h, v, e, x) for every head h of the block and every element x (element e of
// vector v) of a lane's row vectors.
template <typename T, int NV, typename F>
__device__ __forceinline__ void ForEachElement(const uint4 (&raw)[NV], F fn) {
  FM_UNROLL
  for (int v = 0; v < NV; ++v) {
    float f[Vec16<T>::N];
    Vec16<T>::Unpack(raw[v], f);
    FM_UNROLL
    for (uint32_t h = 0; h < kHeadsPerBlock; ++h) {
      FM_UNROLL
      for (int e = 0; e < Vec16<T>::N; ++e) fn(h, v, e, f[e]);
    }
  }
}

template <typename T, int NV>
__global__ void __launch_bounds__(kThreads, NV == 1 ? kMinBlocksPerSm : kMinBlocksPerSm - 1)
    PagedDecodeKernel(KShape s, RowGeometry g, const uint8_t* __restrict__ base, size_t stride,
                      size_t offset, const uint32_t* __restrict__ cells,
                      const uint16_t* __restrict__ valid, const uint32_t* __restrict__ seq_first,
                      const DecodePlan::Unit* __restrict__ units, const DevItem* __restrict__ items,
                      const uint2* __restrict__ tasks, float* __restrict__ partial_out,
                      float* __restrict__ partial_lse, uint32_t num_partials) {
  constexpr int N = Vec16<T>::N;
  constexpr uint32_t HB = kHeadsPerBlock;
  FM_SHARED_FLOATS(smem);
  const uint32_t G = s.q_heads / s.kv_heads, d = s.head_dim, P = s.page_tokens;
  const uint32_t h0 = blockIdx.y * HB, H = min(HB, G - h0);  // this block's heads
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t r = lane / g.lanes, c0 = lane % g.lanes;
  float* sc = smem + warp * HB * P;  // this warp's page scores, then probabilities [h][t]
  float* wm = smem + kWarps * HB * P;
  float* wl = wm + kWarps * HB;
  float* wacc = wl + kWarps * HB;  // [warp][h][d]
  const uint2 task = tasks[blockIdx.x];
  const DevItem it = items[task.x];
  const DecodePlan::Unit u = units[task.y];

  // This lane's slice of the scaled queries (zero for heads past H and vectors past the row).
  float q[HB][NV][N], acc[HB][NV][N], m[HB], l[HB];
  FM_UNROLL
  for (uint32_t h = 0; h < HB; ++h) {
    m[h] = -INFINITY, l[h] = 0.0f;
    FM_UNROLL
    for (int v = 0; v < NV; ++v) {
      const uint32_t c = c0 + v * g.lanes;
      const float* qh = it.q + (size_t(u.kv_head) * G + h0 + h) * d + size_t(c) * N;
      FM_UNROLL
      for (int e = 0; e < N; ++e) {
        q[h][v][e] = h < H && c < g.chunks ? qh[e] * s.scale : 0.0f;
        acc[h][v][e] = 0.0f;
      }
    }
  }
  const size_t row_bytes = size_t(d) * sizeof(T);
  const size_t kofs = BlockOffset(s, it.layer, 0, u.kv_head) * sizeof(T),
               vofs = BlockOffset(s, it.layer, 1, u.kv_head) * sizeof(T);
  const uint32_t first = seq_first[u.seq], step = g.rows * kUnroll;
  for (uint32_t pi = u.page_begin + warp; pi < u.page_end; pi += kWarps) {
    const uint8_t* cell = base + size_t(cells[first + pi]) * stride + offset;
    const uint32_t n = valid[first + pi];
    // 1. Scores: each lane's partial dot products, summed over the row's lanes.
    for (uint32_t t0 = 0; t0 < n; t0 += step) {
      uint4 raw[kUnroll][NV];
      LoadRows<NV>(cell + kofs, row_bytes, t0, n, r, c0, g, raw);
      FM_UNROLL
      for (int k = 0; k < kUnroll; ++k) {
        float dot[HB] = {};
        ForEachElement<T, NV>(raw[k], [&](uint32_t h, int v, int e, float x) {
          dot[h] = fmaf(q[h][v][e], x, dot[h]);
        });
        uint32_t head;
        const float sum = RowSum4(dot, c0, g.lanes, &head);
        const uint32_t t = t0 + k * g.rows + r;
        if ((c0 & (g.lanes / 4 - 1)) == 0 && t < n) sc[head * P + t] = sum;
      }
    }
    __syncwarp();
    // 2. Online softmax over the page, per head, across the warp.
    FM_UNROLL
    for (uint32_t h = 0; h < HB; ++h) {
      float pm = -INFINITY;
      for (uint32_t t = lane; t < n; t += 32) pm = fmaxf(pm, sc[h * P + t]);
      const float mn = fmaxf(m[h], WarpMax(pm));
      const float corr = m[h] == -INFINITY ? 0.0f : __expf(m[h] - mn);
      float sum = 0.0f;
      for (uint32_t t = lane; t < n; t += 32) {
        const float e = __expf(sc[h * P + t] - mn);
        sc[h * P + t] = e;
        sum += e;
      }
      l[h] = l[h] * corr + WarpSum(sum);
      m[h] = mn;
      FM_UNROLL
      for (int v = 0; v < NV; ++v) {
        FM_UNROLL
        for (int e = 0; e < N; ++e) acc[h][v][e] *= corr;
      }
    }
    __syncwarp();
    // 3. V: each lane accumulates its vectors over its rows (summed across rows at the end).
    for (uint32_t t0 = 0; t0 < n; t0 += step) {
      uint4 raw[kUnroll][NV];
      LoadRows<NV>(cell + vofs, row_bytes, t0, n, r, c0, g, raw);
      FM_UNROLL
      for (int k = 0; k < kUnroll; ++k) {
        const uint32_t t = t0 + k * g.rows + r;
        if (t >= n) continue;
        float p[HB];
        FM_UNROLL
        for (uint32_t h = 0; h < HB; ++h) p[h] = sc[h * P + t];
        ForEachElement<T, NV>(raw[k], [&](uint32_t h, int v, int e, float x) {
          acc[h][v][e] = fmaf(p[h], x, acc[h][v][e]);
        });
      }
    }
    __syncwarp();  // the next page overwrites sc
  }
  // The warp's rows: lanes with the same c0 hold parts of the same output vectors.
  for (uint32_t off = g.lanes; off < 32; off <<= 1) {
    FM_UNROLL
    for (uint32_t h = 0; h < HB; ++h) {
      FM_UNROLL
      for (int v = 0; v < NV; ++v) {
        FM_UNROLL
        for (int e = 0; e < N; ++e) acc[h][v][e] += __shfl_xor_sync(0xffffffffu, acc[h][v][e], off);
      }
    }
  }
  if (lane == 0) {
    FM_UNROLL
    for (uint32_t h = 0; h < HB; ++h) wm[warp * HB + h] = m[h], wl[warp * HB + h] = l[h];
  }
  if (r == 0) {
    FM_UNROLL
    for (uint32_t h = 0; h < HB; ++h) {
      FM_UNROLL
      for (int v = 0; v < NV; ++v) {
        const uint32_t c = c0 + v * g.lanes;
        if (c >= g.chunks) continue;
        FM_UNROLL
        for (int e = 0; e < N; ++e) wacc[(warp * HB + h) * d + c * N + e] = acc[h][v][e];
      }
    }
  }
  __syncthreads();
  // Merge of the warps' states (a warp without pages has m = -inf and is skipped).
  float* out;
  float* lse;
  if (u.partial < 0) {
    out = it.out + size_t(u.kv_head) * G * d;
    lse = it.lse ? it.lse + size_t(u.kv_head) * G : nullptr;
  } else {
    const size_t pslot = size_t(task.x) * num_partials + u.partial;
    out = partial_out + pslot * G * d;
    lse = partial_lse + pslot * G;
  }
  for (uint32_t e = threadIdx.x; e < H * d; e += kThreads) {
    const uint32_t h = e / d, j = e % d;
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, wm[w * HB + h]);
    float sum = 0.0f, o = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      if (wm[w * HB + h] == -INFINITY) continue;
      const float f = __expf(wm[w * HB + h] - mx);
      sum += wl[w * HB + h] * f;
      o += wacc[(w * HB + h) * d + j] * f;
    }
    out[size_t(h0 + h) * d + j] = o / sum;
    if (lse && j == 0) lse[h0 + h] = mx + logf(sum);
  }
}

// One block per (item, split group): merges the group's partial states in order.
FM_KERNEL void MergeKernel(uint32_t G, uint32_t d, const DevItem* __restrict__ items,
                           const uint4* __restrict__ merges, const float* __restrict__ partial_out,
                           const float* __restrict__ partial_lse, uint32_t num_partials) {
  const uint4 mg = merges[blockIdx.x];  // item, kv_head, first partial, count
  const DevItem it = items[mg.x];
  for (uint32_t e = threadIdx.x; e < G * d; e += blockDim.x) {
    const uint32_t h = e / d;
    float mx = -INFINITY;
    for (uint32_t k = 0; k < mg.w; ++k)
      mx = fmaxf(mx, partial_lse[(size_t(mg.x) * num_partials + mg.z + k) * G + h]);
    float sum = 0.0f, o = 0.0f;
    for (uint32_t k = 0; k < mg.w; ++k) {
      const size_t p = size_t(mg.x) * num_partials + mg.z + k;
      const float w = __expf(partial_lse[p * G + h] - mx);
      sum += w;
      o += w * partial_out[p * G * d + e];
    }
    it.out[size_t(mg.y) * G * d + e] = o / sum;
    if (it.lse && e % d == 0) it.lse[size_t(mg.y) * G + h] = mx + logf(sum);
  }
}

inline RowGeometry Geometry(const AttentionShape& s) {
  const uint32_t chunks = static_cast<uint32_t>(size_t{s.head_dim} * ElemSize(s.dtype) / 16);
  uint32_t lanes = 1;
  while (lanes < chunks && lanes < 32) lanes <<= 1;
  return {chunks, lanes, 32 / lanes};
}

inline uint32_t VectorsPerLane(const RowGeometry& g) { return (g.chunks + g.lanes - 1) / g.lanes; }

// Blocks per task along the grid's y: groups of up to kHeadsPerBlock query heads.
inline uint32_t HeadBlocks(const AttentionShape& s) {
  return (s.q_heads / s.kv_heads + kHeadsPerBlock - 1) / kHeadsPerBlock;
}

// The plan's page lists as the kernel reads them: every sequence's cells and valid counts
// concatenated, and per sequence the index of its first page.
inline void ConcatPageLists(const DecodePlan& plan, std::vector<uint32_t>* cells,
                            std::vector<uint16_t>* valid, std::vector<uint32_t>* first) {
  for (const PageList& l : plan.seqs) {
    first->push_back(static_cast<uint32_t>(cells->size()));
    cells->insert(cells->end(), l.cells, l.cells + l.count);
    valid->insert(valid->end(), l.valid, l.valid + l.count);
  }
}

// Calls f(T(), std::integral_constant<int, NV>()) with the kernel's element type and vectors
// per lane for the shape.
template <typename F>
void DispatchDecode(const AttentionShape& s, F&& f) {
  DispatchElemType(s.dtype, [&](auto elem) {
    // 16-bit rows of up to 256 elements are at most 32 vectors: one per lane.
    if constexpr (sizeof(elem) != 2) {
      if (VectorsPerLane(Geometry(s)) == 2) return f(elem, std::integral_constant<int, 2>());
    }
    f(elem, std::integral_constant<int, 1>());
  });
}

// What one CudaRunPagedDecode call launches: the items, a (item, unit) task per block row
// and a (item, kv head, first partial, count) merge per split group.
struct LaunchLists {
  std::vector<DevItem> items;
  std::vector<uint2> tasks;
  std::vector<uint4> merges;
};

inline KernelStatus BuildLaunchLists(const DecodePlan& plan, const DecodeItem* items,
                                     size_t n_items, LaunchLists* out) {
  for (size_t i = 0; i < n_items; ++i) {
    if (items[i].seq >= plan.seqs.size() || items[i].layer >= plan.shape.layers)
      return KernelStatus::kInvalidShape;
    out->items.push_back({items[i].seq, items[i].layer, items[i].q, items[i].out, items[i].lse});
    for (uint32_t u = plan.seq_units[items[i].seq]; u < plan.seq_units[items[i].seq + 1]; ++u) {
      const auto& unit = plan.units[u];
      out->tasks.push_back(make_uint2(static_cast<uint32_t>(i), u));
      if (unit.partial >= 0 && unit.page_begin == 0)
        out->merges.push_back(make_uint4(static_cast<uint32_t>(i), unit.kv_head,
                                         static_cast<uint32_t>(unit.partial), unit.pieces));
    }
  }
  return KernelStatus::kOk;
}

}  // namespace fm::kernels::cuda_decode
