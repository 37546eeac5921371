// Huge-page backed memory for pools of page cells.
#include <sys/mman.h>

#include <cstdint>

#include "kernels/cpu/cpu_kernels.h"

namespace fm::kernels {

uint8_t* AllocatePagePoolMemory(size_t bytes) {
  constexpr size_t kHuge = 2u << 20;
  const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  // Trim to a 2 MiB aligned range so every huge page can be used.
  uint8_t* base = static_cast<uint8_t*>(p);
  uint8_t* aligned =
      reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(kHuge - 1));
  if (aligned > base) munmap(base, aligned - base);
  const size_t tail = (base + len + kHuge) - (aligned + len);
  if (tail > 0) munmap(aligned + len, tail);
  madvise(aligned, len, MADV_HUGEPAGE);  // advisory: without THP the pool still works
  return aligned;
}

void FreePagePoolMemory(uint8_t* p, size_t bytes) {
  constexpr size_t kHuge = 2u << 20;
  if (p) munmap(p, (bytes + kHuge - 1) / kHuge * kHuge);
}

}  // namespace fm::kernels
