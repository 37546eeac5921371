#include "common/security.h"

#include <grpc/grpc_security_constants.h>

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace fm {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  std::ifstream f(path);
  if (!f)
    return absl::InvalidArgumentError(absl::StrCat("cannot read the ", what, " file ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool ValidName(const std::string& n) {
  if (n.empty()) return false;
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'))
      return false;
  return true;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsOptions& tls) {
  if (tls.cert.empty() != tls.key.empty())
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
  if (tls.cert.empty()) {
    if (!tls.ca.empty())
      return absl::InvalidArgumentError("--tls_ca on a server needs --tls_cert and --tls_key");
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions o(
      tls.ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                     : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  auto key = ReadPem(tls.key, "TLS key");
  if (!key.ok()) return key.status();
  auto cert = ReadPem(tls.cert, "TLS certificate");
  if (!cert.ok()) return cert.status();
  pair.private_key = *key;
  pair.cert_chain = *cert;
  o.pem_key_cert_pairs.push_back(pair);
  if (!tls.ca.empty()) {
    auto ca = ReadPem(tls.ca, "TLS CA");
    if (!ca.ok()) return ca.status();
    o.pem_root_certs = *ca;
  }
  return grpc::SslServerCredentials(o);
}

grpc::ChannelArguments ClientChannelArgs(int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  // gRPC core takes the "min reconnect backoff" as the shortest time a connection attempt
  // (TCP and TLS handshake) is given: a short one fails every handshake of a loaded peer.
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 5000);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return args;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsOptions& tls) {
  if (tls.cert.empty() != tls.key.empty())
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
  if (tls.ca.empty()) {
    if (!tls.cert.empty())
      return absl::InvalidArgumentError("a client certificate needs --tls_ca (the server's CA)");
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions o;
  auto ca = ReadPem(tls.ca, "TLS CA");
  if (!ca.ok()) return ca.status();
  o.pem_root_certs = *ca;
  if (!tls.cert.empty()) {
    auto key = ReadPem(tls.key, "TLS key");
    if (!key.ok()) return key.status();
    auto cert = ReadPem(tls.cert, "TLS certificate");
    if (!cert.ok()) return cert.status();
    o.pem_private_key = *key;
    o.pem_cert_chain = *cert;
  }
  return grpc::SslCredentials(o);
}

bool IsLoopbackHost(const std::string& host) {
  return host == "localhost" || host == "::1" || host == "[::1]" ||
         absl::StartsWith(host, "127.");
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(const AuthOptions& options) {
  std::unique_ptr<Authenticator> a(new Authenticator(options));
  if (options.tokens_file.empty()) return a;
  std::ifstream f(options.tokens_file);
  if (!f)
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read the tokens file ", options.tokens_file));
  std::string line;
  for (int n = 1; std::getline(f, line); ++n) {
    if (auto hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::vector<std::string> w = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (w.empty()) continue;
    if (w.size() < 2 || w.size() > 3 || !ValidName(w[1]) ||
        (w.size() == 3 && w[2] != "tenant" && w[2] != "service"))
      return absl::InvalidArgumentError(absl::StrCat(
          options.tokens_file, ":", n,
          ": expected \"<token> <name> [tenant|service]\" with a name of [A-Za-z0-9._-]"));
    if (!a->tokens_.emplace(w[0], Identity{w[1], w.size() == 3 && w[2] == "service"}).second)
      return absl::InvalidArgumentError(
          absl::StrCat(options.tokens_file, ":", n, ": a token given twice"));
  }
  if (a->tokens_.empty())
    return absl::InvalidArgumentError(
        absl::StrCat("the tokens file ", options.tokens_file, " names no token"));
  return a;
}

absl::StatusOr<Identity> Authenticator::Identify(const grpc::ServerContextBase& ctx) const {
  if (!enforcing()) return Identity{"", true};
  const auto& md = ctx.client_metadata();
  if (auto it = md.find("authorization"); it != md.end()) {
    absl::string_view v(it->second.data(), it->second.size());
    if (!absl::ConsumePrefix(&v, "Bearer "))
      return absl::UnauthenticatedError("the authorization metadata must be \"Bearer <token>\"");
    auto t = tokens_.find(std::string(v));
    if (t == tokens_.end()) return absl::UnauthenticatedError("unknown bearer token");
    return t->second;
  }
  if (options_.mtls) {
    if (auto auth = ctx.auth_context(); auth) {
      for (const auto& cn : auth->FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME)) {
        const std::string name(cn.data(), cn.size());
        for (const auto& s : options_.service_names)
          if (s == name) return Identity{name, true};
      }
    }
  }
  if (tokens_.empty()) return Identity{"", false};  // mTLS alone: a tenant's certificate
  return absl::UnauthenticatedError("a bearer token is required (authorization metadata)");
}

absl::StatusOr<Identity> Authenticator::RequireService(const grpc::ServerContextBase& ctx) const {
  auto who = Identify(ctx);
  if (!who.ok()) return who.status();
  if (!who->service)
    return absl::PermissionDeniedError(
        "this service serves the decode workers only (a service identity is required)");
  return who;
}

absl::StatusOr<Identity> Authenticator::RequireTenant(const grpc::ServerContextBase& ctx) const {
  if (tokens_.empty()) return Identity{"", false};
  auto who = Identify(ctx);
  if (!who.ok()) return who.status();
  if (who->service)
    return absl::PermissionDeniedError("a service identity opens no sessions: use a tenant token");
  return who;
}

std::string ScopedSessionId(const Identity& who, const std::string& id) {
  return who.name.empty() || who.service ? id : absl::StrCat(who.name, ":", id);
}

void AddBearerToken(grpc::ClientContext* ctx, const std::string& token) {
  if (!token.empty()) ctx->AddMetadata("authorization", absl::StrCat("Bearer ", token));
}

}  // namespace fm
