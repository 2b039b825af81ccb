"""The roofline reproduces the JAX scaling book's rules of thumb."""
import pytest

from polychip.config import MODEL_PRESETS, ModelConfig
from polychip.hardware import get_chip
from polychip.model import flops as F
from polychip.plan import roofline as R

L8, L70 = MODEL_PRESETS["llama3-8b"], MODEL_PRESETS["llama3-70b"]


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b", "llama3-405b"])
def test_six_n_flops_per_token(name):
    cfg = MODEL_PRESETS[name]
    # At short context the attention share vanishes and training is 6 x (matmul) params per token.
    assert F.train_flops_per_token(cfg, 1) == pytest.approx(6 * F.matmul_params(cfg), rel=1e-3)
    # At seq T the extra share is the causal attention's: 6 L d (T+1)/2 * 2 over 6 N = about T/(12 d) x
    # (12 L d^2 / N); the scaling book's T/8D counts full (non-causal) context: T/8D x 2/3 causal-vs-full.
    T = 8192
    share = F.train_flops_per_token(cfg, T) / (6 * F.matmul_params(cfg)) - 1
    expected = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (T + 1) / (6 * F.matmul_params(cfg))
    assert share == pytest.approx(expected, rel=1e-9)
    assert 0.3 * T / (8 * cfg.d_model) < share < 1.2 * T / (8 * cfg.d_model)


def test_adam_mixed_precision_bytes_per_param():
    assert R.adam_state_bytes_per_param("bfloat16") == 10
    assert R.adam_state_bytes_per_param("float32") == 12


@pytest.mark.parametrize("chip, expected", [("tpu-v5e", 240), ("h100", 295), ("tpu-v6e", 575)])
def test_compute_bound_batch_threshold(chip, expected):
    assert R.critical_batch(get_chip(chip)) == pytest.approx(expected, rel=0.05)


def test_compute_bound_step_is_flops_over_peak():
    chip = get_chip("tpu-v5p")
    b = R.train_bound(L70, chip, 512, 1024, 4096, "none")
    assert b.bound == "compute"
    assert b.t_step == pytest.approx(F.train_flops_per_step(L70, 1024, 4096) / (512 * chip.peak("bf16")))
    full = R.train_bound(L70, chip, 512, 1024, 4096, "full")
    assert full.t_compute == pytest.approx(b.t_compute * 4 / 3)  # 8N instead of 6N


def test_tiny_per_chip_batch_is_memory_bound():
    # One 128-token sequence per chip is far below v5e's ~240-token threshold: weight traffic dominates.
    b = R.train_bound(L8, get_chip("tpu-v5e"), 256, 256, 128, "full")
    assert b.bound in ("memory", "comm") and b.t_memory > b.t_compute


def test_memory_fit_uses_ten_bytes_per_param():
    h100 = get_chip("h100")
    small = ModelConfig(vocab_size=1024, d_model=256, n_layers=2, n_heads=4, max_seq_len=256)
    b = R.train_bound(L8, h100, 1, 1, 256, "full")
    assert not b.fits  # 8B x 12 bytes (state + grads) > 80 GB
    assert b.hbm_bytes_needed > 10 * L8.n_params
    assert R.train_bound(small, h100, 1, 8, 256).fits
    assert R.train_bound(L8, h100, 8, 8, 256, "full").fits


def test_decode_step_is_weights_plus_kv_over_bandwidth():
    chip = get_chip("h100")
    cfg, B, P, O = L8, 16, 1000, 200
    kv = 2 * 2 * cfg.n_kv_heads * cfg.head_dim * cfg.n_layers
    assert R.kv_bytes_per_token(cfg) == kv
    sb = R.serve_bound(cfg, chip, 1, B, P, O)
    expected = (2 * cfg.n_params + B * kv * (P + O / 2)) / chip.hbm_bandwidth
    assert sb.t_decode == pytest.approx(expected)


def test_more_chips_shorter_step_and_split():
    chip = get_chip("tpu-v6e")
    t = [R.train_bound(L8, chip, n, 256, 8192, "full").t_step for n in (64, 128, 256)]
    assert t[0] > t[1] > t[2]
    assert R.split(512, 256) == (256, 2) and R.split(96, 64) == (48, 2)
