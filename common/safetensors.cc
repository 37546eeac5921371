#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/codecs.h"

namespace fm {
namespace {

struct DTypeInfo {
  StDType t;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {StDType::kF32, "F32", 4}, {StDType::kF16, "F16", 2}, {StDType::kBF16, "BF16", 2},
    {StDType::kF64, "F64", 8}, {StDType::kU8, "U8", 1},   {StDType::kI8, "I8", 1},
    {StDType::kI32, "I32", 4}, {StDType::kI64, "I64", 8}, {StDType::kU16, "U16", 2},
    {StDType::kU32, "U32", 4}, {StDType::kU64, "U64", 8}};

bool ParseStDType(const std::string& s, StDType* out) {
  for (const auto& d : kDTypes)
    if (s == d.name) {
      *out = d.t;
      return true;
    }
  return false;
}

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

}  // namespace

size_t StDTypeSize(StDType t) {
  for (const auto& d : kDTypes)
    if (d.t == t) return d.size;
  return 0;
}

const char* StDTypeName(StDType t) {
  for (const auto& d : kDTypes)
    if (d.t == t) return d.name;
  return "?";
}

int64_t TensorView::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

void SafetensorsWriter::Add(const std::string& name, StDType dtype, std::vector<int64_t> shape,
                            const void* data) {
  entries_.push_back({name, dtype, std::move(shape), data});
}

absl::Status SafetensorsWriter::Write(const std::string& path,
                                      const std::map<std::string, std::string>& metadata) const {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const Entry& e : entries_) {
    int64_t n = 1;
    for (int64_t d : e.shape) n *= d;
    const uint64_t bytes = static_cast<uint64_t>(n) * StDTypeSize(e.dtype);
    header[e.name] = {{"dtype", StDTypeName(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr)
    return absl::UnavailableError(absl::StrCat("cannot create ", tmp, ": ", std::strerror(errno)));
  const uint64_t n = json.size();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(json.data(), 1, n, f) == n;
  for (const Entry& e : entries_) {
    int64_t cnt = 1;
    for (int64_t d : e.shape) cnt *= d;
    const size_t bytes = static_cast<size_t>(cnt) * StDTypeSize(e.dtype);
    if (ok && bytes > 0) ok = std::fwrite(e.data, 1, bytes, f) == bytes;
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::UnavailableError(absl::StrCat("cannot write ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return errno == ENOENT
               ? absl::NotFoundError(absl::StrCat(path, ": no such file"))
               : absl::InvalidArgumentError(absl::StrCat(path, ": ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_bytes_ = static_cast<size_t>(st.st_size);
  if (file->map_bytes_ < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": ", file->map_bytes_,
                                            " bytes, shorter than the 8-byte header length"));
  }
  void* m = ::mmap(nullptr, file->map_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) return absl::InvalidArgumentError(absl::StrCat(path, ": mmap failed"));
  file->map_ = m;
  const auto* p = static_cast<const uint8_t*>(m);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t{p[i]} << (8 * i);
  if (n > kMaxHeaderBytes || n > file->map_bytes_ - 8)
    return absl::DataLossError(absl::StrCat(path, ": header length ", n, " exceeds the file (",
                                            file->map_bytes_, " bytes) or 100 MiB"));
  nlohmann::json header =
      nlohmann::json::parse(p + 8, p + 8 + n, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  const uint8_t* data = p + 8 + n;
  const uint64_t data_bytes = file->map_bytes_ - 8 - n;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object())
        return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ is not an object"));
      for (auto m2 = it->begin(); m2 != it->end(); ++m2) {
        if (!m2->is_string())
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": metadata value of \"", m2.key(), "\" is not a string"));
        file->metadata_[m2.key()] = m2->get<std::string>();
      }
      continue;
    }
    const auto& e = *it;
    const std::string where = absl::StrCat(path, ": tensor \"", it.key(), "\"");
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") ||
        !e.contains("data_offsets") || !e["dtype"].is_string() || !e["shape"].is_array() ||
        !e["data_offsets"].is_array() || e["data_offsets"].size() != 2)
      return absl::InvalidArgumentError(absl::StrCat(where, " lacks dtype, shape or data_offsets"));
    TensorView v;
    if (!ParseStDType(e["dtype"].get<std::string>(), &v.dtype))
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": unsupported dtype ", e["dtype"].get<std::string>()));
    uint64_t elements = 1;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t{1} << 40))
        return absl::InvalidArgumentError(absl::StrCat(where, ": bad shape ", e["shape"].dump()));
      v.shape.push_back(d.get<int64_t>());
      elements *= d.get<uint64_t>();
      if (elements > (uint64_t{1} << 40))
        return absl::InvalidArgumentError(absl::StrCat(where, ": shape too large"));
    }
    const auto& off = e["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return absl::InvalidArgumentError(absl::StrCat(where, ": bad data_offsets"));
    const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    if (b > en || en > data_bytes)
      return absl::DataLossError(absl::StrCat(where, ": data_offsets [", b, ", ", en,
                                              ") outside the ", data_bytes, " data bytes"));
    if (en - b != elements * StDTypeSize(v.dtype))
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", en - b, " bytes for shape ",
                                                     ShapeString(v.shape), " of ",
                                                     StDTypeName(v.dtype)));
    v.data = data + b;
    v.bytes = en - b;
    file->tensors_[it.key()] = v;
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [k, v] : tensors_) out.push_back(k);
  return out;
}

absl::StatusOr<TensorView> SafetensorsFile::Get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor \"", name, "\""));
  return it->second;
}

absl::StatusOr<TensorView> SafetensorsFile::Get(const std::string& name, StDType dtype,
                                                const std::vector<int64_t>& shape) const {
  auto v = Get(name);
  if (!v.ok()) return v;
  bool shape_ok = shape.empty() || shape.size() == v->shape.size();
  for (size_t i = 0; shape_ok && !shape.empty() && i < shape.size(); ++i)
    shape_ok = shape[i] < 0 || shape[i] == v->shape[i];
  if (v->dtype != dtype || !shape_ok)
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor \"", name, "\" is ", StDTypeName(v->dtype), " ",
                     ShapeString(v->shape), "; expected ", StDTypeName(dtype),
                     shape.empty() ? "" : " ", shape.empty() ? "" : ShapeString(shape)));
  return v;
}

absl::StatusOr<std::vector<float>> SafetensorsFile::GetFloats(
    const std::string& name, const std::vector<int64_t>& shape) const {
  auto v = Get(name);
  if (!v.ok()) return v.status();
  if (v->dtype != StDType::kF32 && v->dtype != StDType::kF16 && v->dtype != StDType::kBF16)
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor \"", name, "\" is ",
                                                   StDTypeName(v->dtype),
                                                   "; expected F32, F16 or BF16"));
  auto checked = Get(name, v->dtype, shape);
  if (!checked.ok()) return checked.status();
  std::vector<float> out(static_cast<size_t>(v->elements()));
  for (size_t i = 0; i < out.size(); ++i) {
    if (v->dtype == StDType::kF32) {
      std::memcpy(&out[i], v->data + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, v->data + 2 * i, 2);
      out[i] = v->dtype == StDType::kF16 ? Fp16ToFloat(h) : Bf16ToFloat(h);
    }
  }
  return out;
}

}  // namespace fm
