// Transport security and identities of the FlashMemory services.
//
// TLS. A server with --tls_cert/--tls_key serves TLS; with --tls_ca as well it requires
// every client to present a certificate signed by that CA (mTLS). A client with --tls_ca
// verifies the server against it, and presents --tls_cert/--tls_key when given. A server
// that listens on a non-loopback address without TLS needs --insecure (and logs it).
//
// Identities. A caller is a tenant or a service:
//   - a bearer token (metadata "authorization: Bearer <token>") found in --tokens_file,
//     whose lines are "<token> <name> [tenant|service]" ('#' starts a comment);
//   - else, under mTLS, a client certificate whose common name is in --service_names is
//     that service.
// Without a tokens file and without mTLS every caller is the default tenant (name "") and
// a service: a single-user deployment, as before.
//
// What each may do (enforced by the services):
//   - decode: a tenant's sessions are its own; their ids are scoped by the tenant's name
//     (ScopedSessionId), so another tenant gets NOT_FOUND for them, as for an id nobody
//     uses. With a tokens file every call needs a tenant token.
//   - kvstore, indexer: service identities only (the decode workers), once a tokens file
//     or mTLS is configured.
#pragma once

#include <grpcpp/grpcpp.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fm {

struct TlsOptions {
  std::string cert, key, ca;  // PEM file paths
  bool server_tls() const { return !cert.empty(); }
};

// The channel arguments of every FlashMemory client: message size limits both ways, and a
// reconnect backoff of 100 ms growing to at most 1 s (each attempt given 5 s to connect).
// gRPC's default backoff grows to 120 s, so a
// peer that restarted twice could stay unreachable from a client for minutes after it is
// back; a cluster's services restart in about a second.
grpc::ChannelArguments ClientChannelArgs(int max_message_bytes);

// Server credentials: TLS when cert and key are given (client certificates required and
// verified when ca is given too), else insecure. INVALID_ARGUMENT for a half-given pair or an
// unreadable file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsOptions& tls);
// Channel credentials: TLS when ca is given (plus the client certificate when cert and key
// are), else insecure.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsOptions& tls);

// Whether a listen address is loopback only (127.0.0.0/8, ::1, localhost).
bool IsLoopbackHost(const std::string& host);

struct Identity {
  std::string name;  // tenant or service name; "" = the default tenant
  bool service = false;
};

struct AuthOptions {
  std::string tokens_file;
  std::vector<std::string> service_names = {"fm-service"};  // mTLS common names of services
  bool mtls = false;  // the server requires client certificates (set from TlsOptions)
};

class Authenticator {
 public:
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(const AuthOptions& options);
  // Whether identities are checked at all (a tokens file or mTLS).
  bool enforcing() const { return !tokens_.empty() || options_.mtls; }
  // The caller of a call: UNAUTHENTICATED for an unknown token.
  absl::StatusOr<Identity> Identify(const grpc::ServerContextBase& ctx) const;
  // The caller, who must be a service (kvstore and indexer RPCs): UNAUTHENTICATED when it
  // presents nothing, PERMISSION_DENIED for a tenant.
  absl::StatusOr<Identity> RequireService(const grpc::ServerContextBase& ctx) const;
  // The caller, who must be a tenant (decode RPCs): with a tokens file, a tenant token is
  // required (UNAUTHENTICATED without one, PERMISSION_DENIED for a service token).
  absl::StatusOr<Identity> RequireTenant(const grpc::ServerContextBase& ctx) const;

 private:
  explicit Authenticator(AuthOptions o) : options_(std::move(o)) {}
  AuthOptions options_;
  std::map<std::string, Identity> tokens_;
};

// The id under which a tenant's session lives in the cluster: "<tenant>:<id>" (tenant
// names hold no ':'), the id itself for the default tenant.
std::string ScopedSessionId(const Identity& who, const std::string& id);

// What a client presents: TLS files (tls.ca to verify servers; cert and key for mTLS) and a
// bearer token (empty = none).
struct ClientSecurity {
  TlsOptions tls;
  std::string token;
};

// Adds "authorization: Bearer <token>" to a client call when token is not empty.
void AddBearerToken(grpc::ClientContext* ctx, const std::string& token);

}  // namespace fm
