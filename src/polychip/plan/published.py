"""Published training throughput, as benchmark records that calibrate the estimator (plan/calibrate.py).

Each record is the configuration its source says was run: chip variant, chip count, global batch,
sequence, remat policy, parallel layout and micro-batches, with the source's exact figure quoted in
`ref`. Where the source leaves a setting out, `notes` says what was assumed. Figures quoted as FLOP/s
or MFU are turned into tokens/s with the source's own FLOPs convention (MaxText counts attention
non-causally: 12 x layers x heads x head_dim x seq per token for forward + backward), never ours. A
record whose remat is not one of config.REMAT_POLICIES carries its own policy (`remat_policy`) and names
the nearest one in `remat`.

They are never used as a direct prediction (frameworks and kernels differ from polychip's); they fit
the per-family efficiencies and overlap of the estimator. Out-of-sample figures live in
bench/plan_oos.yaml and are not used here.
"""
from __future__ import annotations

from polychip.config import MODEL_PRESETS, ModelConfig, RematPolicy
from polychip.estimate.analytic import Layout
from polychip.model import flops as F
from polychip.plan.records import Record

LLAMA2_7B = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                        max_seq_len=4096)
LLAMA2_13B = ModelConfig(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, d_ff=13824,
                         max_seq_len=4096)
LLAMA2_70B = ModelConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
                         max_seq_len=4096)
MODELS = {"llama2-7b": LLAMA2_7B, "llama2-13b": LLAMA2_13B, "llama2-70b": LLAMA2_70B, **MODEL_PRESETS}

#: Custom policies published runs use (MaxText remat_policy "custom" and named policies; torchtitan SAC).
CUSTOM_REMAT = {
    # MaxText v6e llama3_1-8b-8192: decoder_layer_input, query/key/value_proj and out_proj "offload".
    "maxtext_offload_in_qkvo": RematPolicy(offloaded=("layer_input", "query_proj", "key_proj", "value_proj",
                                                      "out_proj"), doc="MaxText custom: offload input, q/k/v/o"),
    # MaxText v6e llama3_1-70b-8192: decoder_layer_input and query/key/value_proj "offload".
    "maxtext_offload_in_qkv": RematPolicy(offloaded=("layer_input", "query_proj", "key_proj", "value_proj"),
                                          doc="MaxText custom: offload input, q/k/v"),
    # MaxText save_dot_except_mlpwi: every matmul output except the MLP's wi_0/wi_1 (gate, up).
    "save_dot_except_mlpwi": RematPolicy(saved=("query_proj", "key_proj", "value_proj", "context", "out_proj",
                                                "mlp_out"), doc="MaxText: all dots but the MLP gate/up"),
    # NeuronX Distributed selective checkpointing (examples/training/llama: activation_checkpoint_config=CoreAttention):
    # the attention core is recomputed, every projection's output is kept.
    "nxd_selective": RematPolicy(saved=("query_proj", "key_proj", "value_proj", "out_proj", "mlp_gate", "mlp_up",
                                        "mlp_out"), doc="NxD selective: CoreAttention recomputed"),
    # torchtitan selective op AC: saves attention (SDPA) output and every other matmul output.
    "torchtitan_sac_op": RematPolicy(saved=("query_proj", "value_proj", "context", "mlp_gate", "mlp_out"),
                                     doc="torchtitan selective op AC: every other mm + SDPA saved"),
}


def maxtext_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """MaxText's training FLOPs per token: 6 x matmul weights + attention counted over the full sequence."""
    return 6.0 * F.matmul_params(cfg) + 3.0 * F.attention_flops_per_token(cfg, seq, causal=False)


def train_record(chip: str, model: str, chips: int, batch: int, seq: int, tokens_per_s_per_chip: float,
                 remat: str, ref: str, notes: str = "", layout: Layout | None = None, grad_accum: int | None = 1,
                 custom: str | None = None, param_dtype: str = "float32", source: str = "published") -> Record:
    """A training record from a quoted per-chip token rate."""
    step = batch * seq / (tokens_per_s_per_chip * chips)
    return Record(chip=chip, model=MODELS[model], model_name=model, mode="train", chips=chips, source=source,
                  batch=batch, seq=seq, step_time_s=step, remat=remat, ref=ref, notes=notes, layout=layout,
                  grad_accum=grad_accum, remat_policy=CUSTOM_REMAT[custom] if custom else None,
                  param_dtype=param_dtype)


