#include "common/spec_proto.h"

namespace fm {

ModelSpec SpecFromProto(const flashmemory::v1::ModelSpec& p) {
  ModelSpec s;
  s.name = p.name();
  s.layers = p.layers();
  s.q_heads = p.q_heads();
  s.kv_heads = p.kv_heads();
  s.head_dim = p.head_dim();
  s.softmax_scale = p.softmax_scale();
  s.dtype = static_cast<DType>(p.dtype());  // numbered alike; Validate rejects others
  s.page_tokens = p.page_tokens() ? p.page_tokens() : 64;
  s.index_layers = p.index_layers();
  s.index_heads = p.index_heads();
  s.index_dim = p.index_dim();
  s.chunk_tokens = p.chunk_tokens() ? p.chunk_tokens() : 4;
  s.hidden_dim = p.hidden_dim();
  return s;
}

void SpecToProto(const ModelSpec& s, flashmemory::v1::ModelSpec* p) {
  p->set_name(s.name);
  p->set_layers(s.layers);
  p->set_q_heads(s.q_heads);
  p->set_kv_heads(s.kv_heads);
  p->set_head_dim(s.head_dim);
  p->set_softmax_scale(s.softmax_scale);
  p->set_dtype(static_cast<flashmemory::v1::DType>(s.dtype));
  p->set_page_tokens(s.page_tokens);
  p->set_index_layers(s.index_layers);
  p->set_index_heads(s.index_heads);
  p->set_index_dim(s.index_dim);
  p->set_chunk_tokens(s.chunk_tokens);
  p->set_hidden_dim(s.hidden_dim);
}

}  // namespace fm
