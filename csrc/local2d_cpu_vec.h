// Vectors of Lanes floats for the CPU kernels (GCC / Clang vector extension) and the x86
// instruction sets they are compiled for. Each kernel file builds its work functions once per
// instruction set (AVX-512, AVX2 + FMA, the SSE2 baseline) with the native vector width and
// picks the widest one the CPU runs (cpu_lanes), so a portable build (-O3, no -march) still runs
// wide vectors. Other architectures get the 4-lane build.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#define FF_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define FF_X86_DISPATCH 1
#define FF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#endif

// Vectors are only passed between always-inlined functions, so GCC's note that their ABI
// depends on the instruction set (-Wpsabi) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ff_kernels {
namespace cpu {

template <int Lanes>
struct VecOf;
template <>
struct VecOf<4> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct VecOf<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<16> {
  typedef float type __attribute__((vector_size(64)));
};

// Unaligned load of Lanes floats.
template <int Lanes>
FF_ALWAYS_INLINE typename VecOf<Lanes>::type load_vec(const float* p) {
  typename VecOf<Lanes>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Unaligned store of Lanes floats.
template <int Lanes>
FF_ALWAYS_INLINE void store_vec(float* p, const typename VecOf<Lanes>::type& v) {
  std::memcpy(p, &v, sizeof v);
}

// Sum of the lanes of v, as a tree of halving vector adds.
template <int Lanes>
FF_ALWAYS_INLINE float sum_lanes(const typename VecOf<Lanes>::type& v) {
  using Half = typename VecOf<Lanes / 2>::type;
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  return sum_lanes<Lanes / 2>(lo + hi);
}

template <>
FF_ALWAYS_INLINE float sum_lanes<4>(const VecOf<4>::type& v) {
  return (v[0] + v[2]) + (v[1] + v[3]);
}

// Allocator of cache-line-aligned (64-byte) storage. Large blocks from plain new / malloc start
// 16 bytes past a page boundary, so every 64-byte vector at a multiple of 16 floats from their
// start would straddle two cache lines; from this storage none does.
template <class T>
struct CacheAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheAligned() = default;
  template <class U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <class U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, CacheAligned<T>>;

// The vector width of the widest build this CPU runs: 16 (AVX-512), 8 (AVX2 + FMA) or 4.
// FF_KERNELS_CPU_ISA=base|avx2|avx512 in the environment caps it (for benchmarks and tests of
// the narrower builds); read once.
inline int cpu_lanes() {
  static const int lanes = [] {
    const char* cap = std::getenv("FF_KERNELS_CPU_ISA");
    const std::string want = cap != nullptr ? cap : "avx512";
#ifdef FF_X86_DISPATCH
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (avx512 && want == "avx512") return 16;
    if (avx2 && want != "base") return 8;
#endif
    return 4;
  }();
  return lanes;
}

// The build of a work function that cpu_lanes() picks: ``name##_avx512``, ``name##_avx2`` or
// ``name##_base``, the three a kernel file defines with its FF_DEFINE_ macro.
#ifdef FF_X86_DISPATCH
#define FF_PICK_BUILD(name) (cpu_lanes() == 16 ? name##_avx512 : cpu_lanes() == 8 ? name##_avx2 : name##_base)
#else
#define FF_PICK_BUILD(name) (name##_base)
#endif

}  // namespace cpu
}  // namespace ff_kernels
