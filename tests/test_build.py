"""setup.py's reading of FERRUM_CUDA_ARCHS (its functions, loaded without running setup())."""

import ast
import os
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def _setup_functions() -> dict:
    tree = ast.parse(SETUP.read_text())
    keep = [node for node in tree.body
            if (isinstance(node, ast.FunctionDef) and node.name in ("_cuda_archs", "_gencode_flags"))
            or (isinstance(node, ast.Assign) and
                any(getattr(t, "id", "") == "DEFAULT_ARCHS" for t in node.targets))]
    namespace = {"os": os}
    exec(compile(ast.Module(keep, type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace


@pytest.fixture
def gencode(monkeypatch):
    functions = _setup_functions()

    def flags(value):
        if value is None:
            monkeypatch.delenv("FERRUM_CUDA_ARCHS", raising=False)
        else:
            monkeypatch.setenv("FERRUM_CUDA_ARCHS", value)
        return functions["_gencode_flags"]()
    return flags


def test_the_default_is_sm80_to_sm90a_plus_ptx(gencode):
    flags = gencode(None)
    for arch in ("80", "86", "89", "90a"):
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in flags
    assert flags[-1] == "-gencode=arch=compute_90,code=compute_90"


def test_one_architecture(gencode):
    assert gencode("90") == ["-gencode=arch=compute_90a,code=sm_90a", "-DFERRUM_HAVE_SM90A=1",
                             "-gencode=arch=compute_90,code=compute_90"]
    assert gencode("sm_86") == gencode("8.6") == ["-gencode=arch=compute_86,code=sm_86",
                                                   "-gencode=arch=compute_86,code=compute_86"]


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_value_is_the_default(gencode, blank):
    # It was "max() arg is an empty sequence" from deep inside the build.
    assert gencode(blank) == gencode(None)


@pytest.mark.parametrize("value,entry", [("abc", "abc"), ("90;compute_90", "compute_90"),
                                         ("75", "75")])
def test_a_bad_value_is_an_error_naming_the_variable(gencode, value, entry):
    # It was int()'s "invalid literal" (or, for 75, nvcc failing on the kernels' sm_80 code).
    with pytest.raises(ValueError, match=rf"^FERRUM_CUDA_ARCHS={value!r}: {entry!r} is not"):
        gencode(value)
