"""Shared test set-up: GPU tests skip cleanly without CUDA; torch uses few threads on the 2-core machines.

On a bare GPU machine (torch and pytest, none of the training stack: tools/gpu_check.py), a test module that imports
a missing package is not collected, and the header and summary name it; the modules that need torch alone run."""
import ast
import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

# What the full suite needs beyond torch and pytest (import names).
STACK = ("yaml", "numpy", "ray", "deepspeed", "streaming", "s3fs", "boto3", "safetensors", "PIL", "tqdm",
         "scipy", "sklearn", "torchvision", "torch_fidelity", "matplotlib")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a finder that refuses the name
        return False


MISSING = {name for name in STACK if not _importable(name)}
_TESTS = Path(__file__).resolve().parent
_uncollected: dict[str, list[str]] = {}


_PACKAGE = _TESTS.parent / "dmvae_scale"


def _package_of(path: Path) -> list[str]:
    """The dotted package a file of dmvae_scale lives in (for relative imports)."""
    rel = path.resolve().relative_to(_PACKAGE.parent).with_suffix("").parts
    return list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])


def _module_level_imports(tree: ast.Module, path: Path):
    """Module names imported when the module is imported (not those imported lazily inside functions)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if _PACKAGE not in path.resolve().parents:
                    continue
                base = _package_of(path)[:len(_package_of(path)) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []) +
                         [n for h in getattr(node, "handlers", []) for n in h.body])


def _source_of(module: str) -> list[Path]:
    """Files a module's import executes in this checkout: tests/helper.py, or dmvae_scale's package chain."""
    parts = module.split(".")
    if len(parts) == 1 and (_TESTS / f"{module}.py").is_file():
        return [_TESTS / f"{module}.py"]
    if parts[0] != "dmvae_scale":
        return []
    files, here = [], _PACKAGE
    for part in parts[1:] + [None]:
        if (here / "__init__.py").is_file():
            files.append(here / "__init__.py")
        if part is None:
            break
        if (here / f"{part}.py").is_file():
            files.append(here / f"{part}.py")
            break
        here = here / part
    return files


def _needs(path: Path, seen: set[Path]) -> set[str]:
    """Third-party packages that importing `path` imports, following this checkout's own modules."""
    if path in seen or not path.is_file():
        return set()
    seen.add(path)
    names: set[str] = set()
    for mod in _module_level_imports(ast.parse(path.read_text()), path):
        names.add(mod.split(".")[0])
        for source in _source_of(mod):
            names |= _needs(source, seen)
    return names


def pytest_ignore_collect(collection_path, config):
    if not MISSING or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    lacking = sorted(_needs(Path(collection_path), set()) & MISSING)
    if lacking:
        _uncollected[collection_path.name] = lacking
        return True
    return None


def pytest_report_header(config):
    if MISSING:
        return [f"bare machine: {', '.join(sorted(MISSING))} missing; test modules that import them are not "
                f"collected (named in the summary)"]
    return []


def pytest_terminal_summary(terminalreporter):
    for name, lacking in sorted(_uncollected.items()):
        terminalreporter.write_line(f"not collected: {name} (needs {', '.join(lacking)})")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); run tools/gpu_check.sh where one is lent")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# Shared servers, defined here once so every module shares them: a SeaweedFS S3 server on 127.0.0.1 (session) and a
# fresh bucket per test (tests/s3_server.py); one loopback Ray cluster with token auth (session) and a driver connected
# to it per module (tests/ray_cluster.py).
if not MISSING & {"boto3", "s3fs"}:
    from s3_server import s3_bucket, s3_server  # noqa: E402,F401
if "ray" not in MISSING:
    from ray_cluster import ray_cluster, ray_driver  # noqa: E402,F401


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory):
    """A small ImageNet-style tree of real JPEG/PNG files (Fashion-MNIST pixels, tinted and resized to odd sizes):
    root/{train,val}/<wnid>/<file>, 3 classes; train also holds one truncated (corrupt) JPEG. Returns
    (root, {"corrupt": path})."""
    import numpy as np
    from PIL import Image

    from dmvae_scale.data.builtin import load_fashion_mnist

    root = tmp_path_factory.mktemp("imagenet")
    images, _ = load_fashion_mnist("test")
    wnids = ["n01440764", "n01443537", "n01484850"]
    rng = np.random.default_rng(0)
    k = 0
    for split, per_class in (("train", 5), ("val", 2)):
        for wnid in wnids:
            d = root / split / wnid
            d.mkdir(parents=True)
            for j in range(per_class):
                gray = images[k]
                k += 1
                tint = rng.uniform(0.5, 1.0, 3)
                rgb = (gray[..., None] * tint).astype(np.uint8)
                size = (int(rng.integers(36, 60)), int(rng.integers(36, 60)))
                img = Image.fromarray(rgb).resize(size, Image.BILINEAR)
                if j == 0:
                    img.save(d / f"{wnid}_{j:05d}.png")
                else:
                    img.save(d / f"{wnid}_{j:05d}.JPEG", quality=90)
    good = (root / "train" / wnids[1] / f"{wnids[1]}_00001.JPEG").read_bytes()
    corrupt = root / "train" / wnids[1] / f"{wnids[1]}_99999.JPEG"
    corrupt.write_bytes(good[: len(good) // 2])  # truncated mid-scan: opens, fails to decode
    return root, {"corrupt": str(corrupt)}
