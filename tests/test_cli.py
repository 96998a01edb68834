"""The command line: info lists every backend; check validates and exits non-zero on failure."""

import importlib
import subprocess
import sys

import numpy as np
import pytest

import ferrum
from ferrum import _registry
from ferrum.check import Result, format_table, random_problem


def run(*args):
    return subprocess.run([sys.executable, "-m", "ferrum", *args], capture_output=True, text=True,
                          timeout=600)


def test_info_lists_every_backend():
    done = run("info")
    assert done.returncode == 0, done.stderr
    for name in ("cpu", "cuda", "metal"):
        assert f"  {name} " in done.stdout


def test_check_on_cpu_passes_and_prints_a_table():
    done = run("check", "--backend", "cpu", "--quick")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "K512 N256 G128 act" in done.stdout and "exact" in done.stdout
    assert " 0 failed" in done.stdout


def test_crosscheck_from_python_returns_results():
    results = ferrum.crosscheck(["cpu"], quick=True, m_values=(1, 17))
    assert results and all(r.passed for r in results)
    assert {r.op for r in results} >= {"repack", "mm M=1", "mm M=17"}


def test_a_failing_result_is_reported():
    bad = Result("cpu", "K128 N64 G-1", "mm M=1", 0.5, 0.5, False)
    assert "FAIL mm M=1" in format_table([bad])


def test_bench_refuses_an_unavailable_backend():
    for name, info in ferrum.backends().items():
        if not info.available:
            done = run("bench", "--backend", name)
            assert done.returncode == 2 and "not available" in done.stdout


def test_check_refuses_a_named_backend_it_cannot_run():
    # Named explicitly, a backend that is not available fails the check instead of vanishing.
    for name, info in ferrum.backends().items():
        if not info.available:
            done = run("check", "--backend", name, "--quick")
            assert done.returncode == 2 and "not available" in done.stdout, done.stdout
            with pytest.raises(ValueError, match="not available"):
                ferrum.crosscheck([name], quick=True)


def test_crosscheck_takes_one_name_as_a_string():
    results = ferrum.crosscheck("cpu", quick=True, m_values=(3,))
    assert results and {r.backend for r in results} == {"cpu"} and all(r.passed for r in results)


def test_bench_takes_one_backend():
    done = run("bench", "--backend", "cpu", "--backend", "cpu", "--quick")
    assert done.returncode == 2 and "one backend at a time" in done.stdout


@pytest.mark.parametrize("command", ["check", "bench"])
def test_a_negative_seed_is_a_usage_error_not_a_traceback(command):
    done = run(command, "--backend", "cpu", "--quick", "--seed", "-5")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--seed" in done.stderr and "non-negative" in done.stderr
    assert "Traceback" not in done.stderr


def test_crosscheck_arguments_are_checked_before_any_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("crosscheck started before checking its arguments")
    monkeypatch.setattr(ferrum.check, "problems", no_work)
    for kwargs, exc, argument in [
            (dict(backends=5), TypeError, "backends"), (dict(backends=["cpu", "gpu"]), ValueError, "backends"),
            (dict(seed=-1), ValueError, "seed"), (dict(seed="x"), TypeError, "seed"),
            (dict(seed=True), TypeError, "seed"),   # a bool is not an integer here, as in mm
            (dict(m_values=[0]), ValueError, "m_values"), (dict(m_values=[-3]), ValueError, "m_values"),
            (dict(m_values=[1.5]), TypeError, "m_values"), (dict(m_values=4), TypeError, "m_values"),
            (dict(m_values=[]), ValueError, "m_values"), (dict(log=5), TypeError, "log"),
            (dict(quick=np.array([True, False])), TypeError, "quick"),
            (dict(quick="yes"), TypeError, "quick"), (dict(backends=[5]), TypeError, "backends"),
            # 0-d arrays have __iter__ but cannot be iterated
            (dict(m_values=np.array(4)), TypeError, "m_values"),
            (dict(backends=np.array("cpu")), TypeError, "backends")]:
        with pytest.raises(exc, match=rf"^{argument}="):
            ferrum.crosscheck(**kwargs)


def test_crosscheck_takes_a_seed_as_any_integer_argument(monkeypatch):
    # As expert= and m_values do: a numpy integer or a 0-d integer array is the integer.
    seen = []
    monkeypatch.setattr(ferrum.check, "problems",
                        lambda rng, quick: seen.append(rng.integers(1 << 30)) or [])
    for seed in (3, np.int64(3), np.array(3), np.array(3, np.uint8)):
        ferrum.crosscheck("cpu", seed=seed, quick=True)
    assert len(seen) == 4 and len(set(seen)) == 1
    for seed in (np.array(-3), np.array(3.0), np.array([3])):
        with pytest.raises((TypeError, ValueError), match=r"^seed="):
            ferrum.crosscheck("cpu", seed=seed)


