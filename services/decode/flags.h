// decode worker flags, shared by fm-decode and the all-in-one binary. Include only from
// main.cc.
#pragma once

#include <CLI/CLI.hpp>
#include <iterator>
#include <utility>

#include "common/metrics.h"
#include "services/decode/decode_core.h"

namespace fm::decode {

inline void AddDecodeFlags(CLI::App& app, DecodeOptions* o) {
  app.add_option("--reserve_bytes", o->reserve_bytes,
                 "Device reserve shared by all sessions (page cells)")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  app.add_option("--tau", o->tau,
                 "Decode steps per cycle (sessions may set their own); 0 = per session, the "
                 "smallest power of two at least 2.5 switch lags (8 to 64)")
      ->capture_default_str();
  app.add_option("--switch_lag", o->switch_lag,
                 "Steps after a cycle start at which its resident set takes over (sessions may "
                 "set their own); 0 = per session from its spec's costs")
      ->capture_default_str();
  app.add_option("--fetch_headroom", o->headroom,
                 "Share of a sparse session's predicted set freed at each cycle start (its "
                 "least wanted pages) for pages fetched while the previous set serves; the "
                 "set holds those cells between its switch and the next cycle start")
      ->capture_default_str();
  app.add_option("--catch_up_lag", o->catch_up_lag,
                 "Steps after a switch (or a catch-up) at which the next catch-up of a sparse "
                 "session's pages that did not fit serves; 0 = its switch lag, at most 2")
      ->capture_default_str();
  app.add_option("--catch_up_share", o->catch_up_share,
                 "Share of a sparse session's predicted set one catch-up (or the prediction "
                 "itself before its switch) fetches; <= 0 = an eighth per step of catch-up lag")
      ->capture_default_str();
  app.add_option("--trace_dir", o->trace_dir,
                 "Directory for the traces of trace-mode sessions (empty: refuse them)");
  app.add_option("--sink", o->sink, "Always-resident first pages")->capture_default_str();
  app.add_option("--tail", o->tail, "Always-resident last sealed pages")->capture_default_str();
  app.add_option("--max_batch_requests", o->max_batch_requests,
                 "Requests in one DecodeStream batch (more: RESOURCE_EXHAUSTED)")
      ->capture_default_str();
  app.add_option("--peer_retry_ms", o->peer_retry_ms,
                 "How long a prediction retries indexer calls and fetches that fail with "
                 "UNAVAILABLE (a peer restarting) before the cycle loses its prediction; the "
                 "cycle's switch step waits for it (0 = no retry)")
      ->capture_default_str();
  app.add_option("--refused_bytes_per_s", o->refused_bytes_per_s,
                 "Bytes of DecodeStream requests refused for the client's fault (unknown "
                 "sessions, malformed requests) that the worker answers per second, all "
                 "streams together, beyond a one-second burst; later ones are answered late "
                 "(0 = off)")
      ->capture_default_str();
  app.add_option("--max_decode_sessions", o->max_sessions, "Sessions a worker holds")
      ->capture_default_str();
  app.add_option("--miss_check", o->miss_check,
                 "Check every step for a wanted page that is not resident and fetch it at once")
      ->capture_default_str();
  app.add_option("--min_session_cells", o->min_session_cells,
                 "The fewest cells the footprint cap gives a sparse session with its own miss "
                 "check (up to all its pages): a short session's share is too few to serve a "
                 "step and the check's fetches")
      ->capture_default_str();
  app.add_option("--miss_sketch_rank", o->miss_sketch_rank,
                 "Rank of the key sketch that bounds pages before the session miss check "
                 "scores them exactly (0 = score every page its Quest box allows)")
      ->capture_default_str();
  app.add_option("--miss_ratio", o->miss_ratio,
                 "Miss check: fetch a page whose Quest bound exceeds this times the resident mass")
      ->capture_default_str();
}

// Exports the reserve's occupancy on the server's /metrics.
inline void AddDecodeMetrics(const DecodeCore* core, MetricsRegistry* metrics,
                             const PageStore* store = nullptr) {
  metrics->AddCollector([core, store](std::string* out) {
    if (store)
      AppendMetricFamily(out, "fm_decode_pages_read_in_place_total",
                         "Pages fetched straight into their reserve cells (UCX, no copy).",
                         "counter", {{"", double(store->pages_read_in_place())}});
    const ReserveStats r = core->Reserve();
    AppendMetricFamily(out, "fm_decode_sessions", "Decode sessions open.", "gauge",
                       {{"", double(r.sessions)}});
    AppendMetricFamily(out, "fm_decode_reserve_cells", "Page cells in the device reserve.", "gauge",
                       {{"", double(r.cells)}});
    AppendMetricFamily(out, "fm_decode_reserved_cells", "Cells reserved by admitted sessions.",
                       "gauge", {{"", double(r.reserved_cells)}});
    AppendMetricFamily(out, "fm_decode_used_cells", "Cells holding pages.", "gauge",
                       {{"", double(r.used_cells)}});
    const std::pair<const char*, const char*> counters[] = {
        {"fm_decode_steps_total", "Decode steps completed."},
        {"fm_decode_stalls_total", "Steps that waited for a fetch."},
        {"fm_decode_catch_up_stalls_total",
         "Of the stalls, steps that waited for a catch-up after a set change beyond the "
         "headroom."},
        {"fm_decode_predictions_total", "Resident-set predictions launched."},
        {"fm_decode_prediction_failures_total", "Predictions that failed (the set kept serving)."},
        {"fm_decode_pages_fetched_total", "Pages fetched by predictions and catch-ups."},
        {"fm_decode_surprise_fetches_total", "Pages fetched by the per-step miss check."},
        {"fm_decode_reregistrations_total", "Sessions given again to an indexer that lost them."},
        {"fm_decode_peer_retries_total",
         "Prediction calls and fetches retried while a kvstore or indexer was unavailable."}};
    const uint64_t values[] = {r.steps,         r.stalls,           r.catch_up_stalls,
                               r.predictions,   r.prediction_failures, r.fetched_pages,
                               r.surprise_fetches, r.reregistrations, r.peer_retries};
    for (size_t i = 0; i < std::size(values); ++i)
      AppendMetricFamily(out, counters[i].first, counters[i].second, "counter",
                         {{"", double(values[i])}});
    AppendMetricFamily(out, "fm_decode_stall_seconds_total",
                       "Time the stalled steps waited for their fetch.", "counter",
                       {{"", r.stall_us / 1e6}});
  });
}

}  // namespace fm::decode
