"""The metal backend: WGSL compute shaders through wgpu — Metal on macOS, Vulkan elsewhere.

Importing this never fails: without wgpu or an adapter, ``BACKEND.info()`` says why.
"""

from __future__ import annotations

from .backend import MetalArray, MetalBackend

BACKEND = MetalBackend()


def run_bench(options: dict) -> None:
    """`python -m ferrum bench --backend metal`: µs per ferrum.mm call, with the memory floor
    (metal/bench.py; not named bench, which the submodule's import would replace)."""
    from .bench import run
    run(options)


__all__ = ["BACKEND", "MetalArray", "MetalBackend", "run_bench"]
