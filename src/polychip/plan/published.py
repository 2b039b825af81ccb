"""Published throughput figures (from /work/shared/reference/accelerators.md) as benchmark records.

They calibrate the roofline's efficiency factor for chips we cannot measure here; they are never
used as a direct prediction (their frameworks and settings differ from polychip's). Where the
source leaves a setting out (per-chip batch, chip count, remat) the value below is an assumption,
and each record's `notes` says which. Figures quoted as MFU or TFLOP/s per chip are converted to
tokens/s with polychip.model.flops, so the calibration uses our FLOPs definition throughout.
"""
from __future__ import annotations

from polychip.config import MODEL_PRESETS, ModelConfig
from polychip.model import flops as F
from polychip.plan.records import Record

LLAMA2_7B = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                        max_seq_len=4096)
LLAMA2_70B = ModelConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
                         max_seq_len=4096)


def _train(chip, model, name, chips, batch, seq, tokens_per_s_per_chip, remat, ref, notes) -> Record:
    step = batch * seq / (tokens_per_s_per_chip * chips)
    return Record(chip=chip, model=model, model_name=name, mode="train", chips=chips, source="published",
                  batch=batch, seq=seq, step_time_s=step, remat=remat, ref=ref, notes=notes)


def _from_flops_rate(model, seq, flops_per_s_per_chip) -> float:
    """tokens/s per chip from a quoted model-FLOP/s per chip (our FLOPs definition)."""
    return flops_per_s_per_chip / F.train_flops_per_token(model, seq)


def published_records() -> list[Record]:
    l8, l70 = MODEL_PRESETS["llama3-8b"], MODEL_PRESETS["llama3-70b"]
    return [
        _train("h100", LLAMA2_7B, "llama2-7b", 8, 32, 4096, _from_flops_rate(LLAMA2_7B, 4096, 492e12), "full",
               "maxtext configs/gpu/a3/llama_2_7b/README.md: 492 TFLOP/s per chip",
               "remat full assumed (MaxText default policy); TFLOP/s converted with our FLOPs count"),
        _train("h100", l8, "llama3-8b", 8, 8, 8192, 6667, "none",
               "torchtitan benchmarks/llama3_h100_202412_torchtitan.md: 6,667 tok/s/GPU bf16",
               "batch 1 per GPU assumed; selective activation checkpointing modelled as remat none"),
        _train("tpu-v5p", LLAMA2_70B, "llama2-70b", 512, 1024, 4096,
               _from_flops_rate(LLAMA2_70B, 4096, 0.654 * 459e12), "full",
               "maxtext docs/reference/models/tiering.md: 65.4% MFU",
               "batch 2 per chip and remat full assumed; MFU converted with our FLOPs count"),
        _train("tpu-v6e", l8, "llama3-8b", 256, 512, 8192, 7207, "full",
               "maxtext docs/reference/models/tiering.md: 7,207 tok/s/chip", "batch 2 per chip and remat full assumed"),
        _train("tpu-v6e", l70, "llama3-70b", 256, 512, 8192, 960, "full",
               "maxtext docs/reference/models/tiering.md: 960 tok/s/chip",
               "256 chips, batch 2 per chip and remat full assumed (chip count not given)"),
        _train("tpu7x", l70, "llama3-70b", 64, 128, 8192, 2687, "full",
               "tpu-recipes training/ironwood/README.md: 2,687 tok/s/chip", "batch 2 per chip and remat full assumed"),
        _train("trn1", l8, "llama3-8b", 512, 512, 8192, 767, "none",
               "aws-neuron-sdk trn1 training benchmark table: ~767 tok/s/chip",
               "batch 1 per chip assumed; NxD selective checkpointing modelled as remat none"),
        Record(chip="tpu-v6e", model=l8, model_name="llama3-8b", mode="serve", chips=1, source="published",
               batch=None, prompt_tokens=1800, output_tokens=128, requests_per_s=10.77,
               ref="tpu-inference CI floor: vLLM TPU v6e-1 Llama-3.1-8B 1800 in / 128 out >= 10.77 req/s",
               notes="a floor, not a mean; decode batch = the most that fits (vLLM fills the KV cache)"),
    ]
