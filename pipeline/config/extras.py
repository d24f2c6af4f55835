"""Optional extras of the project: whether FFCV (``pip install -e .[ffcv]``) is installed, and what to do if not.

FFCV compiles against the system libraries opencv4 and libturbojpeg, so ``make setup`` installs it only where
pkg-config finds them (``scripts/ffcv_extra.sh``). Everything that needs FFCV checks :func:`ffcv_installed` before
it starts and reports :data:`FFCV_MISSING` in one line; the WebDataset path never imports ffcv.
"""
from __future__ import annotations

import importlib.util

FFCV_MISSING = ("the ffcv package is not installed (an optional extra: `make setup` installs it where pkg-config "
                "finds opencv4 and libturbojpeg; scripts/ffcv_extra.sh says what is missing)")


def ffcv_installed() -> bool:
    """True when ``import ffcv`` can find the package (found without importing it: ffcv's import compiles numba
    code for seconds and changes torch's thread count)."""
    try:
        return importlib.util.find_spec("ffcv") is not None
    except (ImportError, ValueError):
        return False


__all__ = ["FFCV_MISSING", "ffcv_installed"]
