"""The layouts: golden vectors from the ecosystem and properties on random shapes."""

import numpy as np
import pytest

import ferrum
from ferrum import format as F

def golden_cases(data):
    for i in range(6):
        k, n, g = (int(x) for x in data[f"c{i}_meta"])
        perm = data[f"c{i}_perm"]
        yield (f"c{i}", k, n, g, data[f"c{i}_qweight"], data[f"c{i}_scales"],
               perm if perm.size else None, data[f"c{i}_marlin"], data[f"c{i}_scales_marlin"])


def test_reference_repack_matches_golden_vectors(golden):
    for name, k, n, g, qw, s, perm, marlin, s_marlin in golden_cases(golden):
        assert np.array_equal(F.repack_reference(qw, k, n, perm), marlin), name


def test_cpu_repack_matches_golden_vectors(golden):
    for name, k, n, g, qw, s, perm, marlin, s_marlin in golden_cases(golden):
        got = ferrum.repack(qw, k, n, perm=perm, backend="cpu")
        assert got.dtype == np.int32 and got.shape == (k // 16, 2 * n), name
        assert np.array_equal(got, marlin), name


def test_permute_scales_matches_golden_vectors(golden):
    for name, k, n, g, qw, s, perm, marlin, s_marlin in golden_cases(golden):
        got = ferrum.permute_scales(s, k, n, g)
        assert got.dtype == np.float16
        assert np.array_equal(got, s_marlin), name
        assert np.array_equal(F.unpermute_scales(got, k, n, g), s), name


@pytest.mark.parametrize("k,n", [(128, 64), (256, 320), (640, 128), (1024, 448)])
@pytest.mark.parametrize("act_order", [False, True])
def test_repack_then_unpack_gives_back_gptq_values(rng, k, n, act_order):
    q = rng.integers(0, 16, (k, n), dtype=np.uint32)
    qweight = F.pack_gptq(q)
    assert np.array_equal(F.unpack_gptq(qweight, k), q)
    perm = rng.permutation(k).astype(np.int32) if act_order else None
    marlin = ferrum.repack(qweight, k, n, perm=perm)
    assert np.array_equal(marlin, F.repack_reference(qweight, k, n, perm))
    expected = q[perm] if act_order else q
    assert np.array_equal(F.unpack_marlin_reference(marlin, k, n), expected)


def test_every_nibble_lands_in_one_place():
    # The layout table is a bijection of the 16x64 chunk.
    assert sorted(F.CHUNK_POS.ravel().tolist()) == list(range(1024))


def test_repack_does_not_modify_its_input(rng):
    qweight = F.pack_gptq(rng.integers(0, 16, (256, 128), dtype=np.uint32))
    perm = rng.permutation(256).astype(np.int32)
    q0, p0 = qweight.copy(), perm.copy()
    ferrum.repack(qweight, 256, 128, perm=perm)
    assert np.array_equal(qweight, q0) and np.array_equal(perm, p0)
