// libFuzzer target: the saved decode state of a session (the kStatePage record), as a resume
// reads it back from the kvstore. For any bytes, DecodeCore::Open(resume) answers OK or an
// error and never crashes or reads outside its buffers; a session it restores steps (or
// refuses the step) and closes. Seed: the state of a real session (fuzz/corpus/decode_state).
#include <cstdint>
#include <string>

#include "common/checksum.h"
#include "fuzz/fuzz_world.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fm::fuzz::World& w = fm::fuzz::TheWorld();
  fm::PageHeaderData h = w.state_header;
  h.payload_bytes = size;
  h.checksum = fm::Checksum64(data, size);
  if (!w.store.Put(h, data).ok()) __builtin_trap();
  fm::decode::SessionOptions so = w.options;
  so.resume = true;
  if (!w.core->Open("s", so).ok()) return 0;
  auto stats = w.core->Stats("s");
  if (!stats.ok()) __builtin_trap();  // restored and not visible
  fm::replay::StepSource src(*w.g, "s", 16);
  const uint64_t step = stats->next_step;
  if (step < w.g->config().steps) {
    std::vector<std::vector<float>> buffers;
    const flashmemory::v1::LayerRequest req = src.Request(static_cast<uint32_t>(step), 0, 1);
    const auto steps = fm::fuzz::StepsOf(w, "s", req, &buffers);
    (void)w.core->Step(steps);
  }
  if (!w.core->Close("s", false, false).ok()) __builtin_trap();  // no save: keep the input's
  return 0;
}
