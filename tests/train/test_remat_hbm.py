"""Remat policies' memory effect as the TPU compiler sees it (deviceless compile, v5e:2x2, fsdp=4).

Figures are the compiler's memory_analysis() per device (what `compile` reports): the temporaries of
the train step, and host memory for offloaded activations.
"""
import pytest

from polychip.compile.lower import compile_train
from polychip.compile.target import parse_target
from polychip.config import build_config

L, B, S, D, DEV = 4, 8, 128, 64, 4
REF = ["kernels.attention=reference", "kernels.cross_entropy=reference", "kernels.rms_norm=reference",
       "train.layer_loop=scan", f"model.n_layers={L}", f"train.batch_size={B}", f"train.seq_len={S}"]


@pytest.fixture(scope="module")
def memory():
    spec = parse_target("v5e:2x2")
    out = {}
    for remat in ("none", "save_qkv_proj", "offload_layer_input"):
        cfg = build_config("tiny", overrides=[*REF, f"train.remat={remat}"])
        assert cfg.model.d_model == D
        out[remat] = compile_train(cfg, spec, {"data": 1, "fsdp": DEV, "tensor": 1}).memory
    return out


def test_selective_remat_needs_less_hbm_than_none(memory):
    none = memory["none"]["temp"]
    assert none > 0
    assert memory["save_qkv_proj"]["temp"] < none / 2
    assert memory["offload_layer_input"]["temp"] < none / 2


def test_offload_moves_the_layer_inputs_to_host_memory(memory):
    # every layer's input [B/DEV, S, D] float32 sits in host memory between forward and backward
    # (at least; the TPU tiles D=64 up to 128 lanes)
    assert memory["offload_layer_input"]["host_temp"] >= L * (B // DEV) * S * D * 4
    assert memory["none"]["host_temp"] == 0 and memory["save_qkv_proj"]["host_temp"] == 0
