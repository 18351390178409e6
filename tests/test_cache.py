"""What is computed once and kept (ci_jax.cache)."""

import numpy as np
import pytest

from ci_jax import cache


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_npz_is_computed_once_per_key(tmp_path):
    path = tmp_path / "a.npz"
    compute, calls = _counting({"pred": np.arange(4)})
    first = cache.npz(path, "k", compute)
    again = cache.npz(path, "k", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(again["pred"], first["pred"])
    assert set(again) == {"pred"}  # the key is not one of the arrays
    cache.npz(path, "other", compute)  # another key: computed again and kept instead
    assert len(calls) == 2 and cache.load_npz(path, "k") is None and cache.load_npz(path, "other") is not None


@pytest.mark.parametrize("damage", [lambda p: p.write_bytes(b"garbage"),
                                    lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                                    lambda p: p.unlink()])
def test_a_damaged_npz_is_a_miss(tmp_path, damage):
    path = tmp_path / "a.npz"
    compute, calls = _counting({"pred": np.arange(4)})
    cache.npz(path, "k", compute)
    damage(path)
    np.testing.assert_array_equal(cache.npz(path, "k", compute)["pred"], np.arange(4))
    assert len(calls) == 2 and cache.load_npz(path, "k") is not None  # rewritten


def test_content_that_does_not_fit_is_a_miss(tmp_path):
    path = tmp_path / "a.npz"
    cache.npz(path, "k", lambda: {"pred": np.arange(4)})
    compute, calls = _counting({"pred": np.arange(5)})
    assert cache.npz(path, "k", compute, fits=lambda a: a["pred"].shape == (5,))["pred"].shape == (5,)
    assert cache.npz(path, "k", compute, fits=lambda a: a["missing"].size > 0)["pred"].shape == (5,)  # KeyError: a miss
    assert len(calls) == 2


def test_no_path_no_caching():
    compute, calls = _counting({"x": np.zeros(1)})
    cache.npz(None, "k", compute)
    cache.npz(None, "k", compute)
    assert cache.json_value(None, "k", lambda: {"a": 1}) == {"a": 1}
    assert len(calls) == 2


def test_json_value_is_computed_once_per_key_and_survives_damage(tmp_path):
    path = tmp_path / "gmm.json"
    compute, calls = _counting({"classes": [1, 2]})
    assert cache.json_value(path, "k", compute) == cache.json_value(path, "k", compute) == {"classes": [1, 2]}
    assert len(calls) == 1
    cache.json_value(path, "k2", compute)
    path.write_text('{"key": "k2", "val')  # cut short by a kill
    assert cache.json_value(path, "k2", compute) == {"classes": [1, 2]}
    assert cache.json_value(path, "k2", compute, fits=lambda v: len(v["classes"]) == 3) == {"classes": [1, 2]}
    assert len(calls) == 4
    assert not list(tmp_path.glob("*.tmp"))
