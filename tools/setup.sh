#!/usr/bin/env bash
# One-command set-up for a fresh machine (Debian + Python 3.11, root or sudo).
#   bash tools/setup.sh demo   install, then run `dmvae-scale demo` (every stage end to end on real data)
#   bash tools/setup.sh test   install, then run the test suite (what CI runs)
# Installs Debian's Fashion-MNIST, and into a virtual environment (.venv here, or the interpreter PYTHON names) the
# package with its pinned stack (torch/torchvision builds that import together, DeepSpeed without op builds); keeps
# JIT-compiled DeepSpeed ops in a cache so they compile once.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"; shift || true

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# Where to install: the interpreter PYTHON names, as it is; otherwise a virtual environment .venv in this checkout
# (a current Debian/Ubuntu system Python refuses pip installs outside one: PEP 668, "externally-managed-environment").
# The venv sees the base interpreter's packages (--system-site-packages), so a stack already installed there is reused
# and not downloaded again; whatever is missing or differs goes into the venv.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  VENV="${VENV:-.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv --system-site-packages "$VENV" 2>/dev/null; then  # Debian ships venv/ensurepip apart
      rm -rf "$VENV"
      $SUDO apt-get update -qq
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv --system-site-packages "$VENV"
    fi
  fi
  PY="$(cd "$VENV/bin" && pwd)/python"
fi
export PATH="$(dirname "$PY"):$PATH"  # dmvae-scale, ray and weed of this environment first (tests start them)
export DS_BUILD_OPS=0
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dmvae-scale/torch_extensions}"
stamp_dir="$HOME/.cache/dmvae-scale"; mkdir -p "$stamp_dir"
# One stamp per environment: the dependency list it was installed with.
stamp="$stamp_dir/installed-$("$PY" -c 'import sys; print(sys.prefix)' | sha256sum | cut -c1-16)"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || \
   ! "$PY" -c "import deepspeed, ray, streaming, s3fs, torch_fidelity, boto3, sklearn" 2>/dev/null; then
  # torch first, by exact version, so no other requirement can pull a different build.
  "$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
else
  # The stack is in place: only point the package (and the dmvae-scale command) at this checkout. Build isolation
  # brings its own setuptools and wheel (a venv's ensurepip setuptools cannot build an editable wheel without the
  # `wheel` package); without a package index, the environment's own build tools are tried.
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -e . || \
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
fi

case "$what" in
  test)
    exec "$PY" -m pytest "$@" ;;
  demo)
    exec "$(dirname "$PY")/dmvae-scale" demo "$@" ;;
  *)
    echo "usage: bash tools/setup.sh demo|test [args]" >&2; exit 2 ;;
esac
