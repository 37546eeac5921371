// Paged decode attention: one query token per (session, layer), GQA, over a set of resident
// pages held in a pool of page cells, plus the open partial page. fp32 accumulation with an
// online (numerically safe) softmax; returns the output and the log-sum-exp per query head
// so that partial results over page subsets can be merged (MergeAttentionStates).
//
// Layered as Params struct -> plan -> run (STYLE habits 7 and 9): the caller describes the
// batch once per cycle (BuildDecodePlan), then runs it for every layer of every step whose
// resident sets did not change. Kernels never include gRPC or service headers; they report
// a KernelStatus that the service turns into an absl::Status after validating shapes.
//
// Page payload layout (DESIGN §4): [layer][K|V][kv_head][token][head_dim], always
// page_tokens wide; a page's valid tokens are its first `valid` rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fm::kernels {

enum class ElemType : uint8_t { kF32 = 1, kF16 = 2, kBf16 = 3 };  // same values as fm::DType
size_t ElemSize(ElemType t);

enum class KernelStatus : int {
  kOk = 0,
  kInvalidShape = 1,   // a shape field is out of range (see the message)
  kEmptyPageList = 2,  // a sequence attends to no token
  kBadPageIndex = 3,   // a cell index or valid-token count is out of range
};
const char* KernelStatusName(KernelStatus s);

struct AttentionShape {
  uint32_t layers = 0;        // layers per page payload
  uint32_t q_heads = 0;       // Hq, a multiple of kv_heads
  uint32_t kv_heads = 0;      // Hkv
  uint32_t head_dim = 0;      // d: multiple of 16 in [32, 256]
  uint32_t page_tokens = 64;  // P
  ElemType dtype = ElemType::kBf16;
  float scale = 0;  // softmax scale; 0 = d^-1/2

  float Scale() const;
  size_t PageBytes() const {
    return size_t{2} * layers * kv_heads * page_tokens * head_dim * ElemSize(dtype);
  }
  // Element offset of the [token][head_dim] block of (layer, kv: 0=K 1=V, kv_head).
  size_t BlockElemOffset(uint32_t layer, uint32_t kv, uint32_t kv_head) const {
    return ((size_t{layer} * 2 + kv) * kv_heads + kv_head) * page_tokens * head_dim;
  }
  KernelStatus Validate(std::string* why) const;
};

// The pool of page cells: cell c's payload starts at base + c * cell_stride + cell_offset
// (cell_offset lets cells keep the kvstore's record header in front of the payload).
struct PagePool {
  const uint8_t* base = nullptr;
  size_t cell_stride = 0;
  size_t cell_offset = 0;
  uint32_t num_cells = 0;
};

// The pages one sequence attends to, in any order (softmax is order-free).
struct PageList {
  const uint32_t* cells = nullptr;  // cell index per page
  const uint16_t* valid = nullptr;  // valid tokens per page, 1..page_tokens
  uint32_t count = 0;
};

// One (sequence, layer) query of a batch.
struct DecodeItem {
  uint32_t seq = 0;  // index into the plan's page lists
  uint32_t layer = 0;
  const float* q = nullptr;  // [q_heads][head_dim]
  float* out = nullptr;      // [q_heads][head_dim]
  float* lse = nullptr;      // [q_heads] natural-log sum of exp(scale * q.k); may be null
};

// Work partition built once per cycle: units of (sequence, kv head, page range). Long page
// lists are split so that every thread gets work; split results are merged by LSE.
struct DecodePlan {
  AttentionShape shape;
  std::vector<PageList> seqs;
  struct Unit {
    uint32_t seq, kv_head, page_begin, page_end;
    int32_t partial;  // -1 = writes the final result; else index of its partial slot
    uint32_t pieces;  // units of its (sequence, KV head): 1 = not split; split ones own
                      // consecutive units and partial slots, in page order
  };
  std::vector<Unit> units;          // per item: the same units apply to every layer
  std::vector<uint32_t> seq_units;  // units of sequence q: [seq_units[q], seq_units[q + 1])
  uint32_t num_partials = 0;        // partial slots per item
  uint32_t num_threads = 1;         // threads the units were sized for
};

// Validates the shape and page lists against the pool and partitions the work.
KernelStatus BuildDecodePlan(const AttentionShape& shape, const std::vector<PageList>& seqs,
                             const PagePool& pool, uint32_t num_threads,
                             uint32_t min_pages_per_unit, DecodePlan* plan, std::string* why);

// Runs the plan for a batch of items (any sequences and layers of the plan). Thread-safe
// for concurrent calls with distinct outputs. CPU: SIMD with runtime dispatch
// (AVX-512 / AVX2 / SSE4 / scalar) on the kernel thread pool (one thread per core).
KernelStatus RunPagedDecode(const DecodePlan& plan, const PagePool& pool, const DecodeItem* items,
                            size_t n_items);

// Merges two partial attention states per head: (o_a, lse_a) and (o_b, lse_b) over disjoint
// token sets into (o, lse) over their union. Either may have lse = -inf (no tokens).
void MergeAttentionStates(uint32_t heads, uint32_t head_dim, const float* o_a, const float* lse_a,
                          const float* o_b, const float* lse_b, float* o, float* lse);

// The name of the SIMD target the CPU kernels dispatch to on this machine.
const char* CpuTargetName();

namespace reference {
// Plain loops, float: the ground truth for tests. Same contract as RunPagedDecode for one item.
KernelStatus PagedDecode(const AttentionShape& shape, const PagePool& pool, const PageList& pages,
                         uint32_t layer, const float* q, float* out, float* lse);
}  // namespace reference

}  // namespace fm::kernels
