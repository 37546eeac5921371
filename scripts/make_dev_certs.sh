#!/usr/bin/env bash
# Makes a CA and certificates for running FlashMemory with TLS on one machine or a dev
# cluster (openssl from Debian). Not for production: the CA key stays next to the certs.
#
#   bash scripts/make_dev_certs.sh DIR [NAME...]
#
# DIR/ca.pem, ca.key      the CA: give servers and clients --tls_ca DIR/ca.pem
# DIR/service.pem, .key   the services' certificate (common name fm-service, the default
#                         --service_names): servers' --tls_cert/--tls_key, and the decode
#                         workers' client certificate at the kvstore and indexer
# DIR/client.pem, .key    a client certificate (common name fm-client) for tenants' clients
#                         under mTLS; their tenant comes from their bearer token
# The service certificate names localhost, 127.0.0.1, ::1 and every NAME given (the DNS
# names clients dial, e.g. Kubernetes service names).
set -euo pipefail
dir=${1:?usage: make_dev_certs.sh DIR [NAME...]}
shift
mkdir -p "$dir"
cd "$dir"
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for n in "$@"; do san="$san,DNS:$n"; done
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=flashmemory-dev-ca" \
  -keyout ca.key -out ca.pem 2>/dev/null
make_cert() {  # name cn san
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' \
    "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
make_cert service fm-service "$san"
make_cert client fm-client "DNS:fm-client"
chmod 600 ./*.key
echo "wrote $(pwd)/{ca,service,client}.{pem,key}"
