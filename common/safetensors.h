// Safetensors (the ecosystem's tensor container) reader and writer: traces, dumps and
// indexer weights. Layout: u64 little-endian header length N, N bytes of JSON
// {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}},
// then the data (offsets relative to its start). Loads in Python with `safetensors` or
// with the NumPy reader in trainer/fm_trace.py.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fm {

enum class StDType : uint8_t { kF32, kF16, kBF16, kF64, kU8, kI8, kI32, kI64, kU16, kU32, kU64 };
size_t StDTypeSize(StDType t);
const char* StDTypeName(StDType t);  // "F32", "BF16", ...

struct TensorView {
  StDType dtype = StDType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // little-endian, row-major
  size_t bytes = 0;
  int64_t elements() const;
};

// Collects tensors (by reference: the caller keeps them alive until Write returns) and
// writes one file atomically (temporary file, then rename).
class SafetensorsWriter {
 public:
  void Add(const std::string& name, StDType dtype, std::vector<int64_t> shape, const void* data);
  template <typename T>
  void Add(const std::string& name, StDType dtype, std::vector<int64_t> shape,
           const std::vector<T>& v) {
    Add(name, dtype, std::move(shape), static_cast<const void*>(v.data()));
  }
  // A temporary would be gone before Write reads it.
  template <typename T>
  void Add(const std::string& name, StDType dtype, std::vector<int64_t> shape,
           std::vector<T>&& v) = delete;
  absl::Status Write(const std::string& path,
                     const std::map<std::string, std::string>& metadata) const;

 private:
  struct Entry {
    std::string name;
    StDType dtype;
    std::vector<int64_t> shape;
    const void* data;
  };
  std::vector<Entry> entries_;
};

// A safetensors file mapped read-only. Every header field is validated on open: a
// malformed file is INVALID_ARGUMENT (or DATA_LOSS when truncated), never a crash.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::vector<std::string> names() const;
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  // NOT_FOUND when absent; INVALID_ARGUMENT naming the expected and actual dtype/shape when
  // `shape` (if non-empty; -1 = any size) or `dtype` does not match.
  absl::StatusOr<TensorView> Get(const std::string& name) const;
  absl::StatusOr<TensorView> Get(const std::string& name, StDType dtype,
                                 const std::vector<int64_t>& shape = {}) const;
  // F32, F16 or BF16 tensor as fp32 values.
  absl::StatusOr<std::vector<float>> GetFloats(const std::string& name,
                                               const std::vector<int64_t>& shape = {}) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, TensorView> tensors_;
};

std::string ShapeString(const std::vector<int64_t>& shape);  // "[3, 16, 128]"

}  // namespace fm