def published_records() -> list[Record]:
    """Every published record: training (calibration of the estimator) and serving."""
    return published_train_records() + published_serve_records()


def published_train_records() -> list[Record]:
    return [
        train_record(
            "h100", "llama2-7b", 8, 32, 4096, 492e12 / maxtext_flops_per_token(LLAMA2_7B, 4096), "dots",
            "https://github.com/AI-Hypercomputer/maxtext/blob/main/MaxText/configs/gpu/a3/llama_2_7b/README.md: "
            "'492 TFLOP/s per chip', 1 host of 8 H100 (80 GB SXM), per-device batch 4, seq 4096",
            "TFLOP/s converted with MaxText's convention (non-causal attention); remat 'dots' (MaxText minimal: "
            "every matmul output saved) assumed, the README gives none", Layout(fsdp=8)),
        train_record(
            "h100-hbm2e", "llama3-8b", 8, 16, 8192, 6667, "save_dot_except_mlp",
            "https://github.com/pytorch/torchtitan/blob/main/benchmarks/llama3_h100_202412_torchtitan.md Table 1: "
            "'Llama 3.1 8B model. 8 GPUs. Local batch size 2, global batch size 16. Selective activation "
            "checkpointing.' FSDP + torch.compile '6,667' TPS/GPU; H100 '96GB HBM2e with 2.4 TB/sec', '500W'",
            "seq 8192 (torchtitan llama3_8b.toml); selective op AC modelled as its own policy", Layout(fsdp=8),
            custom="torchtitan_sac_op"),
        train_record(
            "tpu-v5p", "llama2-70b", 512, 2048, 4096, 0.654 * 459e12 / maxtext_flops_per_token(LLAMA2_70B, 4096),
            "save_dot_except_mlp",
            "https://github.com/AI-Hypercomputer/maxtext/blob/main/docs/reference/models/tiering.md: Llama2-70B "
            "v5p-1024 (512 chips) '65.4%' MFU",
            "MFU converted with MaxText's convention; per-device batch 4 and remat save_dot_except_mlpwi taken "
            "from MaxText's llama2_70b_v5p_128 recipe (benchmarks/maxtext_v5p_model_configs.py), FSDP over all "
            "chips", Layout(fsdp=512), custom="save_dot_except_mlpwi"),
        train_record(
            "tpu-v6e", "llama3-8b", 256, 1024, 8192, 7207, "offload_layer_input",
            "https://github.com/AI-Hypercomputer/maxtext/blob/main/docs/reference/models/tiering.md: "
            "Llama3.1-8B v6e-256 '7,207' tokens/s/chip, '45.46%' MFU; recipe llama3_1_8b_8192 in "
            "benchmarks/maxtext_trillium_model_configs.py: per_device_batch_size 4, ici_fsdp_parallelism -1, "
            "remat_policy custom (decoder_layer_input, query/key/value_proj, out_proj: offload)",
            "", Layout(fsdp=256), custom="maxtext_offload_in_qkvo"),
        train_record(
            "tpu-v6e", "llama3-70b", 256, 1280, 8192, 960, "offload_layer_input",
            "https://github.com/AI-Hypercomputer/maxtext/blob/main/docs/reference/models/tiering.md: "
            "Llama3.1-70B v6e '960' tokens/s/chip, '50.33%' MFU; recipe llama3_1_70b_8192: per_device_batch_size 5, "
            "ici_fsdp_parallelism -1, remat custom (decoder_layer_input, query/key/value_proj: offload)",
            "256 chips assumed (the table gives v6e without a count)", Layout(fsdp=256),
            custom="maxtext_offload_in_qkv"),
        train_record(
            "tpu7x", "llama3-70b", 64, 128, 8192, 2687, "full",
            "https://github.com/AI-Hypercomputer/tpu-recipes/blob/main/training/ironwood/README.md: Llama3.1-70B, "
            "64 chips, seq 8192, '2,687' tokens/s/chip (1,207 TFLOP/s)",
            "global batch 128 and remat full assumed (not in the quoted table); layout: the planner's choice",
            None, None),
        train_record(
            "trn1", "llama3-8b", 512, 1024, 8192, 41.99 * 8192 / 512, "dots",
            "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/benchmarks/trn1/trn1-training-performance.html "
            "(update of May 20th, 2025): 'Llama-3.1-8B pre-training | trn1.32xlarge/trn1n.32xlarge | "
            "Autocast:BF16+FP32Optimizer | 32 | TP=32 DP=32 PP=1 ZeRO-1 | 1 | 1024 | AdamW | 8192 | 41.99' "
            "(nodes, topology in NeuronCores, microbatch, global batch, optimizer, sequence, seq/sec)",
            "a device is a NeuronCore (2 per chip): TP=32 is the 16 chips of one node; the tutorial's script "
            "(neuronx-distributed examples/training/llama/tp_zero1_llama_hf_pretrain) enables selective "
            "checkpointing: activation_checkpoint_config=CoreAttention",
            Layout(data=32, tensor=32, nodes=32, zero1=True), 32, custom="nxd_selective"),
        *_neuron_2_21_records(),
    ]


