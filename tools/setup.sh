#!/usr/bin/env bash
# One-command set-up for a fresh machine (Debian + Python 3.11, root or sudo).
#   bash tools/setup.sh demo   install, then run `dmvae-scale demo` (every stage end to end on real data)
#   bash tools/setup.sh test   install, then run the test suite (what CI runs)
# Installs Debian's Fashion-MNIST, the package with its pinned stack (torch/torchvision builds that import together,
# DeepSpeed without op builds), and keeps JIT-compiled DeepSpeed ops in a cache so they compile once.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"; shift || true

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY="${PYTHON:-python3}"
export DS_BUILD_OPS=0
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dmvae-scale/torch_extensions}"
stamp_dir="$HOME/.cache/dmvae-scale"; mkdir -p "$stamp_dir"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp_dir/installed" 2>/dev/null)" != "$want" ] || \
   ! "$PY" -c "import deepspeed, ray, streaming, s3fs, torch_fidelity, moto, sklearn" 2>/dev/null; then
  # torch first, by exact version, so no other requirement can pull a different build.
  "$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp_dir/installed"
else
  # The stack is in place: only point the package (and the dmvae-scale command) at this checkout.
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
fi

case "$what" in
  test)
    exec "$PY" -m pytest "$@" ;;
  demo)
    exec dmvae-scale demo "$@" ;;
  *)
    echo "usage: bash tools/setup.sh demo|test [args]" >&2; exit 2 ;;
esac
