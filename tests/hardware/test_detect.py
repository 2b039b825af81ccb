"""Device detection and the measured, cached CPU peak."""
import json
from types import SimpleNamespace

import pytest

from polychip.hardware import detect


def test_cpu_peak_positive_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYCHIP_CACHE_DIR", str(tmp_path))
    calls = []
    real = detect.measure_cpu_matmul_flops

    def counting(dtype="float32", n=detect.MATMUL_N, repeats=detect.REPEATS):
        calls.append(dtype)
        return real(dtype, n=256, repeats=2)  # small: this test checks caching, not the figure

    monkeypatch.setattr(detect, "measure_cpu_matmul_flops", counting)
    first = detect.cpu_peak_flops("float32")
    assert first > 1e8  # any CPU of the last 20 years does more than 0.1 GFLOP/s
    data = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert data[detect.cpu_cache_key()]["float32"] == first
    second = detect.cpu_peak_flops("fp32")
    assert second == first and calls == ["float32"]  # read from the cache, not re-measured


def test_cpu_chip_from_device(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYCHIP_CACHE_DIR", str(tmp_path))
    key = detect.cpu_cache_key()
    (tmp_path / "cpu_peak.json").write_text(json.dumps({key: {"float32": 1.5e11}}))
    import jax

    chip = detect.current_chip(jax.devices("cpu")[0])
    assert chip.name == "cpu" and chip.peak("float32") == 1.5e11 and chip.peak("bfloat16") == 1.5e11
    assert "measured" in chip.sources[0]


def test_corrupt_cache_is_remeasured(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYCHIP_CACHE_DIR", str(tmp_path))
    (tmp_path / "cpu_peak.json").write_text("{not json")
    monkeypatch.setattr(detect, "measure_cpu_matmul_flops", lambda dtype="float32", **k: 7e10)
    assert detect.cpu_peak_flops() == 7e10


def test_known_accelerator_kind():
    dev = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert detect.current_chip(dev).name == "h100"


def test_unknown_accelerator_warns_and_has_no_peak():
    dev = SimpleNamespace(platform="gpu", device_kind="NVIDIA Z9000")
    with pytest.warns(UserWarning, match="not in the chip catalog"):
        chip = detect.current_chip(dev)
    assert chip.peak("bfloat16") is None and chip.device_kinds == ("NVIDIA Z9000",)


def test_unwritable_or_poisoned_cache_does_not_fail_the_run(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("POLYCHIP_CACHE_DIR", str(blocker))  # a file where the cache folder should be
    monkeypatch.setattr(detect, "measure_cpu_matmul_flops", lambda dtype="float32", **k: 5e10)
    with pytest.warns(UserWarning, match="could not cache the CPU peak"):
        assert detect.cpu_peak_flops("float32") == 5e10
    monkeypatch.setenv("POLYCHIP_CACHE_DIR", str(tmp_path))
    (tmp_path / "cpu_peak.json").write_text('{"%s": {"float32": Infinity}}' % detect.cpu_cache_key())
    assert detect.cpu_peak_flops("float32") == 5e10  # an infinite cached peak is re-measured


def test_unwritable_compile_cache_warns(tmp_path, monkeypatch):
    from polychip.compile import cache

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("POLYCHIP_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not write the compile cache"):
        cache.store("k", {"a": 1})
    assert cache.load("k") is None
