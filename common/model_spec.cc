#include "common/model_spec.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/codecs.h"

namespace fm {

void StoreFloats(DType t, const float* in, uint8_t* out, size_t n) {
  if (t == DType::kFp32) {
    std::memcpy(out, in, n * 4);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = t == DType::kBf16 ? FloatToBf16(in[i]) : FloatToFp16(in[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

void LoadFloats(DType t, const uint8_t* in, float* out, size_t n) {
  if (t == DType::kFp32) {
    std::memcpy(out, in, n * 4);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    out[i] = t == DType::kBf16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
  }
}

bool AllFiniteElems(DType t, const uint8_t* in, size_t n) {
  if (t == DType::kFp32) {
    for (size_t i = 0; i < n; ++i) {
      uint32_t b;
      std::memcpy(&b, in + 4 * i, 4);
      if ((b & 0x7f800000u) == 0x7f800000u) return false;
    }
    return true;
  }
  const uint16_t exp = t == DType::kBf16 ? 0x7f80 : 0x7c00;  // all-ones exponent: NaN or inf
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    if ((h & exp) == exp) return false;
  }
  return true;
}

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kFp32:
      return 4;
    case DType::kFp16:
      return 2;
    case DType::kBf16:
      return 2;
  }
  return 0;
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kFp32:
      return "fp32";
    case DType::kFp16:
      return "fp16";
    case DType::kBf16:
      return "bf16";
  }
  return "unknown";
}

absl::StatusOr<DType> ParseDType(const std::string& name) {
  if (name == "fp32" || name == "float32") return DType::kFp32;
  if (name == "fp16" || name == "float16") return DType::kFp16;
  if (name == "bf16" || name == "bfloat16") return DType::kBf16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype \"", name, "\"; want fp32, fp16 or bf16"));
}

absl::Status ModelSpec::Validate() const {
  auto bad = [](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("model spec: ", parts...));
  };
  if (layers == 0 || layers > 1024) return bad("layers must be in [1, 1024], got ", layers);
  if (kv_heads == 0 || kv_heads > 1024) return bad("kv_heads must be in [1, 1024], got ", kv_heads);
  if (q_heads == 0 || q_heads % kv_heads != 0 || q_heads > 4096)
    return bad("q_heads must be a positive multiple of kv_heads (", kv_heads, "), got ", q_heads);
  if (head_dim < 32 || head_dim > 256 || head_dim % 16 != 0)
    return bad("head_dim must be a multiple of 16 in [32, 256], got ", head_dim);
  if (DTypeSize(dtype) == 0) return bad("dtype must be fp32, fp16 or bf16");
  if (!(softmax_scale >= 0) || !std::isfinite(softmax_scale))
    return bad("softmax_scale must be finite and >= 0 (0 = d^-1/2), got ", softmax_scale);
  if (page_tokens == 0 || page_tokens > 4096)
    return bad("page_tokens must be in [1, 4096], got ", page_tokens);
  if (chunk_tokens == 0 || page_tokens % chunk_tokens != 0)
    return bad("chunk_tokens must divide page_tokens (", page_tokens, "), got ", chunk_tokens);
  if (index_layers > 0) {
    if (index_heads == 0) return bad("index_heads must be > 0 when index_layers > 0");
    if (index_dim < 64 || index_dim % 16 != 0 || index_dim > 1024)
      return bad("index_dim must be a multiple of 16 in [64, 1024], got ", index_dim);
  }
  return absl::OkStatus();
}

float ModelSpec::Scale() const {
  return softmax_scale > 0 ? softmax_scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

uint64_t ModelSpecHash(const ModelSpec& s) {
  uint32_t scale_bits;
  float scale = s.Scale();
  static_assert(sizeof(scale_bits) == sizeof(scale));
  __builtin_memcpy(&scale_bits, &scale, 4);
  const uint32_t fields[] = {s.layers,      s.q_heads,      s.kv_heads,
                             s.head_dim,    scale_bits,     static_cast<uint32_t>(s.dtype),
                             s.page_tokens, s.index_layers, s.index_heads,
                             s.index_dim,   s.chunk_tokens, s.hidden_dim};
  return Checksum64(fields, sizeof(fields));
}

absl::StatusOr<ModelSpec> PresetSpec(const std::string& name) {
  ModelSpec s;
  s.name = name;
  if (name == "tiny") {
    s.layers = 2;
    s.q_heads = 4;
    s.kv_heads = 2;
    s.head_dim = 64;
    s.dtype = DType::kFp32;
    s.index_layers = 1;
    s.index_heads = 4;
    s.index_dim = 64;
    s.hidden_dim = 256;
  } else if (name == "bench") {
    s.layers = 4;
    s.q_heads = 32;
    s.kv_heads = 8;
    s.head_dim = 128;
    s.dtype = DType::kBf16;
    s.index_layers = 3;
    s.index_heads = 16;
    s.index_dim = 128;
    s.hidden_dim = 1024;
  } else if (name == "long") {
    s.layers = 2;
    s.q_heads = 8;
    s.kv_heads = 2;
    s.head_dim = 128;
    s.dtype = DType::kBf16;
    s.index_layers = 3;
    s.index_heads = 8;
    s.index_dim = 128;
    s.hidden_dim = 512;
  } else {
    return absl::NotFoundError(
        absl::StrCat("unknown model spec preset \"", name, "\"; want tiny, bench or long"));
  }
  return s;
}

}  // namespace fm
