// A decode core's peers in the same process (services/decode/local_peers.cc): the
// all-in-one server's kvstore and indexer, tests and fuzzers. A separate library
// (fm_decode_local), so that the core itself does not link the kvstore's storage and
// transports.
#pragma once

#include <memory>

#include "services/decode/decode_core.h"

namespace fm {
class KvStore;
}

namespace fm::decode {

std::unique_ptr<PageStore> LocalPageStore(fm::KvStore* store);
std::unique_ptr<Predictor> LocalPredictor(indexer::IndexerCore* core);

}  // namespace fm::decode
