// fm-gpu-bench: the GPU kernel benchmark on its own (CUDA runtime + kernels only).
#include <cstdio>
#include <string>

#include "tools/fm_bench/bench.h"

int main(int argc, char** argv) {
  fm::bench::GpuBenchOptions o;
  std::string json;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--context")
      o.context = std::stoull(argv[i + 1]);
    else if (a == "--budget")
      o.budget = std::stod(argv[i + 1]);
    else if (a == "--reps")
      o.reps = std::stoi(argv[i + 1]);
    else if (a == "--hbm_gbps")
      o.hbm_gbps = std::stod(argv[i + 1]);
    else if (a == "--json")
      json = argv[i + 1];
  }
  std::vector<std::pair<std::string, double>> figures;
  const int rc = fm::bench::RunGpuKernelsBench(o, &figures);
  if (!json.empty() && !figures.empty() && !fm::bench::WriteJsonObject(json, figures)) return 1;
  return rc;
}
