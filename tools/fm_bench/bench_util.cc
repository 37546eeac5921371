// Shared by the fm-bench subcommands and fm-gpu-bench.
#include <fstream>

#include "tools/fm_bench/bench.h"

namespace fm::bench {

bool WriteJsonObject(const std::string& path,
                     const std::vector<std::pair<std::string, double>>& kv) {
  std::ofstream f(path);
  f << "{\n";
  for (size_t i = 0; i < kv.size(); ++i)
    f << "  \"" << kv[i].first << "\": " << kv[i].second << (i + 1 < kv.size() ? ",\n" : "\n");
  f << "}\n";
  return f.good();
}

}  // namespace fm::bench
