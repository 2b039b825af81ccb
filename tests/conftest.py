"""Test-wide set-up: CPU only, 8 simulated devices (meshes are tested for real), quiet libtpu."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny model trained for 10 steps on a slice of the built-in corpus (shared by read-only tests)."""
    from polychip.config import build_config
    from polychip.train.loop import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = build_config("tiny", overrides=[f"out_dir={out}", "data.max_bytes=300000", "train.steps=10",
                                          "mesh.num_devices=1"])
    train(cfg, log=lambda *a: None)
    return out
