// Adapters that connect a DecodeCore to remote kvstore replicas (pages spread by rendezvous
// hashing; UCX reads when the replicas offer them) and indexer replicas (sessions placed by
// rendezvous hashing).
#pragma once

#include <memory>

#include "services/decode/decode_core.h"
#include "services/indexer/indexer_client.h"
#include "services/kvstore/kv_client.h"

namespace fm::decode {

std::unique_ptr<PageStore> RemotePageStore(ShardedKvClient* kv);
std::unique_ptr<Predictor> RemotePredictor(indexer::IndexerClient* ix);

}  // namespace fm::decode