def test_crosscheck_takes_row_counts_as_any_integer_argument(monkeypatch):
    # As seed and expert= do: a numpy integer, a 0-d integer array or an __index__ object is
    # the row count it stands for, in the run and in the results' labels.
    class Three:
        def __index__(self):
            return 3
    monkeypatch.setattr(ferrum.check, "problems",
                        lambda rng, quick: [random_problem(rng, 128, 64, 128)])
    for m in (np.int64(3), np.array(3), np.array(3, np.uint8), Three()):
        results = ferrum.crosscheck("cpu", seed=1, m_values=[m])
        assert [r.op for r in results] == ["repack", "mm M=3"]
        assert all(r.passed for r in results)


def test_crosscheck_runs_a_backend_named_twice_once():
    results = ferrum.crosscheck(["cpu", "cpu"], quick=True, m_values=(2,))
    assert len(results) == len(ferrum.crosscheck("cpu", quick=True, m_values=(2,)))


def test_a_checkout_takes_its_own_cpu_and_metal_before_an_installed_copy(tmp_path):
    # Run from a source checkout with another ferrum installed further down the path: the
    # checkout's cpu/ and metal/ (as edited) must win, not the installed copy's.
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(ferrum.__file__)))
    if not os.path.isfile(os.path.join(root, "cpu", "kernels.py")):
        pytest.skip("ferrum is imported from an installed copy, not a source checkout")
    site = tmp_path / "site"
    for sub in ("metal", "cpu"):
        (site / "ferrum" / sub).mkdir(parents=True)
        (site / "ferrum" / sub / "__init__.py").write_text("raise ImportError('installed copy')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(site)]))
    done = subprocess.run([sys.executable, "-c", "import ferrum.metal, ferrum.cpu; "
                           "print(ferrum.metal.__file__); print(ferrum.cpu.__file__)"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    metal_file, cpu_file = done.stdout.split()
    assert metal_file == os.path.join(root, "metal", "__init__.py")
    assert cpu_file == os.path.join(root, "cpu", "__init__.py")


def test_crosscheck_checks_every_experts_repack_against_the_format(monkeypatch):
    # Repack was compared with cpu's own (so cpu's with itself) and for a stack only expert 0:
    # a cpu repack wrong on a later expert passed. It is compared with format.repack_reference
    # for every expert now.
    from ferrum.cpu import BACKEND as CPU
    rng = np.random.default_rng(5)
    prob = random_problem(rng, 256, 128, 128, experts=3)
    monkeypatch.setattr(ferrum.check, "problems", lambda rng, quick: [prob])
    right = CPU.repack

    def wrong_on_expert_2(qweight, perm, size_k, size_n):
        out = np.array(right(qweight, perm, size_k, size_n))
        if np.array_equal(np.asarray(qweight), prob.qweights[2]):
            out[0, 0] ^= 1
        return out
    monkeypatch.setattr(CPU, "repack", wrong_on_expert_2)
    results = ferrum.crosscheck("cpu", seed=1, m_values=[1])
    repack = [r for r in results if r.op == "repack"]
    assert len(repack) == 1 and not repack[0].passed and repack[0].error == 1


@pytest.mark.parametrize("args,message", [
    (["--shapes", "4096"], "--shapes: '4096' is not KxN"),
    (["--shapes", "4096x6144,axb"], "--shapes: 'axb' is not KxN"),
    (["--shapes", "4096x100"], "--shapes N=100: must be a positive multiple of 64"),
    (["--shapes", "1000x128"], "--shapes K=1000: must be a positive multiple of 128"),
    (["--m", "1,0"], "--m: 0: row counts must be at least 1"),
    (["--m", "1,x"], "--m: 'x' is not a row count"),
    (["--group-size", "7"], "--group-size 7: must be one of -1, 32, 64, 128"),
    (["--shapes", "256x64", "--group-size", "96"], "--group-size 96 with K=256"),
    (["--shapes", "256x64,512x64", "--group-size", "256"], "--group-size 256 with K=512"),
])
def test_bench_problems_are_checked_before_any_work(monkeypatch, capsys, args, message):
    import ferrum.__main__ as cli
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: pytest.fail(f"{name} imported before the options were checked"))
    assert cli.main(["bench", *args]) == 2
    assert message in capsys.readouterr().out


def test_bench_problems_apply_to_bench_only():
    done = run("check", "--backend", "cpu", "--quick", "--m", "1")
    assert done.returncode == 2 and "apply to bench" in done.stderr


def test_bench_problems_reach_the_backend(monkeypatch):
    import ferrum.__main__ as cli
    seen = []
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: type("Backend", (), {"run_bench": staticmethod(seen.append)}))
    monkeypatch.setattr(ferrum, "backends", lambda: {"cpu": type("I", (), {"available": True, "device": "x"})})
    assert cli.main(["bench", "--shapes", "256x64, 4096X6144", "--m", "1,3", "--group-size", "-1"]) == 0
    assert seen == [{"quick": False, "seed": None, "shapes": [(256, 64), (4096, 6144)], "m_values": [1, 3],
                     "group_size": -1}]
    seen.clear()
    assert cli.main(["bench", "--quick"]) == 0
    assert seen == [{"quick": True, "seed": None}]   # the backend's own problems


def test_cpu_bench_times_the_problems_asked_for(monkeypatch, capsys):
    if not ferrum.backends()["cpu"].available:
        pytest.skip(ferrum.backends()["cpu"].reason)
    import ferrum.__main__ as cli
    bench = importlib.import_module(_registry.BACKEND_MODULES["cpu"] + ".bench")
    monkeypatch.setattr(bench, "cold_first_call", lambda: None)   # a fresh process's JIT: slow
    assert cli.main(["bench", "--shapes", "256x64,512x128", "--m", "1,3,17", "--group-size", "-1",
                     "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for shape in ("K=256 N=64 G=-1", "K=512 N=128 G=-1"):
        rows = out.split(shape)[1].splitlines()[2:5]
        assert [int(r.split()[0]) for r in rows] == [1, 3, 17], out
        assert [r.split()[2] for r in rows] == ["fused", "fused", "blas"], out


@pytest.mark.parametrize("args,message", [
    (["--m", "99999999999999999999"], "--m: 99999999999999999999: row counts must be at most"),
    (["--m", "1,2147483648"], "--m: 2147483648: row counts must be at most 2147483647"),
    (["--shapes", "137438953472x64"], "--shapes K=137438953472: must be at most 2147483647"),
    (["--shapes", "128x137438953472"], "--shapes N=137438953472: must be at most 2147483647"),
])
def test_bench_sizes_past_32_bits_are_refused_before_any_work(monkeypatch, capsys, args, message):
    # Was a traceback from numpy ("Maximum allowed dimension exceeded") after the backend's
    # bench had started.
    import ferrum.__main__ as cli
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: pytest.fail(f"{name} imported before the options were checked"))
    assert cli.main(["bench", *args]) == 2
    assert message in capsys.readouterr().out


@pytest.mark.parametrize("error,message", [
    (MemoryError("Unable to allocate 2.00 TiB"), "not enough memory for the problems asked for"),
    (ValueError("M=9000000: A needs a buffer of 2304000000 bytes"), "M=9000000: A needs a buffer"),
])
def test_bench_a_problem_too_large_to_run_is_a_message_not_a_traceback(monkeypatch, capsys,
                                                                       error, message):
    import ferrum.__main__ as cli

    def run_bench(options):
        raise error
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: type("Backend", (), {"run_bench": staticmethod(run_bench)}))
    monkeypatch.setattr(ferrum, "backends", lambda: {"cpu": type("I", (), {"available": True, "device": "x"})})
    assert cli.main(["bench", "--shapes", "128x64", "--m", "1"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("python -m ferrum bench: ") and message in out


@pytest.mark.metal
def test_crosscheck_runs_cpu_first_wherever_it_is_named():
    # cpu is the reference: named after another backend (check --backend metal --backend cpu)
    # its results must still come first, or the other backend's comparison has nothing to read
    # (it was a KeyError).
    info = ferrum.backends()["metal"]
    if not info.available:
        pytest.skip(f"metal not available: {info.reason}")
    results = ferrum.crosscheck(["metal", "cpu"], seed=2, quick=True, m_values=(1,))
    assert results[0].backend == "cpu"
    assert {r.backend for r in results} == {"cpu", "metal"} and all(r.passed for r in results)
    done = run("check", "--backend", "metal", "--backend", "cpu", "--quick")
    assert done.returncode == 0, done.stdout + done.stderr
