// A decode core's kvstore in the same process (services/decode/local_peers.cc): the
// all-in-one server's, tests' and fuzzers' (an in-process indexer is an IndexerCore, which
// a decode core takes as it is). A separate library
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

}  // namespace fm::decode
