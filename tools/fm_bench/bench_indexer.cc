// fm-bench indexer: every selection policy on held-out generated sessions at the same
// budget. Per cycle of tau steps, one Predict at the cycle start (the indexer holds the
// keys of the sealed pages at that point), then for each step of the cycle: the dense
// attention mass on the resident set (pages written after the prediction are the tail and
// count as resident), the golden-label recall and precision, and needle hits.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <thread>

#include "common/status.h"
#include "services/indexer/indexer_core.h"
#include "tools/fm_bench/bench.h"
#include "workload/generator.h"

namespace fm::bench {
namespace {

struct Acc {
  double mass = 0, label_recall = 0, label_precision = 0;
  uint64_t mass_n = 0, label_n = 0, needles = 0, needle_hits = 0;
  std::vector<double> latency_ms;
};

}  // namespace

int RunIndexerBench(const IndexerBenchOptions& o) {
  auto spec = PresetSpec(o.spec);
  if (!spec.ok()) {
    std::fprintf(stderr, "fm-bench indexer: %s\n", spec.status().ToString().c_str());
    return 1;
  }
  indexer::CoreOptions co;
  co.lsa_best_share = o.best_share;
  indexer::IndexerCore core(co);
  uint64_t hash = 0;
  if (absl::Status st = core.LoadWeights(o.weights, &hash); !st.ok()) {
    std::fprintf(stderr, "fm-bench indexer: %s\n", st.ToString().c_str());
    return 1;
  }
  if (absl::Status st = core.weights()->Matches(*spec); !st.ok()) {
    std::fprintf(stderr, "fm-bench indexer: %s\n", st.ToString().c_str());
    return 1;
  }
  const std::vector<indexer::Policy> policies = {
      indexer::Policy::kLsa,    indexer::Policy::kQuest,       indexer::Policy::kRecency,
      indexer::Policy::kRandom, indexer::Policy::kSinkRecency, indexer::Policy::kOracle};
  std::vector<std::string> rows_json;
  std::printf(
      "fm-bench indexer: %s spec, budget %.0f %% of pages (sink and tail included), tau %u, "
      "weights %s\n",
      o.spec.c_str(), 100 * o.budget, o.tau, o.weights.c_str());
  std::printf("%-9s %-13s %11s %12s %15s %11s %11s %11s\n", "context", "policy", "mass_recall",
              "label_recall", "label_precision", "needle_hit", "p50_ms", "p99_ms");
  for (uint64_t context : o.contexts) {
    std::map<indexer::Policy, Acc> acc;
    const uint32_t steps = context >= (1u << 20) ? o.steps_1m : o.steps;
    const int sessions = context >= (1u << 20) ? 1 : o.sessions;
    for (int si = 0; si < sessions; ++si) {
      workload::SessionConfig c;
      c.spec = *spec;
      c.knobs.tau = o.tau;
      c.seed = o.seed + si;
      c.prefill_tokens = context;
      c.steps = steps;
      const auto g0 = std::chrono::steady_clock::now();
      auto sess = workload::Session::Generate(c);
      if (!sess.ok()) {
        std::fprintf(stderr, "fm-bench indexer: %s\n", sess.status().ToString().c_str());
        return 1;
      }
      const workload::Session& s = **sess;
      // Quest bounds of the index layers for every page (computed on two threads).
      std::vector<uint32_t> layers;
      for (uint32_t l = 0; l < spec->index_layers; ++l)
        layers.push_back(indexer::ModelLayerOfIndexLayer(*spec, l));
      const size_t bf = indexer::IndexerBoundsFloats(*spec);
      const uint64_t pages = s.total_pages();
      std::vector<float> bounds(pages * bf);
      {
        std::vector<std::thread> th;
        for (int t = 0; t < 2; ++t)
          th.emplace_back([&, t] {
            for (uint64_t p = t; p < pages; p += 2) s.PageBounds(p, layers, bounds.data() + p * bf);
          });
        for (auto& t : th) t.join();
      }
      std::fprintf(stderr, "fm-bench indexer: %llu-token session %d/%d generated in %.1f s\n",
                   static_cast<unsigned long long>(context), si + 1, sessions,
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count());
      const std::string id = "eval-" + std::to_string(context) + "-" + std::to_string(si);
      const size_t kb = spec->IndexKeyBytes();
      uint64_t have_chunks = 0, have_pages = 0;
      const uint32_t cpp = spec->ChunksPerPage();
      for (uint32_t cy = 0; cy < s.cycles(); ++cy) {
        const uint32_t s0 = cy * o.tau;
        const uint64_t chunks = s.indexed_chunks(s0), sealed = chunks / cpp;
        std::vector<uint8_t> keys;
        for (uint32_t l = 0; l < spec->index_layers; ++l)
          keys.insert(keys.end(), s.index_keys(l).begin() + have_chunks * kb,
                      s.index_keys(l).begin() + chunks * kb);
        absl::Status st = cy == 0 ? core.Register(id, *spec, keys.data(), chunks, s.tokens_at(s0),
                                                  bounds.data(), sealed)
                                  : core.Append(id, keys.data(), have_chunks, chunks - have_chunks,
                                                s.tokens_at(s0), bounds.data() + have_pages * bf,
                                                have_pages, sealed - have_pages);
        if (!st.ok()) {
          std::fprintf(stderr, "fm-bench indexer: %s\n", st.ToString().c_str());
          return 1;
        }
        have_chunks = chunks, have_pages = sealed;
        // The cycle's true page mass, for the oracle.
        const uint64_t np = s.pages_at(s0);
        std::vector<float> oracle(np, 0.0f);
        for (uint32_t st2 = s0; st2 < s0 + o.tau; ++st2)
          for (uint64_t p = 0; p < np; ++p) oracle[p] += s.page_mass(st2)[p];
        indexer::PredictArgs a;
        a.step = s0;
        a.budget = static_cast<float>(o.budget);
        a.hidden.assign(s.hidden(s0), s.hidden(s0) + spec->hidden_dim);
        a.query.resize(size_t{spec->index_layers} * spec->q_heads * spec->head_dim);
        for (uint32_t l = 0; l < spec->index_layers; ++l)
          for (uint32_t h = 0; h < spec->q_heads; ++h)
            s.ModelQuery(s0, layers[l], h,
                         a.query.data() + (size_t{l} * spec->q_heads + h) * spec->head_dim);
        a.oracle_page_mass = oracle;
        for (indexer::Policy pol : policies) {
          a.policy = pol;
          auto pred = core.Predict(id, a);
          if (!pred.ok()) {
            std::fprintf(stderr, "fm-bench indexer: %s: %s\n", indexer::PolicyName(pol),
                         pred.status().ToString().c_str());
            return 1;
          }
          Acc& ac = acc[pol];
          ac.latency_ms.push_back(pred->latency_ms);
          std::vector<uint8_t> resident(s.total_pages(), 0);
          for (const auto& p : pred->pages) resident[p.page] = 1;
          for (uint64_t p = pred->total_pages; p < s.total_pages(); ++p) resident[p] = 1;
          // The open page at prediction time is partial; its tail is resident via the tail.
          double cycle_mass = 0;
          for (uint32_t st2 = s0; st2 < s0 + o.tau; ++st2) {
            double m = 0;
            for (uint64_t p = 0; p < s.pages_at(st2); ++p) m += resident[p] * s.page_mass(st2)[p];
            ac.mass += m;
            cycle_mass += m;
            ++ac.mass_n;
          }
          if (o.verbose)
            std::fprintf(stderr, "  %s cycle %u (focus %u -> %u) %-12s mass %.4f\n", id.c_str(), cy,
                         s.focus(s0), s.focus(s0 + o.tau - 1), indexer::PolicyName(pol),
                         cycle_mass / o.tau);
          uint64_t pos = 0, hit = 0, res_chunks = 0;
          const uint8_t* lab = s.labels(cy);
          for (uint64_t j = 0; j < chunks; ++j) {
            pos += lab[j];
            hit += lab[j] & resident[j / cpp];
            res_chunks += resident[j / cpp];
          }
          if (pos > 0) {
            ac.label_recall += double(hit) / pos;
            ac.label_precision += res_chunks ? double(hit) / res_chunks : 0;
            ++ac.label_n;
          }
          for (const auto& n : s.needles())
            if (n.step >= s0 && n.step < s0 + o.tau) {
              ++ac.needles;
              ac.needle_hits += resident[n.chunk / cpp];
              if (o.verbose)
                std::fprintf(stderr,
                             "  %s needle chunk %llu (page %llu) step %u %-12s %s label %d\n",
                             id.c_str(), static_cast<unsigned long long>(n.chunk),
                             static_cast<unsigned long long>(n.chunk / cpp), n.step,
                             indexer::PolicyName(pol), resident[n.chunk / cpp] ? "hit" : "MISS",
                             lab[n.chunk]);
            }
        }
      }
      IgnoreError(core.Drop(id));
    }
    for (indexer::Policy pol : policies) {
      const Acc& ac = acc[pol];
      const double mr = ac.mass / std::max<uint64_t>(1, ac.mass_n);
      const double lr = ac.label_recall / std::max<uint64_t>(1, ac.label_n);
      const double lp = ac.label_precision / std::max<uint64_t>(1, ac.label_n);
      const double nh = ac.needles ? double(ac.needle_hits) / ac.needles : 0;
      const double p50 = Percentile(ac.latency_ms, 0.5), p99 = Percentile(ac.latency_ms, 0.99);
      std::printf("%-9llu %-13s %11.4f %12.4f %15.4f %11s %11.2f %11.2f\n",
                  static_cast<unsigned long long>(context), indexer::PolicyName(pol), mr, lr, lp,
                  ac.needles
                      ? (std::to_string(ac.needle_hits) + "/" + std::to_string(ac.needles)).c_str()
                      : "-",
                  p50, p99);
      char row[512];
      std::snprintf(
          row, sizeof(row),
          "{\"context\": %llu, \"policy\": \"%s\", \"budget\": %g, \"mass_recall\": %.6f, "
          "\"label_recall\": %.6f, \"label_precision\": %.6f, \"needle_hit\": %.6f, "
          "\"predict_p50_ms\": %.4f, \"predict_p99_ms\": %.4f}",
          static_cast<unsigned long long>(context), indexer::PolicyName(pol), o.budget, mr, lr, lp,
          nh, p50, p99);
      rows_json.push_back(row);
    }
    std::fflush(stdout);
  }
  if (!o.json.empty() && !WriteJsonRows(o.json, rows_json)) return 1;
  return 0;
}

}  // namespace fm::bench
