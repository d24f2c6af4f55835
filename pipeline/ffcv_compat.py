"""Living with FFCV's side effect on torch: importing ffcv, building a ``Loader`` and starting an epoch all call
``torch.set_num_threads`` (``ffcv.pipeline.compiler.Compiler.set_num_threads``: 1 at import, the loader's
``num_workers`` later). Everything that touches FFCV goes through :func:`keep_torch_threads` (and imports it
through :func:`import_ffcv`), which puts the caller's intra-op thread count back.

    with keep_torch_threads():
        loader = Loader(...)

    threads = keep_torch_threads()      # captured now; put back by threads.restore() and on leaving ``with threads:``
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

# what the loaders use (pipeline.data.ffcv_loader, pipeline.data.ffcv_pipelines)
LOADER_MODULES = ("ffcv.fields.basics", "ffcv.fields.rgb_image", "ffcv.loader", "ffcv.pipeline.allocation_query",
                  "ffcv.pipeline.operation", "ffcv.reader", "ffcv.transforms")


class TorchThreads:
    """torch's intra-op thread count when this was made; :meth:`restore` sets it again. As a context manager
    (reusable: entering captures nothing) it restores on exit, also on errors."""

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()

    def restore(self) -> None:
        torch.set_num_threads(self.threads)

    def __enter__(self) -> TorchThreads:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"TorchThreads({self.threads})"


def keep_torch_threads() -> TorchThreads:
    """Capture torch's thread count now (see the module docstring)."""
    return TorchThreads()


def import_ffcv(modules: tuple[str, ...] = LOADER_MODULES) -> Any:
    """Import ffcv and ``modules`` (default: the loader's), restoring torch's intra-op thread count afterwards."""
    with keep_torch_threads():
        ffcv = importlib.import_module("ffcv")
        for name in modules:
            importlib.import_module(name)
    return ffcv


__all__ = ["LOADER_MODULES", "TorchThreads", "import_ffcv", "keep_torch_threads"]
