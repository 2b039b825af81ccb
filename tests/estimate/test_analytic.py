"""The planner's analytic op list, checked against numbers worked out by hand on a tiny config.

Config: d_model 64, 4 heads of 16 (2 KV heads), d_ff 128, 2 layers, vocab 256. Layout fsdp=4 x tensor=2
(8 devices), global batch 8, sequence 32, one micro-batch: each device holds 8 / 4 = 2 sequences of 32,
T = 64 tokens; per device the query width is 4 x 16 / 2 = 32, the KV width 2 / 2 x 16 = 16, the MLP 64.
"""
import pytest

from polychip.config import MODEL_PRESETS, ModelConfig
from polychip.estimate import INTER, INTRA, Calibration, Machine, Op, estimate_step
from polychip.estimate.ops import HOST
from polychip.estimate import analytic as A
from polychip.hardware import load_catalog
from polychip.plan import search as S

CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                  max_seq_len=64)
LAY = A.Layout(fsdp=4, tensor=2)


def ops(remat="none", lay=LAY, **kw):
    return {o.name: o for o in A.train_ops(CFG, lay, 8, 32, remat, **kw)}


def test_layer_flops_and_bytes_by_hand():
    o = ops()
    # q_proj: 2 x T x d x q = 2 x 64 x 64 x 32; bytes 2 x (T d + d q + T q) = 2 x (4096 + 2048 + 2048).
    assert (o["fwd q_proj"].flops, o["fwd q_proj"].bytes) == (262144, 16384)
    assert o["fwd q_proj"].count == 2  # 2 layers x 1 micro-batch
    assert o["bwd q_proj"].flops == 2 * 262144 and o["bwd q_proj"].bytes == 2 * 16384
    # attention: 4 x T x (32 + 1) / 2 x q = 4 x 64 x 16.5 x 32; backward 2.5x.
    assert o["fwd attention"].flops == 135168 and o["bwd attention"].flops == 2.5 * 135168
    # All seven matmuls of a layer: 2 x T x (layer weights / t) = 2 x 64 x 36864 / 2.
    mm = sum(o[f"fwd {n}"].flops for n in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down"))
    assert mm == 2 * 64 * 36864 / 2 == 2359296
    assert not any(n.startswith("remat") for n in o)  # remat none recomputes nothing


def test_collective_bytes_fsdp4_tp2_by_hand():
    o = ops()
    # FSDP all-gather of one layer's bf16 weights shard (36864 / 2 per tensor shard): (4-1)/4 x 2 x 18432.
    ag = o["fsdp all-gather fwd layer weights (fsdp)"]
    assert (ag.bytes, ag.count, ag.link) == (27648, 2, INTRA)
    assert o["fsdp reduce-scatter layer weights (fsdp)"].bytes == 0.75 * 4 * 18432  # fp32 gradients
    # Tensor all-reduce of T x d bf16 activations: 2 x (2-1)/2 x 2 x 64 x 64; 4 per layer (2 fwd, 2 bwd).
    tp = o["tensor all-reduce activations (tensor)"]
    assert (tp.bytes, tp.count) == (8192, 4 * 2)
    # Full remat re-runs the attention and MLP halves: 2 more all-reduces per layer.
    assert ops("full")["tensor all-reduce activations (tensor)"].count == 6 * 2
    assert not any("data all-reduce" in n for n in o)  # no data axis


def test_fsdp_across_two_nodes_splits_the_collective():
    o = ops(lay=A.Layout(fsdp=4, tensor=2, nodes=2))
    # 4 devices per node; the fsdp group (stride 2) has 2 members per node on 2 nodes: in-node (2-1)/2 x S,
    # across (2-1)/2 x S / 2 over INTER, S = 2 x 18432.
    intra = o["fsdp all-gather fwd layer weights (fsdp)"]
    inter = o["fsdp all-gather fwd layer weights (fsdp, across nodes)"]
    assert (intra.bytes, intra.link, inter.bytes, inter.link) == (18432, INTRA, 9216, INTER)


def test_remat_policies_recompute_what_they_do_not_keep():
    assert {n for n in ops("full") if n.startswith("remat")} >= {"remat q_proj", "remat attention", "remat mlp_up"}
    assert "remat mlp_down" not in ops("full")  # its output feeds nothing the backward needs
    qkv = {n for n in ops("save_qkv_proj") if n.startswith("remat")}
    assert "remat q_proj" not in qkv and "remat attention" in qkv and "remat o_proj" in qkv
    assert "remat attention" not in ops("save_dot_except_mlp") and "remat mlp_gate" in ops("save_dot_except_mlp")
    hbm_full, host_full = A.saved_bytes_per_token_layer(CFG, LAY, A.resolve_remat("full"))
    hbm_off, host_off = A.saved_bytes_per_token_layer(CFG, LAY, A.resolve_remat("offload_layer_input"))
    assert (hbm_full, host_full) == (2 * 32, 0) and (hbm_off, host_off) == (0, 2 * 32)  # d / t = 32 bf16 values
    off = ops("offload_layer_input")["host offload activations (PCIe)"]
    assert (off.bytes, off.link) == (64 * 64, HOST)  # 64 B x T each way; full duplex: one direction's bytes


def test_host_transfers_run_beside_the_network():
    """Host (PCIe) and network collectives are separate resources: the step exposes the larger remainder.
    Machine: 1 TFLOP/s, links 1 GB/s each. Compute 1 s; network 1.5 s; host 2 s; overlap 0.5 hides 0.5 s
    of each: exposed max(1.0, 1.5) = 1.5 s, step 2.5 s (a single pool would have exposed 3.0 s)."""
    m = Machine(peak_flops=1e12, hbm_bandwidth=1e12, intra_bandwidth=1e9, inter_bandwidth=1e9, host_bandwidth=1e9)
    step = [Op("mm", flops=1e12), Op("ag", "collective", bytes=1.5e9, link=INTRA),
            Op("offload", "collective", bytes=2e9, link=HOST)]
    est = estimate_step(step, m, Calibration(overlap=0.5))
    assert (est.t_step, est.t_exposed_collectives, est.by_link[HOST]) == (2.5, 1.5, 2.0)
    with pytest.raises(ValueError, match="no host link"):
        estimate_step(step, Machine(1e12, 1e12, 1e9, 1e9))
    v6e = load_catalog()["tpu-v6e"]
    assert A.machine(v6e).host_bandwidth == A.HOST_LINK["tpu"]
    # A blocking collective (0.5 s) is exposed whole even under full overlap; the async one (1.5 s) only
    # beyond the 1 s of compute: exposed 0.5 + 0.5, step 2 s.
    tp = Op("tp all-reduce", "collective", bytes=0.5e9, link=INTRA, blocking=True)
    est = estimate_step(step[:2] + [tp], m, Calibration(overlap=1.0))
    assert (est.t_step, est.t_exposed_collectives) == (2.0, 1.0)


def test_matmul_widths_round_up_to_the_matrix_unit_tile():
    """v6e's 256 x 256 MXU: head_dim 16 attention costs 256 / 16 = 16x its FLOPs; q_proj (64 -> 32 wide)
    costs (256 / 64) x (256 / 32) = 32x. Without a chip nothing is padded."""
    v6e = load_catalog()["tpu-v6e"]
    plain, padded = ops(), {o.name: o for o in A.train_ops(CFG, LAY, 8, 32, chip=v6e)}
    assert padded["fwd attention"].flops == 16 * plain["fwd attention"].flops
    assert padded["fwd q_proj"].flops == 32 * plain["fwd q_proj"].flops
    assert padded["fwd q_proj"].bytes == plain["fwd q_proj"].bytes  # padding is work, not traffic
    assert A.matrix_tile(load_catalog()["tpu-v5p"]) == 128 and A.matrix_tile(load_catalog()["h100"]) == 16


def test_pipeline_adds_sends_and_its_bubble():
    o = ops(lay=A.Layout(fsdp=2, tensor=2, stage=2), grad_accum=2)
    send = o["pipeline send activations/gradients"]
    # T = 8 / 2 replicas / 2 micro-batches x 32 = 64 tokens; bf16 T x d / t each way, per micro-batch.
    assert send.bytes == 2 * 64 * 64 / 2 and send.count == 2 * 2
    # 1F1B bubble: (stages - 1) / micro-batches = 1/2 of the stage's compute, idle.
    bubble = sum(x.flops * x.count for x in A.train_ops(CFG, A.Layout(fsdp=2, tensor=2, stage=2), 8, 32, grad_accum=2)
                 if x.name == "pipeline bubble (idle)")
    work = sum(x.flops * x.count for n, x in o.items() if x.kind == "compute" and "bubble" not in n
               and "optimizer" not in n)
    assert bubble == pytest.approx(work / 2)


def test_any_divisor_accumulation_and_tensor_refusal():
    assert S._accums(10, 1) == [1, 2, 5, 10] and S._accums(12, 4) == [4, 6, 12]
    l405 = MODEL_PRESETS["llama3-405b"]  # 128 heads, 8 KV heads
    with pytest.raises(A.LayoutError, match="tensor degree 3"):
        A.kv_heads_per_device(l405, 3)
    assert A.kv_heads_per_device(l405, 16) == 1.0  # KV heads replicated (16 is a multiple of 8)
    assert 3 not in S.tensor_degrees(l405, 192, 8) and 6 not in S.tensor_degrees(l405, 192, 8)
    with pytest.raises(A.LayoutError, match="exceed 2 layers"):
        A.train_ops(CFG, A.Layout(fsdp=2, stage=4), 8, 32)
    with pytest.raises(A.LayoutError, match="micro-batches"):
        A.train_ops(CFG, LAY, 8, 32, grad_accum=3)


def test_maxtext_v6e_70b_recipe_fits():
    """MaxText's v6e 70B recipe: 5 sequences per chip on 256 chips (global 1280), remat offloading."""
    v6e = load_catalog()["tpu-v6e"]
    l70 = MODEL_PRESETS["llama3-70b"]
    lay = A.Layout(fsdp=256)
    need = A.train_memory(l70, lay, 1280, 8192, "offload_layer_input", 1)
    assert need <= A.usable_hbm(v6e)


def test_maxtext_v6e_llama2_70b_full_remat_recipe_fits_and_one_more_sequence_does_not():
    """MaxText llama2-70b-4096 on v6e-256: 4 sequences per chip, remat full, FSDP over 256 chips, within
    XLA:TPU's 31.25 GiB. Per chip: state 16 B x 70e9 / 256 = 4.3 GB, saved layer inputs 2 B x 16384 tokens
    x 8192 x 80 layers = 21.5 GB, a layer's backward (2 gathered bf16 layers 3.4 GB + working set 3.4 GB)
    6.8 GB > the loss head's 2 B x 16384 x 32000 = 1.0 GB: 32.6 GB of 33.55. A fifth sequence adds 5.4 GB
    of saved inputs alone."""
    from polychip.plan.published import LLAMA2_70B

    v6e = load_catalog()["tpu-v6e"]
    lay = A.Layout(fsdp=256)
    need = A.train_memory(LLAMA2_70B, lay, 1024, 4096, "full", 1)
    assert need == pytest.approx(32.6e9, rel=0.01) and need <= A.usable_hbm(v6e) == 31.25 * 2**30
    assert A.train_memory(LLAMA2_70B, lay, 1280, 4096, "full", 1) > A.usable_hbm(v6e)


def test_serve_decode_ops_by_hand():
    """Decode step, tensor=2, 4 sequences at context 10: T = 4 tokens; per device q 32, KV 16 wide."""
    o = {x.name: x for x in A.serve_ops(CFG, 2, 4, 1, 10, 10)}
    # q_proj: 2 x 4 x 64 x 32 FLOPs; bytes: bf16 activations in and out 2 x 4 x (64 + 32), weights 2 x 64 x 32.
    assert (o["q_proj"].flops, o["q_proj"].bytes, o["q_proj"].count) == (16384, 768 + 4096, 2)
    # attention: 4 x T x 10 x 32 FLOPs; q, o, new k, v (2 x 4 x 96) plus the cache: 2 B x 4 seqs x 10 x (K+V) 2 x 16.
    assert (o["attention"].flops, o["attention"].bytes) == (5120, 768 + 2560)
    ar = o["tensor all-reduce activations (tensor)"]  # 2 per layer, (2-1)/2 x 2 x bf16 T x d, blocking
    assert (ar.bytes, ar.count, ar.blocking) == (512, 4, True)
    # Logits for each sequence's last token only: 2 x 4 x 64 x 256/2; weights 2 x 128 x 64, fp32 logits.
    assert (o["logits"].flops, o["logits"].bytes) == (65536, 16384 + 4 * 4 * 128)
    assert o["q_proj"].bytes - A.serve_ops(CFG, 2, 4, 1, 10, 10, weight_bytes=1)[0].bytes == 2048  # fp8 weights


def test_planner_serving_times_are_the_estimators():
    from polychip.plan import perf

    h100, l8 = load_catalog()["h100"], MODEL_PRESETS["llama3-8b"]
    sb = perf.serve_bound(l8, h100, 2, 16, 1000, 200, "bfloat16")
    dec = estimate_step(A.serve_ops(l8, 2, 16, 1, 1100, 1100, chip=h100), A.machine(h100))
    assert sb.t_decode == dec.t_step and dec.t_exposed_collectives > 0  # blocking all-reduces add to the step
    # Decode at batch 16 is memory-bound: weights (less the embedding table, of which decode reads 16 rows)
    # plus the KV cache, over HBM bandwidth, within the all-reduces and elementwise traffic.
    kv = 16 * 1100 * 2 * 2 * 8 * 128 * 32 / 2
    weights = 2 * (l8.n_params - l8.vocab_size * l8.d_model) / 2
    assert dec.t_memory == pytest.approx((weights + kv) / h100.hbm_bandwidth, rel=0.05)
    assert perf.serve_bound(l8, h100, 3, 16, 1000, 200, "bfloat16") is None  # 3 divides no head count


def test_fp8_linear_layers_run_at_the_chips_fp8_rate():
    cat = load_catalog()
    h100, v6e = cat["h100"], cat["tpu-v6e"]
    assert A.fp8_rate(h100, "float8") == pytest.approx(1979 / 989) and A.fp8_rate(h100, "bfloat16") == 1.0
    assert A.fp8_rate(v6e, "float8") == 1.0  # v6e's catalog fp8 figure equals its bf16 one
    o = ops(dtype="float8", chip=h100)
    assert o["fwd q_proj"].peak_scale == o["bwd mlp_down"].peak_scale == pytest.approx(1979 / 989)
    # attention's core, the output layer and elementwise ops stay bf16
    assert o["fwd attention"].peak_scale == o["fwd logits"].peak_scale == o["fwd norms"].peak_scale == 1.0
    # by hand: a 1 GFLOP op with peak_scale 2 on a 1 TFLOP/s machine takes 0.5 ms
    m = Machine(peak_flops=1e12, hbm_bandwidth=1e15, intra_bandwidth=None, inter_bandwidth=None)
    assert estimate_step([Op("mm", flops=1e9, peak_scale=2.0)], m).t_step == pytest.approx(0.5e-3)
    with pytest.raises(ValueError, match="float8"):
        ops(dtype="int4", chip=h100)
