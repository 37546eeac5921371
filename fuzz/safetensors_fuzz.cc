// libFuzzer target: a safetensors file (indexer weights, traces) from anywhere. Open must
// answer OK or an error for any bytes, and every tensor it lists must lie inside the file.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "common/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("fuzz.safetensors", 0);
  if (fd < 0) return 0;
  if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) return 0;
  auto f = fm::SafetensorsFile::Open("/proc/self/fd/" + std::to_string(fd));
  if (!f.ok()) return 0;
  for (const std::string& name : (*f)->names()) {
    auto t = (*f)->Get(name);
    if (!t.ok()) __builtin_trap();  // listed, so present
    auto v = (*f)->GetFloats(name);  // reads every byte of the tensor when it is a float one
    (void)v;
  }
  return 0;
}
