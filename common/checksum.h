// Page checksums: XXH3-64, verified on every tier crossing.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fm {

uint64_t Checksum64(const void* data, size_t len, uint64_t seed = 0);

}  // namespace fm
