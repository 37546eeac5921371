// <immintrin.h> for the hand-written AVX-512 kernels (indexer_fp16.cc, indexer_vbmi.cc),
// on x86-64. Include it in those .cc files only: it silences a compiler warning for the
// rest of the file.
#pragma once

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

// GCC 12's AVX-512 intrinsics pass an "undefined" register (a self-initialised variable)
// as the merge source of their unmasked forms, which -Wuninitialized reports once inlined.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
