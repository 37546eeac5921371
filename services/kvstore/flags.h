// kvstore flags, shared by fm-kvstore and the all-in-one binary. Include only from main.cc.
#pragma once

#include <CLI/CLI.hpp>

#include "services/kvstore/kv_store.h"

namespace fm {

inline void AddKvStoreFlags(CLI::App& app, KvStoreOptions* o) {
  app.add_option("--db", o->db_path, "RocksDB directory")->capture_default_str();
  app.add_option("--ram_bytes", o->ram_bytes, "RAM tier budget (e.g. 8GiB)")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  app.add_option("--max_page_bytes", o->max_page_bytes, "Largest page payload")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  app.add_option("--max_session_bytes", o->max_session_bytes,
                 "Durable bytes per session (0 = unlimited)")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  app.add_option("--closed_session_ttl", o->closed_session_ttl_s,
                 "Seconds a closed session's pages stay for a resume (0 = forever)")
      ->capture_default_str();
  app.add_option("--max_keys_per_call", o->max_keys_per_call, "Pages per Get/Resolve/Prefetch")
      ->capture_default_str();
  app.add_option("--default_lease_ms", o->default_lease_ms, "Lease when a request asks for 0")
      ->capture_default_str();
  app.add_option("--max_lease_ms", o->max_lease_ms, "Longest lease granted")->capture_default_str();
  app.add_option("--max_leases", o->max_leases, "Leases held at once, all clients")
      ->capture_default_str();
  app.add_option("--max_leases_per_client", o->max_leases_per_client,
                 "Leases one client (connection) holds at once")
      ->capture_default_str();
  app.add_option("--max_pinned_bytes_per_client", o->max_pinned_bytes_per_client,
                 "RAM bytes one client's leases pin (0 = half of --ram_bytes)")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  app.add_option("--slab_bytes", o->slab_bytes,
                 "Largest record cached in the RAM tier; larger ones are served from RocksDB")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  app.add_flag("--sync_writes", o->sync_writes,
               "fsync the WAL on every put (power-loss durability)");
  app.add_flag_callback(
      "--no_ucx", [o] { o->enable_ucx = false; }, "Serve the gRPC byte path only");
}

}  // namespace fm
