"""The compile front end of the estimator on hand-built HLO modules, every number worked out by hand.

Machine for the step-time checks: 1 TFLOP/s, 100 GB/s HBM, 10 GB/s within a slice, 1 GB/s across slices.
"""
import pytest

from polychip.estimate import INTER, INTRA, Calibration, Machine, estimate_step
from polychip.estimate.ops import HOST
from polychip.estimate.hlo import opaque_ops, ops_from_hlo, replica_groups, walk_module

M = Machine(peak_flops=1e12, hbm_bandwidth=1e11, intra_bandwidth=1e10, inter_bandwidth=1e9, name="hand")

# A 4-trip layer loop: each trip multiplies x by layer i's slice of stacked weights w[4,512,256] (a fused
# dynamic-slice) and writes the [1,128,256] result into layer i of the stacked buffer buf[4,128,256]
# (an in-place dynamic-update-slice fusion).
LOOP = """HloModule loop_dus

%fused_dot (p0: bf16[128,512], p1: bf16[4,512,256], p2: s32[]) -> f32[1,128,256] {
  %p0 = bf16[128,512]{1,0} parameter(0)
  %p1 = bf16[4,512,256]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  %ds = bf16[1,512,256]{2,1,0} dynamic-slice(%p1, %p2, %c0, %c0), dynamic_slice_sizes={1,512,256}
  %w = bf16[512,256]{1,0} bitcast(%ds)
  %d = f32[128,256]{1,0} dot(%p0, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %r = f32[1,128,256]{2,1,0} bitcast(%d)
}

%fused_dus (p0: f32[4,128,256], p1: f32[1,128,256], p2: s32[]) -> f32[4,128,256] {
  %p0 = f32[4,128,256]{2,1,0} parameter(0)
  %p1 = f32[1,128,256]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  ROOT %dus = f32[4,128,256]{2,1,0} dynamic-update-slice(%p0, %p1, %p2, %c0, %c0)
}

%body (arg: (s32[], bf16[128,512], bf16[4,512,256], f32[4,128,256])) -> (s32[], bf16[128,512], bf16[4,512,256], f32[4,128,256]) {
  %arg = (s32[], bf16[128,512]{1,0}, bf16[4,512,256]{2,1,0}, f32[4,128,256]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = bf16[128,512]{1,0} get-tuple-element(%arg), index=1
  %w = bf16[4,512,256]{2,1,0} get-tuple-element(%arg), index=2
  %buf = f32[4,128,256]{2,1,0} get-tuple-element(%arg), index=3
  %y = f32[1,128,256]{2,1,0} fusion(%x, %w, %i), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/while/body/layer/dot_general"}
  %upd = f32[4,128,256]{2,1,0} fusion(%buf, %y, %i), kind=kLoop, calls=%fused_dus
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[128,512]{1,0}, bf16[4,512,256]{2,1,0}, f32[4,128,256]{2,1,0}) tuple(%next, %x, %w, %upd)
}

%cond (arg: (s32[], bf16[128,512], bf16[4,512,256], f32[4,128,256])) -> pred[] {
  %arg = (s32[], bf16[128,512]{1,0}, bf16[4,512,256]{2,1,0}, f32[4,128,256]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: bf16[128,512], w: bf16[4,512,256], buf: f32[4,128,256]) -> f32[4,128,256] {
  %x = bf16[128,512]{1,0} parameter(0)
  %w = bf16[4,512,256]{2,1,0} parameter(1)
  %buf = f32[4,128,256]{2,1,0} parameter(2)
  %c = s32[] constant(0)
  %t = (s32[], bf16[128,512]{1,0}, bf16[4,512,256]{2,1,0}, f32[4,128,256]{2,1,0}) tuple(%c, %x, %w, %buf)
  %loop = (s32[], bf16[128,512]{1,0}, bf16[4,512,256]{2,1,0}, f32[4,128,256]{2,1,0}) while(%t), condition=%cond, body=%body
  ROOT %out = f32[4,128,256]{2,1,0} get-tuple-element(%loop), index=3
}
"""


def _by_name(ops):
    return {o.name.split(" ")[0]: o for o in ops}


