#!/usr/bin/env bash
# Build the cluster image (cluster/Dockerfile) only from pinned inputs: the base image by its digest, the Python
# packages from the hash locks. Refuses, before docker runs, when one is missing.
#
#   RAY_IMAGE_DIGEST=sha256:<64 hex> cluster/build-image.sh -t <registry>/dmvae-scale:0.1.0 [docker build args]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
digest="${RAY_IMAGE_DIGEST:-}"
if ! [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
  echo "error: RAY_IMAGE_DIGEST: expected the base image's digest, sha256: and 64 hex digits, got '${digest}';" \
       "get it with: docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cu128" \
       "--format '{{json .Manifest.Digest}}'" >&2
  exit 2
fi
for lock in requirements.lock requirements-flash-attn.lock; do
  if [[ ! -s "$root/cluster/$lock" ]] || ! grep -q -- "--hash=sha256:" "$root/cluster/$lock"; then
    echo "error: cluster/$lock: missing or without hashes; generate it as cluster/README.md says" \
         "(pip-compile --generate-hashes ... cluster/${lock%.lock}.in, see the top of cluster/Dockerfile)" >&2
    exit 2
  fi
done
exec docker build -f "$root/cluster/Dockerfile" --build-arg "RAY_IMAGE_DIGEST=$digest" "$@" "$root"