#: The Neuron trn1 decoder table of Neuron SDK 2.21 (December 20th, 2024), as its source file holds it.
_NEURON_2_21 = ("https://github.com/aws-neuron/aws-neuron-sdk/blob/752349fd3de5aaa6eb69690955eeaa7d43fcd082/"
                "general/benchmarks/trn1/training_data_decoder.csv (trn1 training performance, update of December "
                "20th, 2024): ")


def _neuron_2_21_records() -> list[Record]:
    """Three rows of that table (the Llama 3.1 rows of a later update are the calibration record above and an
    out-of-sample row). Degrees are in NeuronCores (2 per chip); micro-batch 1, so a replica runs global batch /
    DP micro-batches; ZeRO-1 as the tutorial scripts run (use_zero_1 / use_zero1_optimizer 1); NxD selective
    checkpointing (run_llama_nxd.py: CoreAttention at sequence 4096)."""
    note = ("neuronx-distributed examples/training/llama scripts: {script}; selective checkpointing "
            "(CoreAttention recomputed at sequence 4096); ZeRO-1")
    return [
        train_record(
            "trn1", "llama2-7b", 256, 1024, 4096, 95.14 * 4096 / 256, "dots",
            _NEURON_2_21 + "'Llama2-7B pre-training,trn1.32xlarge/trn1n.32xlarge,Autocast:BF16+FP32Optimizer,16,"
            "TP=8 DP=64,1,1024,AdamW,4096,95.14'",
            note.format(script="tp_zero1_llama2_7B_hf_pretrain.sh"),
            Layout(data=64, tensor=8, nodes=16, zero1=True), 16, custom="nxd_selective"),
        train_record(
            "trn1", "llama2-13b", 512, 1024, 4096, 80.33 * 4096 / 512, "dots",
            _NEURON_2_21 + "'Llama2-13B pre-training,trn1.32xlarge/trn1n.32xlarge,Autocast:BF16+FP32Optimizer,32,"
            "TP=8 DP=16 PP=8,1,1024,AdamW,4096,80.33'",
            note.format(script="run_llama2_13B_tp_pp.sh (one sample per micro-batch: NUM_MICROBATCHES=BS)"),
            Layout(data=16, tensor=8, stage=8, nodes=32, zero1=True), 64, custom="nxd_selective"),
        train_record(
            "trn1", "llama2-70b", 512, 1024, 4096, 14.44 * 4096 / 512, "dots",
            _NEURON_2_21 + "'Llama2-70B pre-training,trn1.32xlarge/trn1n.32xlarge,Autocast:BF16+FP32Optimizer,32,"
            "TP=32 DP=4 PP=8,1,1024,AdamW,4096,14.44'",
            note.format(script="run_llama2_70B_tp_pp.sh (one sample per micro-batch: NUM_MICROBATCHES=BS)"),
            Layout(data=4, tensor=32, stage=8, nodes=32, zero1=True), 256, custom="nxd_selective"),
    ]


def published_serve_records() -> list[Record]:
    l8 = MODEL_PRESETS["llama3-8b"]
    return [Record(chip="tpu-v6e", model=l8, model_name="llama3-8b", mode="serve", chips=1, source="published",
                   batch=None, prompt_tokens=1800, output_tokens=128, requests_per_s=10.77,
                   ref="tpu-inference CI floor: vLLM TPU v6e-1 Llama-3.1-8B 1800 in / 128 out >= 10.77 req/s",
                   notes="a floor, not a mean; decode batch = the most that fits (vLLM fills the KV cache)")]