def test_loop_trip_count_and_dynamic_slices_charged_for_the_slice():
    ops, loops = walk_module(LOOP, n_devices=1)
    assert loops == [("body", 4)]
    by = _by_name(ops)
    assert set(by) == {"y", "upd", "next", "lt"}
    assert all(o.count == 4 for o in ops)  # body and condition x 4 trips
    # fused_dot: 2 * 128 * 256 * 512 = 33,554,432 FLOPs. Bytes: x 128*512*2 = 131,072; w read only through
    # the dynamic-slice, so one layer 512*256*2 = 262,144 (not the stack's 1,048,576); i 4; result
    # 128*256*4 = 131,072. Total 524,292.
    assert by["y"].flops == 33_554_432
    assert by["y"].bytes == 524_292
    assert by["y"].name == "y (layer/dot_general)"
    # fused_dus in place: the stacked buffer (4*128*256*4 = 524,288) is neither read nor rewritten; the
    # update is read (131,072) and written (131,072), plus i (4): 262,148 (whole-buffer walk: 1,179,652).
    assert by["upd"].flops == 0 and by["upd"].bytes == 262_148
    assert by["next"].bytes == 12  # s32 add: 4 + 4 in, 4 out
    assert by["lt"].bytes == 9  # compare: 4 + 4 in, pred 1 out
    assert sum(o.bytes * o.count for o in ops) == 4 * (524_292 + 262_148 + 12 + 9)  # 3,145,844


def test_loop_step_time_by_hand():
    est = estimate_step(ops_from_hlo(LOOP, 1), M)
    # y: max(33,554,432 / 1e12, 524,292 / 1e11) = 33.554432 us (compute) x 4 = 134.217728 us
    # upd: 262,148 / 1e11 = 2.62148 us x 4 = 10.48592 us; next + lt: 21 B / 1e11 x 4 = 0.00084 us
    assert est.t_flops == pytest.approx(134.217728e-6)
    assert est.t_memory == pytest.approx(10.48592e-6 + 0.00084e-6)
    assert est.t_step == pytest.approx(144.704488e-6)
    assert est.bound == "compute"
    assert est.top_ops[0] == ("y (layer/dot_general)", pytest.approx(134.217728e-6))


# At the entry of an 8-device program (2 slices of 4): a dot fusion, a Pallas TPU kernel with its declared
# cost (as the TPU compiler prints it: int64s as strings), a custom call with no cost, and collectives whose
# groups stay in a slice (explicit groups, mesh form) or cross slices (iota form).
KERNELS = """HloModule kernels_and_collectives

%fused_mm (p0: bf16[256,1024], p1: bf16[1024,512]) -> bf16[256,512] {
  %p0 = bf16[256,1024]{1,0} parameter(0)
  %p1 = bf16[1024,512]{1,0} parameter(1)
  ROOT %d = bf16[256,512]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

ENTRY %main (x: bf16[256,1024], w: bf16[1024,512]) -> (bf16[1024,512], bf16[512,512], bf16[256,512]) {
  %x = bf16[256,1024]{1,0} parameter(0)
  %w = bf16[1024,512]{1,0} parameter(1)
  %mm = bf16[256,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_mm
  %k = bf16[256,512]{1,0} custom-call(%mm), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/shard_map/flash_fwd/pallas_call"}, backend_config={"flag_configs":[],"custom_call_config":{"body":"TUzvUg==","cost_estimate":{"flops":"1000000","transcendentals":"0","bytes_accessed":"300000","remote_bytes_transferred":"0"},"needs_layout_passes":true}}
  %o = bf16[256,512]{1,0} custom-call(%k), custom_call_target="mystery_kernel"
  %buf = bf16[256,512]{1,0} custom-call(), custom_call_target="AllocateBuffer"
  %ag_intra = bf16[1024,512]{1,0} all-gather(%k), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %ag_inter = bf16[512,512]{1,0} all-gather(%k), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true
  %ar = bf16[256,512]{1,0} all-reduce(%o), channel_id=3, replica_groups=mesh['slice'=2,'chip'=4] {'chip'}, use_global_device_ids=true, to_apply=%add
  ROOT %t = (bf16[1024,512]{1,0}, bf16[512,512]{1,0}, bf16[256,512]{1,0}) tuple(%ag_intra, %ag_inter, %ar)
}
"""


