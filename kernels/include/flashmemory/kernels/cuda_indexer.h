// CUDA versions of the indexer chunk scoring and the Quest page scores (same contracts as
// ScoreChunks and QuestPageScores). Every pointer is device memory, `keys` included (a
// device array of per-layer device pointers). Returns once the work is queued on `stream`
// (a cudaStream_t; null = default stream).
#pragma once

#include "flashmemory/kernels/indexer.h"
#include "flashmemory/kernels/quest.h"

namespace fm::kernels {

KernelStatus CudaScoreChunks(const IndexerShape& s, const float* q, const float* w,
                             const uint8_t* const* keys, uint64_t chunks, float* logits,
                             void* stream);
KernelStatus CudaQuestBounds(const AttentionShape& s, const uint8_t* page, uint32_t valid,
                             float* out, void* stream);
KernelStatus CudaQuestPageScores(const AttentionShape& s, uint32_t layer, const float* q,
                                 const float* bounds, uint64_t pages, float* score, void* stream);

}  // namespace fm::kernels
