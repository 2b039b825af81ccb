"""Target and mesh parsing: valid forms, and bad input that names what is valid (no compiling here)."""
import pytest

from polychip.compile.errors import CompileError
from polychip.compile.target import check_batch, factorizations, parse_mesh, parse_target


@pytest.mark.parametrize("text,chip,chips,devices,slices", [
    ("v6e:16x16", "tpu-v6e", 256, 256, 1),
    ("tpu7x:4x4x4", "tpu7x", 64, 128, 1),  # 2 TensorCores (devices) per chip
    ("v5e:2x2", "tpu-v5e", 4, 4, 1),
    ("v5p:2x2x1", "tpu-v5p", 4, 4, 1),
    ("v4:2x2x1", "tpu-v4", 4, 8, 1),
    ("v5e:2x2*2", "tpu-v5e", 8, 8, 2),
    ("h100:8", "h100", 8, 8, 1),
    ("trn2:16", "trn2", 16, 16, 1),
])
def test_parse_target(text, chip, chips, devices, slices):
    t = parse_target(text)
    assert (t.chip.name, t.n_chips, t.n_devices, t.num_slices) == (chip, chips, devices, slices)
    assert t.kind == ("modelled" if chip in ("h100", "trn2") else "tpu")


@pytest.mark.parametrize("text,needle", [
    ("v9:2x2", "v6e:16x16"),      # unknown: lists the valid TPU topologies
    ("a100:8", "h100"),           # unknown chip: lists modelled chips
    ("v6e", "needs a shape"),
    ("v6e:16by16", "v6e:16x16"),
    ("h100:eight", "chip count"),
    ("tpu-v6e:8", "write its topology"),
])
def test_bad_target(text, needle):
    with pytest.raises(CompileError, match=needle):
        parse_target(text)


def test_mesh_parse_and_default():
    assert parse_mesh(None, 256) == {"data": 1, "fsdp": 256, "tensor": 1}
    assert parse_mesh("data=2,fsdp=64,tensor=2", 256) == {"data": 2, "fsdp": 64, "tensor": 2}
    assert parse_mesh("fsdp=4", 4) == {"data": 1, "fsdp": 4, "tensor": 1}


def test_mesh_product_mismatch_lists_factorizations():
    with pytest.raises(CompileError) as e:
        parse_mesh("fsdp=3", 4)
    msg = str(e.value)
    assert "uses 3 devices but the target has 4" in msg
    for ok in ("fsdp=4", "fsdp=2,tensor=2", "tensor=4"):
        assert ok in msg
    with pytest.raises(CompileError, match="unknown axis 'pipe'"):
        parse_mesh("pipe=4", 4)


def test_factorizations_multiply_out():
    fs = factorizations(12)
    assert len(fs) == 6 and all(f["fsdp"] * f["tensor"] == 12 for f in fs)


def test_batch_divisibility():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    check_batch(16, 2, sizes)  # micro-batch 8 over 8 batch shards
    with pytest.raises(CompileError, match="valid batches: 16, 32"):
        check_batch(12, 1, {"data": 2, "fsdp": 8, "tensor": 1})
    with pytest.raises(CompileError, match="micro-batch 4 with grad_accum=4"):
        check_batch(16, 4, sizes)
