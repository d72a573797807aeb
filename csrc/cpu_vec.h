// Helpers for the CPU kernels' per-row loops.
//
// The hot loops are written once as always-inline templates with `omp simd` hints and instantiated inside
// functions marked SDCA_CPU_CLONES: GCC then compiles each of those for AVX-512, AVX2+FMA and the baseline
// x86-64 and picks one at load time for the CPU at hand, so one portable build is fast everywhere.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SDCA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SDCA_CPU_CLONES
#endif

#if defined(__GNUC__)
#define SDCA_INLINE inline __attribute__((always_inline))
#else
#define SDCA_INLINE inline
#endif

#include <cstdint>

namespace sdca {

template <typename T>
SDCA_INLINE T simd_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += w * x
template <typename T>
SDCA_INLINE void simd_axpy(T* __restrict__ y, T w, const T* __restrict__ x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

}  // namespace sdca
