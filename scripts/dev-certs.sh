#!/usr/bin/env bash
# Makes certificates for running Ordo with TLS on this machine (never for
# production): a CA, one certificate for every service (SAN localhost and
# 127.0.0.1, usable as server and as client, since every service is both),
# and a client certificate for `ordo`, grpcurl or your own client.
#
# Usage: scripts/dev-certs.sh [dir]   (default target/dev-certs; existing files are replaced)
# Then, for example:
#   export ORDO_TLS_CERT=$dir/service.pem ORDO_TLS_KEY=$dir/service-key.pem \
#          ORDO_TLS_CA=$dir/ca.pem ORDO_TLS_CLIENT_CA=$dir/ca.pem
#   just up
# (docs/configuration.md, "TLS", lists every flag.)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR="${1:-target/dev-certs}"
DAYS=825
command -v openssl >/dev/null 2>&1 || { echo "dev-certs: openssl is needed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"

# EC P-256 keys in PKCS#8, which every TLS stack involved (rustls, Go's for
# grpcurl, Redis's OpenSSL) reads.
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca-key.pem
openssl req -x509 -new -key ca-key.pem -sha256 -days "$DAYS" -subj "/CN=Ordo dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem

# leaf NAME CN EXTENSIONS: a key NAME-key.pem and a certificate NAME.pem signed by the CA.
leaf() {
  local name=$1 cn=$2 ext=$3
  key "$name-key.pem"
  openssl req -new -key "$name-key.pem" -subj "/CN=$cn" -out "$name.csr"
  printf '%b' "$ext" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$DAYS" -sha256 \
    -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

leaf service "ordo service" \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
leaf client "ordo client" \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
rm -f ca.srl
chmod 600 ./*-key.pem
echo "dev-certs: wrote $(pwd)/{ca,service,client}.pem and their -key.pem files" >&2
