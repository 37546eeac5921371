// The adapter that connects a DecodeCore to remote kvstore replicas (pages spread by
// rendezvous hashing; UCX reads when the replicas offer them). Remote indexer replicas need
// none: an IndexerClient is an indexer::Indexer.
#pragma once

#include <memory>

#include "services/decode/decode_core.h"
#include "services/indexer/indexer_client.h"
#include "services/kvstore/kv_client.h"

namespace fm::decode {

std::unique_ptr<PageStore> RemotePageStore(ShardedKvClient* kv);

}  // namespace fm::decode