def test_replica_group_forms():
    assert replica_groups("replica_groups={{0,1,2,3},{4,5,6,7}}", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # iota: arange(8) as [2,4], transposed, read as 4 groups of 2
    assert replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # mesh form: groups vary along the named axes of the row-major device mesh
    assert replica_groups("replica_groups=mesh['a'=2,'b'=4] {'b'}", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups=mesh['a'=2,'b'=4] {'a'}", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]
    assert replica_groups("source_target_pairs={{0,1},{1,0}}", 2) == [[0, 1], [1, 0]]


def test_kernels_and_collectives_per_op():
    by = _by_name(ops_from_hlo(KERNELS, n_devices=8, devices_per_slice=4))
    assert set(by) == {"mm", "k", "o", "ag_intra", "ag_inter", "ar"}  # AllocateBuffer moves nothing
    assert by["o"].name == "o (mystery_kernel)"  # no JAX op in its metadata: named by its target
    # dot fusion: 2 * 256 * 512 * 1024 = 268,435,456 FLOPs; 524,288 + 1,048,576 in + 262,144 out = 1,835,008 B
    assert (by["mm"].flops, by["mm"].bytes, by["mm"].source) == (268_435_456, 1_835_008, "hlo")
    # Pallas kernel: what it declares, not its operand shapes
    assert (by["k"].flops, by["k"].bytes, by["k"].source) == (1_000_000, 300_000, "declared")
    assert by["k"].name == "k (flash_fwd/pallas_call)"
    # no declared cost: counted with its HBM bytes (262,144 in + out) and listed as opaque
    assert (by["o"].flops, by["o"].bytes, by["o"].source) == (0, 524_288, "opaque")
    assert [o.name for o in opaque_ops(list(by.values()))] == ["o (mystery_kernel)"]
    # all-gather within a slice, groups of 4: 3/4 of the 1,048,576 B result = 786,432 B over ICI
    assert (by["ag_intra"].bytes, by["ag_intra"].link, by["ag_intra"].collective) == (786_432, INTRA, "all-gather")
    # groups {0,4}, {1,5}...: each spans both slices: 1/2 of 524,288 B = 262,144 B across slices
    assert (by["ag_inter"].bytes, by["ag_inter"].link) == (262_144, INTER)
    # all-reduce within a slice (mesh form, groups of 4): 2 * 3/4 * 262,144 = 393,216 B
    assert (by["ar"].bytes, by["ar"].link, by["ar"].collective) == (393_216, INTRA, "all-reduce")


def test_single_slice_keeps_every_collective_intra():
    ops = ops_from_hlo(KERNELS, n_devices=8)
    assert {o.link for o in ops if o.kind == "collective"} == {INTRA}


def test_kernels_and_collectives_step_time_by_hand():
    est = estimate_step(ops_from_hlo(KERNELS, 8, 4), M, Calibration(overlap=0.5))
    # compute: mm 268.435456 us (FLOP-bound; memory 18.35 us); k max(1 us, 3 us) = 3 us; o 5.24288 us
    assert est.t_flops == pytest.approx(268.435456e-6)
    assert est.t_memory == pytest.approx(8.24288e-6)
    # links: intra (786,432 + 393,216) / 1e10 = 117.9648 us; inter 262,144 / 1e9 = 262.144 us
    assert est.by_link[INTRA] == pytest.approx(117.9648e-6)
    assert est.by_link[INTER] == pytest.approx(262.144e-6)
    # overlap 0.5 hides 138.339168 us of the 380.1088 us of collectives: 241.769632 us exposed
    assert est.t_exposed_collectives == pytest.approx(241.769632e-6)
    assert est.t_step == pytest.approx(276.678336e-6 + 241.769632e-6)
    assert est.bound == "compute"


# TPU async collectives: a start fusion (root AsyncCollectiveStart), a fusion that carries the transfer on
# beside compute, and a done fusion each hold a clone of the all-gather (same channel_id): counted once.
ASYNC = """HloModule async_collective

%start_comp (p0: bf16[64,64]) -> (bf16[64,64], bf16[256,64]) {
  %p0 = bf16[64,64]{1,0} parameter(0)
  %ag.1 = bf16[256,64]{1,0} all-gather(%p0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}, use_global_device_ids=true
  ROOT %cc.1 = (bf16[64,64]{1,0}, bf16[256,64]{1,0}) custom-call(%ag.1), custom_call_target="AsyncCollectiveStart"
}

%carry_comp (p0: bf16[64,64], p1: f32[64,64]) -> (bf16[256,64], f32[64,64]) {
  %p0 = bf16[64,64]{1,0} parameter(0)
  %p1 = f32[64,64]{1,0} parameter(1)
  %ag.2 = bf16[256,64]{1,0} all-gather(%p0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}, use_global_device_ids=true
  %d = f32[64,64]{1,0} dot(%p1, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (bf16[256,64]{1,0}, f32[64,64]{1,0}) tuple(%ag.2, %d)
}

%done_comp (p0: bf16[64,64]) -> bf16[256,64] {
  %p0 = bf16[64,64]{1,0} parameter(0)
  %ag.3 = bf16[256,64]{1,0} all-gather(%p0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}, use_global_device_ids=true
  ROOT %cc.2 = bf16[256,64]{1,0} custom-call(%p0, %ag.3), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main (x: bf16[64,64], y: f32[64,64]) -> (bf16[256,64], f32[64,64]) {
  %x = bf16[64,64]{1,0} parameter(0)
  %y = f32[64,64]{1,0} parameter(1)
  %s = (bf16[64,64]{1,0}, bf16[256,64]{1,0}) fusion(%x), kind=kCustom, calls=%start_comp
  %c = (bf16[256,64]{1,0}, f32[64,64]{1,0}) fusion(%x, %y), kind=kOutput, calls=%carry_comp
  %g = bf16[256,64]{1,0} fusion(%x), kind=kCustom, calls=%done_comp
  %d = f32[64,64]{1,0} get-tuple-element(%c), index=1
  ROOT %r = (bf16[256,64]{1,0}, f32[64,64]{1,0}) tuple(%g, %d)
}
"""


def test_async_collective_counted_once_at_its_start():
    ops = ops_from_hlo(ASYNC, 4)
    coll = [o for o in ops if o.kind == "collective"]
    # one all-gather of 256*64*2 = 32,768 B, groups of 4: 3/4 -> 24,576 B
    assert [(o.name, o.bytes) for o in coll] == [("ag.1", 24_576)]
    # the start and done fusions are the collective's own buffers (no compute op); the carrying fusion
    # is compute: 2 * 64 * 64 * 64 = 524,288 FLOPs
    assert [(o.name, o.flops) for o in ops if o.kind == "compute"] == [("c", 524_288)]


def test_pallas_kernel_declared_cost_in_a_real_tpu_compile():
    """Deviceless TPU compile (v5e, one chip) of the Pallas RMSNorm: its custom call carries the declared
    pl.CostEstimate in backend_config, and the estimator charges exactly that."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from polychip.compile.target import parse_target, tpu_devices
    from polychip.kernels.rms_norm.pallas_tpu import rms_norm

    dev = tpu_devices(parse_target("v5e:1x1"))[0]
    N, D = 256, 512
    x = jax.ShapeDtypeStruct((N, D), jnp.bfloat16, sharding=SingleDeviceSharding(dev))
    s = jax.ShapeDtypeStruct((D,), jnp.bfloat16, sharding=SingleDeviceSharding(dev))
    text = jax.jit(lambda x, s: rms_norm(x, s)).lower(x, s).compile().as_text()
    declared = [o for o in ops_from_hlo(text, 1) if o.source == "declared"]
    # rms_norm_fwd declares flops 4 N D and bytes (2 N + 1) D x 2 (bf16)
    assert [(o.flops, o.bytes) for o in declared] == [(4 * N * D, (2 * N + 1) * D * 2)]
    assert sum(o.flops * o.count for o in ops_from_hlo(text, 1)) >= 4 * N * D


def test_dot_written_as_a_padded_convolution():
    """XLA TPU writes some batched dots as convolutions with a window padded past a size-1 dimension: here
    window 4 over an input of size 1 (padding 3 each side), so one kernel position meets data. Output
    2*64*4*16 = 8,192 elements, each 64 input features x 1 position: 2 * 8,192 * 64 = 1,048,576 FLOPs (the
    kernel's full 4 positions would say 4,194,304)."""
    text = """HloModule conv
%fc (p0: f32[2,64,64,1], p1: bf16[4,16,64,1]) -> f32[2,64,4,16] {
  %p0 = f32[2,64,64,1]{3,2,1,0} parameter(0)
  %p1 = bf16[4,16,64,1]{3,2,1,0} parameter(1)
  ROOT %c = f32[2,64,4,16]{3,2,1,0} convolution(%p0, %p1), window={size=1x4 pad=0_0x3_3 rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f
}
ENTRY %main (a: f32[2,64,64,1], b: bf16[4,16,64,1]) -> f32[2,64,4,16] {
  %a = f32[2,64,64,1]{3,2,1,0} parameter(0)
  %b = bf16[4,16,64,1]{3,2,1,0} parameter(1)
  ROOT %f = f32[2,64,4,16]{3,2,1,0} fusion(%a, %b), kind=kOutput, calls=%fc
}
"""
    (op,) = ops_from_hlo(text, 1)
    assert op.flops == 1_048_576
    # 3x3 kernel over a 32x32 image (same padding), 8 -> 16 features. Per spatial dim 32 outputs x 3 taps, of
    # which the first output's left tap and the last output's right tap fall on padding: 94 (output, tap)
    # pairs read data. 2 * 16 * 8 * 94 * 94 = 2,262,016 (all 9 taps everywhere would say 2,359,296).
    conv = text.replace("f32[2,64,64,1]", "f32[1,32,32,8]").replace("bf16[4,16,64,1]", "bf16[3,3,8,16]") \
        .replace("f32[2,64,4,16]", "f32[1,32,32,16]").replace("window={size=1x4 pad=0_0x3_3 rhs_reversal=0x1}",
                                                              "window={size=3x3 pad=1_1x1_1}") \
        .replace("dim_labels=0bf1_1oi0->0b1f", "dim_labels=b01f_01io->b01f")
    (op,) = ops_from_hlo(conv, 1)
    assert op.flops == 2_262_016
    # Stride 2, no padding, 3-wide window over 9 inputs: 4 outputs x 3 taps, all on data: 2 * 16 * 8 * 12 * 12.
    strided = conv.replace("f32[1,32,32,8]", "f32[1,9,9,8]").replace("f32[1,32,32,16]", "f32[1,4,4,16]") \
        .replace("window={size=3x3 pad=1_1x1_1}", "window={size=3x3 stride=2x2}")
    (op,) = ops_from_hlo(strided, 1)
    assert op.flops == 2 * 16 * 8 * 12 * 12


def test_reducer_computations_are_not_walked_and_gathers_read_rows():
    """A top-level reduce's `to_apply` is its scalar combiner (no traffic of its own); an unfused gather reads
    the rows it returns: embedding [1000,64] f32, 8 rows -> 8*64*4 = 2,048 B read + 2,048 B written + 32 B
    of s32[8,1] indices = 4,128 B (not the table's 256,000 B)."""
    text = """HloModule misc
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
ENTRY %main (t: f32[1000,64], i: s32[8,1]) -> f32[] {
  %t = f32[1000,64]{1,0} parameter(0)
  %i = s32[8,1]{1,0} parameter(1)
  %g = f32[8,64]{1,0} gather(%t, %i), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,64}
  %z = f32[] constant(0)
  ROOT %r = f32[] reduce(%g, %z), dimensions={0,1}, to_apply=%add
}
"""
    by = _by_name(ops_from_hlo(text, 1))
    assert set(by) == {"g", "r"}
    assert by["g"].bytes == 4_128
    assert by["r"].bytes == 2_048 + 4 + 4  # reads the gathered rows and the init value, writes one f32


def test_async_slices_and_copies_move_their_data_once():
    """TPU DMAs: slice-start returns ((source), slice, context) and copies 4 of a 16 MB HBM buffer into on-chip
    memory S(1): 4,194,304 B read, nothing written to HBM. copy-start returns (destination, source, context)
    and copies 1 MB from S(1) to HBM: 1,048,576 B written. The done halves move nothing more (a walk that
    charged operands + results would have said 16 + 16 MB for the slice-start and 16 MB again for its done)."""
    text = """HloModule dma
ENTRY %main (b: s8[16777216], v: bf16[512,1024]) -> (s8[4194304], bf16[512,1024]) {
  %b = s8[16777216]{0} parameter(0)
  %v = bf16[512,1024]{1,0:S(1)} parameter(1)
  %ss = ((s8[16777216]{0}), s8[4194304]{0:S(1)}, s32[]{:S(2)}) slice-start(%b), slice={[12582912:16777216]}
  %sd = s8[4194304]{0:S(1)} slice-done(%ss)
  %cs = (bf16[512,1024]{1,0}, bf16[512,1024]{1,0:S(1)}, u32[]{:S(2)}) copy-start(%v)
  %cd = bf16[512,1024]{1,0} copy-done(%cs)
  ROOT %t = (s8[4194304]{0:S(1)}, bf16[512,1024]{1,0}) tuple(%sd, %cd)
}
"""
    by = _by_name(ops_from_hlo(text, 1))
    assert set(by) == {"ss", "cs"}
    assert by["ss"].bytes == 4_194_304
    assert by["cs"].bytes == 1_048_576


def test_offload_to_host_memory_is_a_host_transfer():
    """Activations offloaded to host memory (S(5)): a copy-start from HBM to host reads 1 MB of HBM and sends
    the same 1 MB over the host link (HOST op, collective "host-out")."""
    text = """HloModule offload
ENTRY %main (v: bf16[512,1024]) -> bf16[512,1024] {
  %v = bf16[512,1024]{1,0} parameter(0)
  %cs = (bf16[512,1024]{1,0:S(5)}, bf16[512,1024]{1,0}, u32[]{:S(2)}) copy-start(%v)
  ROOT %cd = bf16[512,1024]{1,0:S(5)} copy-done(%cs)
}
"""
    ops = ops_from_hlo(text, 1)
    assert [(o.kind, o.bytes, o.link, o.collective) for o in ops] == [
        ("compute", 1_048_576, "", ""), ("collective", 1_048_576, HOST, "host-out")]


# MaxText's splash-attention custom calls carry JSON with literal newlines, a blank line and a lone "}" in
# their attributes; the dot after the call must still be parsed (and the loop trip applied).
MULTILINE = """HloModule ml
%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8]{1,0} get-tuple-element(%p), index=1
  %k = f32[8,8]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={

"xprof_metadata":"{\\"block_q\\": 8,
}"
}}, backend_config={"flag_configs":[]}
  %d = f32[8,8]{1,0} dot(%k, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,8]{1,0}) tuple(%n, %d)
}
%cond (p: (s32[], f32[8,8])) -> pred[] {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %lim = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %lim), direction=LT
}
ENTRY %main (a: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[8,8]{1,0}) tuple(%z, %a)
  %w = (s32[], f32[8,8]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %r = f32[8,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_instruction_spanning_lines_keeps_the_rest_of_its_computation():
    """The dot after the multi-line custom call: 2 * 64 outputs * 8 = 1,024 FLOPs a trip, 5 trips; the
    custom call (no cost, not attention) stays one opaque op of 256 B in + 256 B out, 5 times."""
    ops, loops = walk_module(MULTILINE, n_devices=1)
    assert loops == [("body", 5)]
    dots = [o for o in ops if o.name.startswith("d")]
    assert [(o.flops, o.count) for o in dots] == [(1024.0, 5.0)]
    (k,) = opaque_ops(ops)
    assert (k.name, k.bytes, k.count) == ("k (tpu_custom_call)", 512.0, 5.0)


SPARSECORE_END = """HloModule sc
%add.clone (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %a = bf16[] add(%x, %y)
}, execution_thread="sparsecore"

%called_computation (p: bf16[4096]) -> bf16[4096] {
  %p = bf16[4096]{0} parameter(0)
  ROOT %ar = bf16[4096]{0} all-reduce(%p), channel_id=3, replica_groups=[1,4]<=[4], to_apply=%add.clone
}

ENTRY %main (w: bf16[4096]) -> bf16[4096] {
  %w = bf16[4096]{0} parameter(0)
  ROOT %c = bf16[4096]{0} call(%w), to_apply=%called_computation
}
"""


def test_computation_closed_with_attributes_ends_there():
    """XLA:TPU closes a SparseCore reducer with `}, execution_thread="sparsecore"`; the next computation's
    all-reduce must not be read as part of the reducer (which is never walked). 4,096 bf16 = 8,192 B over
    4 devices: a ring all-reduce sends 2 x 3/4 x 8,192 = 12,288 B per device."""
    ops = ops_from_hlo(SPARSECORE_END, n_devices=4)
    (ar,) = [o for o in ops if o.kind == "collective"]
    assert (ar.collective, ar.bytes) == ("all-reduce", 12288.0)


def _splash(name: str, result: str, meta: str) -> str:
    return f"""HloModule sp
ENTRY %main (q: bf16[2,4,256,64], k: bf16[2,2,256,64], v: bf16[2,2,256,64]) -> {result} {{
  %m = s8[1,2,2]{{2,1,0}} constant({{...}})
  %q = bf16[2,4,256,64]{{3,2,1,0}} parameter(0)
  %k = bf16[2,2,256,64]{{3,2,1,0}} parameter(1)
  %v = bf16[2,2,256,64]{{3,2,1,0}} parameter(2)
  ROOT %{name}.1 = {result} custom-call(%m, %q, %k, %v), custom_call_target="tpu_custom_call", frontend_attributes={{kernel_metadata={{

"xprof_metadata":"{{{meta}}}"
}}}}, metadata={{op_name="jit(f)/shard_map/{name}/pallas_call"}}
}}
"""


def test_attention_kernel_flops_inferred_from_shapes():
    """GQA splash attention, q [2,4,256,64] (4 query heads), k/v [2,2,256,64]. One matmul unit
    U = 2 * (2*4*256) * 256 * 64 = 67,108,864. Forward 2U = 134,217,728 over all tiles; causal with
    128 x 128 blocks runs 3 of the 2 x 2 tiles: 100,663,296. A fused backward (dkv kernel returning dq, dk,
    dv) is 5U x 3/4 = 251,658,240; a dkv kernel returning dk, dv only is 4U x 3/4 = 201,326,592."""
    meta = '\\"block_q\\": 128, \\"block_kv\\": 128, \\"block_q_dkv\\": 128, \\"block_kv_dkv\\": 128'
    fwd = _splash("splash_mha_fwd_segmented_residuals", "bf16[2,4,256,64]{3,2,1,0}", meta)
    (op,) = [o for o in ops_from_hlo(fwd, 1) if o.source != "hlo"]
    assert (op.source, op.flops) == ("inferred", 134_217_728)
    (op,) = [o for o in ops_from_hlo(fwd, 1, attention_causal=True) if o.source != "hlo"]
    assert op.flops == 100_663_296
    fused = "(bf16[2,4,256,64]{3,2,1,0}, bf16[2,2,256,64]{3,2,1,0}, bf16[2,2,256,64]{3,2,1,0})"
    (op,) = [o for o in ops_from_hlo(_splash("splash_mha_dkv_no_residuals", fused, meta), 1, attention_causal=True)
             if o.source != "hlo"]
    assert op.flops == 251_658_240
    split = "(bf16[2,2,256,64]{1,0}, bf16[2,2,256,64]{1,0})"
    (op,) = [o for o in ops_from_hlo(_splash("splash_mha_dkv_no_residuals", split, meta), 1, attention_causal=True)
             if o.source != "hlo"]
    assert op.flops == 201_326_592
    # A kernel whose name says nothing of attention stays opaque, FLOPs unknown.
    (op,) = opaque_ops(ops_from_hlo(fwd.replace("splash_mha_fwd_segmented_residuals", "my_kernel"), 1))
    assert op.flops == 0.0


def test_async_offload_and_reload_are_host_ops_on_a_full_duplex_link():
    """XLA:TPU's remat offload: an async dynamic-update-slice writes one layer's [1,256,1024] bf16 (512 KiB)
    into a host (S(5)) stack, an async dynamic-slice reads another layer's back. HOST ops: 524,288 B out,
    524,288 B in. HBM: the update read (524,288 B; its write lands in host memory) and the slice written
    (524,288 B; its read comes from the host) plus three 4-byte indices. On a 1 MB/s host link the link is busy
    0.5 s (both directions at once), not 1 s."""
    text = """HloModule off
%dus (b: bf16[4,256,1024], u: bf16[1,256,1024], i: s32[]) -> bf16[4,256,1024] {
  %b = bf16[4,256,1024]{2,1,0:S(5)} parameter(0)
  %u = bf16[1,256,1024]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %w = bf16[4,256,1024]{2,1,0:S(5)} dynamic-update-slice(%b, %u, %i, %z, %z)
}
%ds (b: bf16[4,256,1024], i: s32[]) -> bf16[1,256,1024] {
  %b = bf16[4,256,1024]{2,1,0:S(5)} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %r = bf16[1,256,1024]{2,1,0} dynamic-slice(%b, %i, %z, %z), dynamic_slice_sizes={1,256,1024}
}
ENTRY %main (b: bf16[4,256,1024], u: bf16[1,256,1024], i: s32[]) -> bf16[1,256,1024] {
  %b = bf16[4,256,1024]{2,1,0:S(5)} parameter(0)
  %u = bf16[1,256,1024]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %s1 = ((bf16[4,256,1024]{2,1,0:S(5)}, bf16[1,256,1024]{2,1,0}, s32[]), bf16[4,256,1024]{2,1,0:S(5)}, u32[]) async-start(%b, %u, %i), calls=%dus
  %d1 = bf16[4,256,1024]{2,1,0:S(5)} async-done(%s1)
  %s2 = ((bf16[4,256,1024]{2,1,0:S(5)}, s32[]), bf16[1,256,1024]{2,1,0}, u32[]) async-start(%d1, %i), calls=%ds
  ROOT %d2 = bf16[1,256,1024]{2,1,0} async-done(%s2)
}
"""
    by = _by_name([o for o in ops_from_hlo(text, 1) if o.kind == "collective"])
    assert {k: (o.bytes, o.link, o.collective) for k, o in by.items()} == {
        "w": (524_288, HOST, "host-out"), "r": (524_288, HOST, "host-in")}
    hbm = {o.name: o.bytes for o in ops_from_hlo(text, 1) if o.kind == "compute"}
    assert hbm == {"w": 524_288 + 12, "r": 524_288 + 12}  # + three s32 indices
    m = Machine(peak_flops=1e12, hbm_bandwidth=1e12, intra_bandwidth=1e9, inter_bandwidth=None,
                host_bandwidth=1e6 * 1.048576)
    est = estimate_step(ops_from_hlo(text, 1), m)
    assert est.by_link[HOST] == pytest.approx(0.5)


# A 3-slice TPU program's cross-slice collectives, as XLA:TPU writes them: megascale send / recv pairs
# (host transfers handled by the DCN runtime), tagged with the collective's kind and slices. Shapes are this
# device's payload: bf16[1024,256] = 524,288 bytes; s32[128] = 512 bytes.
DCN = """HloModule dcn

ENTRY %main (g: bf16[1024,256], a: s32[128]) -> bf16[1024,256] {
  %g = bf16[1024,256]{1,0} parameter(0)
  %a = s32[128]{0} parameter(1)
  %t0 = token[] after-all()
  %send.1 = (bf16[1024,256]{1,0}, u32[], token[]) send(%g, %t0), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2,3}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv.1 = (bf16[1024,256]{1,0}, u32[], token[]) recv(%t0), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2,3}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send-done.1 = token[] send-done(%send.1), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}
  %recv-done.1 = (bf16[1024,256]{1,0}, token[]) recv-done(%recv.1), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}
  %send.2 = (bf16[1024,256]{1,0}, u32[], token[]) send(%g, %t0), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target="{1,2,3}x{0:3}",_xla_megascale_transfer_type="ALL_GATHER"}
  %send.3 = (s32[128]{0}, u32[], token[]) send(%a, %t0), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target={{100000->200000},{200000->300000},{300000->100000}},_xla_megascale_transfer_type="ONE_TO_ONE"}
  ROOT %r = bf16[1024,256]{1,0} get-tuple-element(%recv-done.1), index=0
}
"""


def test_cross_slice_transfers_are_dcn_collectives():
    ops = ops_from_hlo(DCN, n_devices=12, devices_per_slice=4)
    dcn = {o.name: o for o in ops if o.kind == "collective"}
    assert set(dcn) == {"send.1", "send.2", "send.3"}  # recv and -done halves move nothing more
    assert all(o.link == INTER for o in dcn.values())
    # all-reduce over 3 slices: 2 x 2/3 x 524,288; all-gather: this device's part is one of 3, so it sends
    # it to the 2 others: 2 x 524,288; one-to-one: the payload.
    assert (dcn["send.1"].collective, dcn["send.1"].bytes) == ("all-reduce", pytest.approx(699_050.667, rel=1e-6))
    assert (dcn["send.2"].collective, dcn["send.2"].bytes) == ("all-gather", 1_048_576)
    assert (dcn["send.3"].collective, dcn["send.3"].bytes) == ("collective-permute", 512)
    # and nothing of them is charged as HBM compute
    assert sum(o.bytes for o in ops if o.kind == "compute") == 0
    # 1 GB/s across slices: (699,050.667 + 1,048,576 + 512) bytes = 1.748138667 ms
    est = estimate_step(ops, M, Calibration(overlap=0.0))
    assert est.by_link[INTER] == pytest.approx(1.748138667e-3)


RAGGED = """HloModule ragged

