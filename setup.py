"""Build: the pure-Python package, plus the CUDA extension when a CUDA toolkit is found.

cpu/ and metal/ sit at the repository root, beside ferrum/, and install as ferrum.cpu and
ferrum.metal. FERRUM_NO_CUDA=1 skips the CUDA extension.

The CUDA extension (ferrum._cuda): csrc/*.cu compiled by nvcc for FERRUM_CUDA_ARCHS (default
"80;86;89;90", plus PTX of the newest for later GPUs), the Cython layer ferrum/_cuda.pyx
compiled by the host compiler, linked with the static CUDA runtime so that an installed ferrum
needs only the NVIDIA driver. Without nvcc (or Cython) the install still succeeds, pure Python;
ferrum.backends()["cuda"] then says why.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "80;86;89;90"


def _log(message):
    print(f"ferrum setup: {message}", file=sys.stderr)


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.exists(path):
            return os.path.realpath(path) if not path.startswith("/usr/local/bin") else path
    return None


def _cuda_home(nvcc):
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc); ask it where the toolkit is.
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        for line in out.splitlines():
            if "TOP=" in line:
                return os.path.normpath(line.split("TOP=", 1)[1].strip())
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _cuda_archs():
    """FERRUM_CUDA_ARCHS as compute capabilities ("80", "90"): entries separated by ";" or ",",
    each as "90", "sm_90", "sm_90a" or "9.0"; unset or blank, DEFAULT_ARCHS. An entry that is
    not a compute capability of 8.0 or newer (what the kernels need) is a ValueError naming the
    variable, before anything is compiled."""
    raw = os.environ.get("FERRUM_CUDA_ARCHS", "")
    archs = []
    for entry in (raw if raw.strip() else DEFAULT_ARCHS).replace(",", ";").split(";"):
        if not entry.strip():
            continue
        arch = entry.strip().replace("sm_", "").replace(".", "").rstrip("a")
        if not arch.isdigit() or int(arch) < 80:
            raise ValueError(f"FERRUM_CUDA_ARCHS={raw!r}: {entry.strip()!r} is not a compute "
                             f"capability of 8.0 or newer; give e.g. \"90\" or \"{DEFAULT_ARCHS}\"")
        archs.append(arch)
    return archs


def _gencode_flags():
    """nvcc -gencode flags for FERRUM_CUDA_ARCHS. Arch 90 (H100, H200) is built as sm_90a, the
    Hopper-only target whose wgmma instructions the many-row kernel (csrc/mm_wgmma.cu) uses;
    its machine code runs on compute capability 9.0 exactly, and the planner asks for 9.0
    before choosing that kernel. PTX of the newest arch, plain, serves later GPUs."""
    archs = _cuda_archs()
    flags = []
    for a in archs:
        target = "90a" if a == "90" else a
        flags.append(f"-gencode=arch=compute_{target},code=sm_{target}")
    if "90" in archs:
        flags.append("-DFERRUM_HAVE_SM90A=1")
    newest = max(archs, key=int)
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")   # PTX for later GPUs
    return flags


class BuildCuda(build_ext):
    """Compile csrc/*.cu with nvcc, then build the Cython extension against the objects."""

    def build_extension(self, ext):
        nvcc = _find_nvcc()
        objects = []
        build_dir = os.path.join(self.build_temp, "csrc")
        os.makedirs(build_dir, exist_ok=True)
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo",
                 "--expt-relaxed-constexpr", f"-I{os.path.join(ROOT, 'csrc')}"] + _gencode_flags()
        for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))):
            obj = os.path.join(build_dir, os.path.basename(source) + ".o")
            cmd = [nvcc, *flags, "-c", source, "-o", obj]
            _log(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(obj)
        ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extension(ext)


def cuda_extensions():
    if os.environ.get("FERRUM_NO_CUDA", "") not in ("", "0"):
        _log("FERRUM_NO_CUDA is set: building without the CUDA extension")
        return [], {}
    nvcc = _find_nvcc()
    if nvcc is None:
        _log("nvcc not found (set CUDA_HOME): building without the CUDA extension")
        return [], {}
    try:
        from Cython.Build import cythonize
    except ImportError:
        _log("Cython not found: building without the CUDA extension")
        return [], {}
    _cuda_archs()       # a bad FERRUM_CUDA_ARCHS stops the build here, not in nvcc
    home = _cuda_home(nvcc)
    lib_dirs = [d for d in (os.path.join(home, "lib64"), os.path.join(home, "lib"),
                            os.path.join(home, "targets", "x86_64-linux", "lib"),
                            os.path.join(home, "targets", "sbsa-linux", "lib"))
                if os.path.isdir(d)]
    ext = Extension(
        "ferrum._cuda",
        sources=["ferrum/_cuda.pyx"],
        include_dirs=[os.path.join(home, "include"), os.path.join(ROOT, "csrc")],
        library_dirs=lib_dirs,
        libraries=["cudart_static", "rt", "pthread", "dl"],
        language="c++",
        extra_compile_args=["-O2", "-std=c++17"],
        # The CUDA sources are linked in as objects (BuildCuda); listed here so that a rebuild in
        # a used tree relinks when they change (else build_ext finds the module up to date).
        # (Relative: setuptools takes depends as paths from the project root, where pip runs it.)
        depends=sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*"))),
    )
    return cythonize([ext], language_level=3, quiet=True), {"build_ext": BuildCuda}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=["ferrum", "ferrum.cpu", "ferrum.metal"],
    package_dir={"ferrum": "ferrum", "ferrum.cpu": "cpu", "ferrum.metal": "metal"},
    package_data={"ferrum.metal": ["*.wgsl"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
