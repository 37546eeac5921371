// Test-only: random inputs of the indexer scoring and the attention-state merge, shared by
// the CPU-emulated and the GPU kernel tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "flashmemory/kernels/attention.h"
#include "flashmemory/kernels/indexer.h"

namespace fm::kernels::testing {

// n standard-normal floats.
inline std::vector<float> RandomNormals(size_t n, uint64_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

// Compressed keys of `chunks` standard-normal raw keys per layer, with standard-normal q
// [layers][heads][dim] and head weights [layers][heads].
struct IndexInputs {
  std::vector<std::vector<uint8_t>> keys;
  std::vector<const uint8_t*> key_ptrs;
  std::vector<float> q, w;
};

inline IndexInputs RandomIndexInputs(const IndexerShape& s, uint64_t chunks, uint64_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  IndexInputs in;
  in.keys.assign(s.layers, std::vector<uint8_t>(chunks * s.KeyBytes()));
  std::vector<float> raw(s.dim);
  for (auto& k : in.keys) {
    for (uint64_t c = 0; c < chunks; ++c) {
      for (float& x : raw) x = nd(rng);
      CompressIndexKey(s.dim, raw.data(), k.data() + c * s.KeyBytes());
    }
    in.key_ptrs.push_back(k.data());
  }
  in.q.resize(size_t{s.layers} * s.heads * s.dim);
  in.w.resize(size_t{s.layers} * s.heads);
  for (float& x : in.q) x = nd(rng);
  for (float& x : in.w) x = nd(rng);
  return in;
}

// Two partial attention states of `heads` x `d` (outputs and LSEs), side b of head 2 empty
// (LSE -inf), and their merge by the CPU kernel.
struct MergeInputs {
  std::vector<float> oa, ob, la, lb, want, want_lse;
};

inline MergeInputs RandomMergeInputs(uint32_t heads, uint32_t d, uint64_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  MergeInputs in;
  in.oa.resize(size_t{heads} * d), in.ob.resize(size_t{heads} * d);
  in.la.resize(heads), in.lb.resize(heads);
  for (float& x : in.oa) x = nd(rng);
  for (float& x : in.ob) x = nd(rng);
  for (float& x : in.la) x = nd(rng) * 3;
  for (float& x : in.lb) x = nd(rng) * 3;
  in.lb[2] = -INFINITY;
  in.want.resize(size_t{heads} * d), in.want_lse.resize(heads);
  MergeAttentionStates(heads, d, in.oa.data(), in.la.data(), in.ob.data(), in.lb.data(),
                       in.want.data(), in.want_lse.data());
  return in;
}

}  // namespace fm::kernels::testing
