#pragma once

#include "common/security.h"

#include <cstdint>
#include <string>

namespace fm::fmctl {

struct DecodeDemoOptions {
  std::string target = "127.0.0.1:50051";
  ClientSecurity security;  // TLS files and the tenant's token
  std::string spec = "bench";
  std::string session = "demo";
  uint64_t tokens = 32768;
  uint32_t steps = 256;
  uint64_t seed = 424242;
  float budget = 0.1f;
  bool whole_step = false;
};

// Runs the demo against a decode worker (fm-decode or the all-in-one). Returns the exit code.
int DecodeDemo(const DecodeDemoOptions& options);

}  // namespace fm::fmctl
