// SIMD helpers shared by the Highway kernels, compiled once per target (Highway's
// per-target include guard).
#if defined(FM_KERNELS_CPU_SIMD_UTIL_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef FM_KERNELS_CPU_SIMD_UTIL_INL_H_
#undef FM_KERNELS_CPU_SIMD_UTIL_INL_H_
#else
#define FM_KERNELS_CPU_SIMD_UTIL_INL_H_
#endif

#include <hwy/highway.h>

#include <type_traits>

HWY_BEFORE_NAMESPACE();
namespace fm::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Loads Lanes(df) elements of T (float, float16_t or bfloat16_t) as floats.
template <class DF, typename T>
HWY_INLINE hn::Vec<DF> LoadAsF32(DF df, const T* HWY_RESTRICT p) {
  if constexpr (std::is_same_v<T, float>) {
    return hn::LoadU(df, p);
  } else {
    const hn::Rebind<T, DF> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, p));
  }
}

// StoreBlockSum / StoreBlockMax: lane k of out4 = sum / max over the vector's 4-lane blocks
// of lane k. Sum4: out4[k] = sum of all lanes of ak, as one transposing reduction for four
// vectors instead of four separate horizontal sums.
// Halves the vector with `op` until one 4-lane block is left and stores it.
template <class D, class Op>
HWY_INLINE void StoreBlockReduce(D d, hn::Vec<D> v, float* HWY_RESTRICT out4, Op op) {
#if HWY_TARGET != HWY_SCALAR
  if constexpr (hn::MaxLanes(d) > 4) {
    const hn::Half<D> dh;
    StoreBlockReduce(dh, op(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)), out4, op);
    return;
  }
#endif
  hn::StoreU(v, d, out4);
}
template <class D>
HWY_INLINE void StoreBlockSum(D d, hn::Vec<D> v, float* HWY_RESTRICT out4) {
  StoreBlockReduce(d, v, out4, [](auto a, auto b) { return hn::Add(a, b); });
}
template <class D>
HWY_INLINE void StoreBlockMax(D d, hn::Vec<D> v, float* HWY_RESTRICT out4) {
  StoreBlockReduce(d, v, out4, [](auto a, auto b) { return hn::Max(a, b); });
}

#if HWY_TARGET == HWY_SCALAR
template <class D>
HWY_INLINE void Sum4(D d, hn::Vec<D> a0, hn::Vec<D> a1, hn::Vec<D> a2, hn::Vec<D> a3,
                     float* HWY_RESTRICT out4) {
  out4[0] = hn::GetLane(a0), out4[1] = hn::GetLane(a1), out4[2] = hn::GetLane(a2),
  out4[3] = hn::GetLane(a3);
}
#else
template <class D>
HWY_INLINE void Sum4(D d, hn::Vec<D> a0, hn::Vec<D> a1, hn::Vec<D> a2, hn::Vec<D> a3,
                     float* HWY_RESTRICT out4) {
  const hn::RepartitionToWide<hn::RebindToUnsigned<D> > d64;
  // Per 128-bit block: s01 = [a0 0+2, a1 0+2, a0 1+3, a1 1+3], likewise s23.
  const auto s01 = hn::Add(hn::InterleaveLower(d, a0, a1), hn::InterleaveUpper(d, a0, a1));
  const auto s23 = hn::Add(hn::InterleaveLower(d, a2, a3), hn::InterleaveUpper(d, a2, a3));
  const auto lo =
      hn::BitCast(d, hn::InterleaveLower(d64, hn::BitCast(d64, s01), hn::BitCast(d64, s23)));
  const auto hi =
      hn::BitCast(d, hn::InterleaveUpper(d64, hn::BitCast(d64, s01), hn::BitCast(d64, s23)));
  StoreBlockSum(d, hn::Add(lo, hi), out4);  // lane k of every block: block sum of ak
}
#endif  // HWY_TARGET == HWY_SCALAR

}  // namespace fm::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // FM_KERNELS_CPU_SIMD_UTIL_INL_H_
