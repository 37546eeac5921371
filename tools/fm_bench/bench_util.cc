// Shared by the fm-bench subcommands and fm-gpu-bench.
#include <algorithm>
#include <cmath>
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

double ContextBudget(double cap, uint64_t anchor, uint64_t context) {
  return std::min(1.0, cap * std::cbrt(double(anchor) / double(context)));
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

bool WriteJsonRows(const std::string& path, const std::vector<std::string>& rows) {
  std::ofstream f(path);
  f << "[\n";
  for (size_t i = 0; i < rows.size(); ++i)
    f << "  " << rows[i] << (i + 1 < rows.size() ? ",\n" : "\n");
  f << "]\n";
  return f.good();
}

}  // namespace fm::bench