ENTRY %main (x: bf16[1024,256], o: bf16[8192,256], a: s32[8], b: s32[8], c: s32[8], d: s32[8]) -> bf16[8192,256] {
  %x = bf16[1024,256]{1,0} parameter(0)
  %o = bf16[8192,256]{1,0} parameter(1)
  %a = s32[8]{0} parameter(2)
  %b = s32[8]{0} parameter(3)
  %c = s32[8]{0} parameter(4)
  %d = s32[8]{0} parameter(5)
  ROOT %r = bf16[8192,256]{1,0} ragged-all-to-all(%x, %o, %a, %b, %c, %d), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}
}
"""


def test_ragged_all_to_all_moves_its_rows_not_its_worst_case_buffer():
    # 1024 x 256 x 2 B = 524,288 B of rows, 7/8 of them to the other 7 devices: 458,752 B (the output buffer
    # is 8x larger, sized for every row landing on one device). The way back (operand the large buffer,
    # output the 1024 rows) moves the same.
    (op,) = [o for o in ops_from_hlo(RAGGED, n_devices=8) if o.kind == "collective"]
    assert (op.collective, op.bytes) == ("ragged-all-to-all", 458_752)
    back = RAGGED.replace("x: bf16[1024,256], o: bf16[8192,256]", "x: bf16[8192,256], o: bf16[1024,256]").replace(
        "%x = bf16[1024,256]", "%x = bf16[8192,256]").replace("%o = bf16[8192,256]", "%o = bf16[1024,256]").replace(
        "-> bf16[8192,256] {", "-> bf16[1024,256] {").replace("ROOT %r = bf16[8192,256]", "ROOT %r = bf16[1024,256]")
    (op,) = [o for o in ops_from_hlo(back, n_devices=8) if o.kind == "collective"]
    assert op.bytes == 458_752


# TPU7x runs some collectives on its SparseCores: an async call (call-start / call-done) whose computation
# holds the collective. Counted once, from the called computation; the call itself moves nothing.
SPARSECORE = """HloModule sc

%called_computation.1 (p0: bf16[1024,224]) -> bf16[1024,7168] {
  %p0 = bf16[1024,224]{1,0} parameter(0)
  ROOT %ag = bf16[1024,7168]{1,0} all-gather(%p0), channel_id=3, replica_groups=[1,32]<=[32], dimensions={1}, use_global_device_ids=true
}

ENTRY %main (x: bf16[1024,224]) -> bf16[1024,7168] {
  %x = bf16[1024,224]{1,0} parameter(0)
  %cs = ((bf16[1024,224]{1,0}), bf16[1024,7168]{1,0}) call-start(%x), async_execution_thread="sparsecore", to_apply=%called_computation.1
  ROOT %cd = bf16[1024,7168]{1,0} call-done(%cs)
}
"""


def test_sparsecore_async_call_collectives_are_counted_once():
    ops = ops_from_hlo(SPARSECORE, n_devices=32)
    (ag,) = [o for o in ops if o.kind == "collective"]
    # the gathered bf16[1024, 7168] = 14,680,064 B, 31/32 of it from the other devices
    assert (ag.collective, ag.bytes) == ("all-gather", pytest.approx(14_680_064 * 31 / 32))
    assert sum(o.bytes for o in ops if o.kind == "compute") == 0
