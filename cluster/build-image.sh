#!/usr/bin/env bash
# Build the cluster image (cluster/Dockerfile) only from pinned inputs: the base image by tag and digest, the Python
# packages from the hash locks, the EFA installer by version and sha256. Refuses, before docker runs, when one is
# missing.
#
#   cluster/build-image.sh --record-pins    # once, from a machine you trust: writes cluster/image-pins.env
#   cluster/build-image.sh -t <registry>/dmvae-scale:0.1.0 [docker build args, e.g. --build-arg WITH_EFA=0]
#
# --record-pins asks the registry for the digest of the base image's tag (docker buildx imagetools inspect) and
# downloads the EFA installer tarball of the Dockerfile's EFA_INSTALLER_VERSION to take its sha256; it writes both to
# cluster/image-pins.env (commit that file: every later build uses the same bytes). RAY_IMAGE_DIGEST and
# EFA_INSTALLER_SHA256 in the environment take precedence over the file.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dockerfile="$root/cluster/Dockerfile"
pins="$root/cluster/image-pins.env"
ray_image="$(sed -n 's/^ARG RAY_IMAGE=//p' "$dockerfile")"
efa_version="$(sed -n 's/^ARG EFA_INSTALLER_VERSION=//p' "$dockerfile")"

if [[ "${1:-}" == "--record-pins" ]]; then
  digest="$(docker buildx imagetools inspect "$ray_image" --format '{{json .Manifest.Digest}}' | tr -d '"')"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  curl -fsSL --retry 3 -o "$tmp/efa.tar.gz" "https://efa-installer.amazonaws.com/aws-efa-installer-${efa_version}.tar.gz"
  efa_sha="$(sha256sum "$tmp/efa.tar.gz" | cut -d' ' -f1)"
  {
    echo "# Recorded by cluster/build-image.sh --record-pins on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# base image ${ray_image}; EFA installer ${efa_version}"
    echo "RAY_IMAGE_DIGEST=${digest}"
    echo "EFA_INSTALLER_SHA256=${efa_sha}"
  } > "$pins"
  echo "recorded $pins: RAY_IMAGE_DIGEST=${digest} EFA_INSTALLER_SHA256=${efa_sha}"
  exit 0
fi

file_value() {  # the value of KEY in image-pins.env, empty when the file or the key is missing
  [[ -f "$pins" ]] && sed -n "s/^$1=//p" "$pins" | tail -n 1 || true
}
digest="${RAY_IMAGE_DIGEST:-$(file_value RAY_IMAGE_DIGEST)}"
efa_sha="${EFA_INSTALLER_SHA256:-$(file_value EFA_INSTALLER_SHA256)}"
if ! [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
  echo "error: RAY_IMAGE_DIGEST: expected the base image's digest, sha256: and 64 hex digits, got '${digest}';" \
       "record it with: cluster/build-image.sh --record-pins (docker buildx imagetools inspect ${ray_image})" >&2
  exit 2
fi
with_efa=1
for arg in "$@"; do
  [[ "$arg" == "WITH_EFA=0" ]] && with_efa=0
done
if [[ "$with_efa" == 1 ]] && ! [[ "$efa_sha" =~ ^[0-9a-f]{64}$ ]]; then
  echo "error: EFA_INSTALLER_SHA256: expected 64 hex digits (the aws-efa-installer-${efa_version}.tar.gz sha256)," \
       "got '${efa_sha}'; record it with: cluster/build-image.sh --record-pins, or build without EFA:" \
       "--build-arg WITH_EFA=0" >&2
  exit 2
fi
for lock in requirements.lock requirements-flash-attn.lock; do
  if [[ ! -s "$root/cluster/$lock" ]] || ! grep -q -- "--hash=sha256:" "$root/cluster/$lock"; then
    echo "error: cluster/$lock: missing or without hashes; generate it as cluster/README.md says" \
         "(pip-compile --generate-hashes ... cluster/${lock%.lock}.in, see the top of cluster/Dockerfile)" >&2
    exit 2
  fi
done
exec docker build -f "$dockerfile" --build-arg "RAY_IMAGE_DIGEST=$digest" --build-arg "EFA_INSTALLER_SHA256=$efa_sha" \
  "$@" "$root"
