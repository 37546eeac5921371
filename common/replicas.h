// Replica lists and rendezvous placement, shared by the kvstore and indexer clients.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fm {

// Rendezvous (highest random weight) choice of a replica for a key: stable, and moving a
// replica in or out moves only the keys it gains or loses. The kvstore places pages by
// (session, page); the indexer places sessions by (session, kSessionKey).
inline constexpr uint64_t kSessionKey = ~uint64_t{0};
size_t RendezvousPick(const std::vector<std::string>& replicas, const std::string& session_id,
                      uint64_t page);

// Parses a replica list: "host:port,host:port" (static) or "dns:NAME:PORT" (every address
// NAME resolves to, e.g. a Kubernetes headless Service), sorted.
absl::StatusOr<std::vector<std::string>> ResolveReplicas(const std::string& spec);

}  // namespace fm
