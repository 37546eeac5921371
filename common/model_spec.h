// Model spec and page layout arithmetic (DESIGN.md §1, §4, §6).
//
// Page payload layout: [layer][K|V][kv_head][token][head_dim] in the model dtype, always
// page_tokens tokens wide (a partial page leaves the tail tokens zero).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fm {

enum class DType : uint8_t { kFp32 = 1, kFp16 = 2, kBf16 = 3 };

// Bytes per element; 0 for an unknown value.
size_t DTypeSize(DType t);
const char* DTypeName(DType t);
// n page elements in dtype t from / to fp32 (bf16 and fp16 round to nearest even).
void StoreFloats(DType t, const float* in, uint8_t* out, size_t n);
void LoadFloats(DType t, const uint8_t* in, float* out, size_t n);
// Whether n page elements in dtype t are all finite (no NaN, no infinity).
bool AllFiniteElems(DType t, const uint8_t* in, size_t n);

// The longest history a session may hold: 16M tokens, 16 times the longest context the
// project targets (1M). Larger values are refused where a client names a length (a decode
// session's max_tokens, the indexer's tokens), before they size anything.
inline constexpr uint64_t kMaxSessionTokens = uint64_t{1} << 24;
// The longest cycle (decode steps between predictions) a session may ask for.
inline constexpr uint32_t kMaxTau = 1024;
absl::StatusOr<DType> ParseDType(const std::string& name);

struct ModelSpec {
  std::string name;         // label only; not hashed
  uint32_t layers = 0;      // L
  uint32_t q_heads = 0;     // Hq, multiple of kv_heads
  uint32_t kv_heads = 0;    // Hkv
  uint32_t head_dim = 0;    // d, multiple of 16 in [32, 256]
  float softmax_scale = 0;  // 0 = d^-1/2
  DType dtype = DType::kBf16;
  uint32_t page_tokens = 64;  // P
  uint32_t index_layers = 0;  // Li
  uint32_t index_heads = 0;   // Hi
  uint32_t index_dim = 0;     // di
  uint32_t chunk_tokens = 4;  // c
  uint32_t hidden_dim = 0;    // 0 = no hidden state input

  // OK, or INVALID_ARGUMENT naming the first offending field.
  absl::Status Validate() const;

  float Scale() const;
  // K and V of every layer for one token, in bytes.
  size_t KvBytesPerToken() const {
    return size_t{2} * layers * kv_heads * head_dim * DTypeSize(dtype);
  }
  // Payload bytes of one (full-width) page.
  size_t PageBytes() const { return KvBytesPerToken() * page_tokens; }
  // Elements of one [token][head_dim] block for one (layer, K|V, kv_head).
  size_t HeadBlockElems() const { return size_t{page_tokens} * head_dim; }
  // Element offset of (layer, kv: 0=K 1=V, kv_head, token) inside a page payload.
  size_t ElemOffset(uint32_t layer, uint32_t kv, uint32_t kv_head, uint32_t token) const {
    return ((size_t{layer} * 2 + kv) * kv_heads + kv_head) * HeadBlockElems() +
           size_t{token} * head_dim;
  }
  // Bytes of one compressed index key (di fp8 + fp32 scale).
  size_t IndexKeyBytes() const { return size_t{index_dim} + 4; }
  uint32_t ChunksPerPage() const { return page_tokens / chunk_tokens; }
  uint64_t PagesForTokens(uint64_t tokens) const {
    return (tokens + page_tokens - 1) / page_tokens;
  }
};

// Stable 64-bit hash of every shape field (not the name). Two specs with equal hashes
// produce byte-compatible pages.
uint64_t ModelSpecHash(const ModelSpec& spec);

// The specs of DESIGN.md §6: "tiny", "bench", "long".
absl::StatusOr<ModelSpec> PresetSpec(const std::string& name);

}  // namespace fm
