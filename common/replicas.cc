#include "common/replicas.h"

#include <arpa/inet.h>
#include <netdb.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/checksum.h"

namespace fm {

size_t RendezvousPick(const std::vector<std::string>& replicas, const std::string& session_id,
                      uint64_t page) {
  std::string key = session_id;
  key.append(reinterpret_cast<const char*>(&page), sizeof(page));
  size_t best = 0;
  uint64_t best_w = 0;
  for (size_t i = 0; i < replicas.size(); ++i) {
    uint64_t w =
        Checksum64(key.data(), key.size(), Checksum64(replicas[i].data(), replicas[i].size()));
    if (i == 0 || w > best_w) {
      best_w = w;
      best = i;
    }
  }
  return best;
}

absl::StatusOr<std::vector<std::string>> ResolveReplicas(const std::string& spec) {
  std::vector<std::string> out;
  if (spec.rfind("dns:", 0) == 0) {
    std::string rest = spec.substr(4);
    size_t colon = rest.rfind(':');
    if (colon == std::string::npos)
      return absl::InvalidArgumentError("dns replica list needs dns:NAME:PORT");
    std::string name = rest.substr(0, colon), port = rest.substr(colon + 1);
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    int rc = getaddrinfo(name.c_str(), port.c_str(), &hints, &res);
    if (rc != 0)
      return absl::UnavailableError(absl::StrCat("cannot resolve ", name, ": ", gai_strerror(rc)));
    for (addrinfo* a = res; a; a = a->ai_next) {
      char host[INET6_ADDRSTRLEN];
      if (a->ai_family == AF_INET) {
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, host,
                  sizeof(host));
        out.push_back(absl::StrCat(host, ":", port));
      } else if (a->ai_family == AF_INET6) {
        inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, host,
                  sizeof(host));
        out.push_back(absl::StrCat("[", host, "]:", port));
      }
    }
    freeaddrinfo(res);
  } else {
    for (absl::string_view part : absl::StrSplit(spec, ',', absl::SkipEmpty()))
      out.emplace_back(part);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  if (out.empty()) return absl::InvalidArgumentError("empty replica list");
  return out;
}

}  // namespace fm
