"""A deviceless compile for two v5e:2x2 slices (`v5e:2x2*2`): only gradient reductions cross the DCN.

In a multi-slice executable XLA TPU keeps in-slice collectives as ordinary HLO collectives (replica
groups over one slice's devices) and turns each cross-slice collective into a send/recv pair handled by
the DCN ("megascale") runtime, tagged with its kind (_xla_megascale_transfer_type). So the test reads
both: in-slice replica groups must not span slices, and every DCN transfer must be a SUM all-reduce
whose bytes are those of this device's shard of the gradients.
"""
import math
import re

import jax
import pytest

from polychip.compile.lower import with_mesh
from polychip.compile.target import parse_mesh, parse_target, tpu_devices
from polychip.config import build_config
from polychip.kernels.registry import Target
from polychip.model import transformer as T
from polychip.train.step import StepSpec
from tests.parallel.replica_groups import collectives, spans

REF = ["kernels.attention=reference", "kernels.cross_entropy=reference", "kernels.rms_norm=reference",
       "train.layer_loop=scan", "train.batch_size=8", "train.seq_len=64"]


@pytest.fixture(scope="module")
def compiled():
    spec = parse_target("v5e:2x2*2")
    devices = tpu_devices(spec)
    sizes = parse_mesh(None, spec.n_devices, spec.num_slices)
    cfg = with_mesh(build_config("tiny", overrides=REF), sizes, spec.num_slices)
    step = StepSpec.build(cfg, devices=devices, target=Target(platform="tpu", device_kind=devices[0].device_kind),
                          check=False)
    hlo = step.jitted.lower(step.abstract_state, step.abstract_batch).compile().as_text()
    return sizes, step, hlo


def test_default_mesh_puts_one_data_replica_on_each_slice(compiled):
    sizes, step, _ = compiled
    assert sizes == {"data": 2, "fsdp": 4, "tensor": 1}
    mesh = step.layout.mesh
    for row in range(2):
        assert {d.slice_index for d in mesh.devices[row].flat} == {row}


def test_in_slice_collectives_stay_in_a_slice(compiled):
    _, step, hlo = compiled
    slice_of = [d.slice_index for d in step.layout.mesh.devices.flat]
    found = collectives(hlo, len(slice_of))
    assert any(kind == "all-gather" for kind, _, _ in found)  # the FSDP gathers
    assert not [line for _, groups, line in found if spans(groups, slice_of)]


def test_every_dcn_transfer_is_a_gradient_all_reduce(compiled):
    _, step, hlo = compiled
    sends = [line for line in hlo.splitlines() if re.match(r"\s*%send[\w.]* = ", line) and "_xla_megascale" in line]
    assert sends
    kinds = {re.search(r'_xla_megascale_transfer_type="(\w+)"', s).group(1) for s in sends}
    ops = {re.search(r'_xla_megascale_reduce_operation="(\w+)"', s).group(1) for s in sends}
    assert kinds == {"ALL_REDUCE"} and ops == {"SUM"}
    sent = 0
    for s in sends:
        dims = re.match(r"\s*%\S+ = \(f32\[([\d,]*)\]", s).group(1)
        sent += 4 * math.prod(int(d) for d in dims.split(",") if d)
    # What crosses is this device's fsdp shard of the float32 gradients (4 shards), plus tile padding
    # and the loss/norm scalars: no activations.
    shard = 4 * T.count_params(T.abstract_params(step.cfg.model)) / 4
    assert shard <= sent <= 1.5 * shard


@pytest.fixture(scope="module")
def pipelined():
    """2 pipeline stages, one per v5e:2x2 slice, fsdp 4 within each; 2 micro-batches of 4 rows."""
    spec = parse_target("v5e:2x2*2")
    devices = tpu_devices(spec)
    sizes = parse_mesh("stage=2,fsdp=4", spec.n_devices, spec.num_slices)
    cfg = with_mesh(build_config("tiny", overrides=REF + ["train.pipeline_microbatches=2"]), sizes, spec.num_slices)
    step = StepSpec.build(cfg, devices=devices, target=Target(platform="tpu", device_kind=devices[0].device_kind),
                          check=False)
    hlo = step.jitted.lower(step.abstract_state, step.abstract_batch).compile().as_text()
    return step, hlo


def test_pipeline_stages_hand_activations_across_slices(pipelined):
    """Stage s sits on slice s, in-slice collectives stay in a slice, and stage-to-stage hand-offs cross the
    DCN as one-to-one transfers of one micro-batch's activations on each device: f32[1 row, 64 tokens,
    64 features] (4 rows per micro-batch over fsdp 4), in every iteration of the M + S - 1 = 3 of the
    forward loop and of its backward."""
    from polychip.estimate.hlo import ops_from_hlo

    step, hlo = pipelined
    mesh = step.layout.mesh
    slice_of = [d.slice_index for d in mesh.devices.flat]
    stage = list(mesh.axis_names).index("stage")
    for s in range(2):
        assert {d.slice_index for d in mesh.devices.take(s, axis=stage).flat} == {s}
    assert not [line for _, groups, line in collectives(hlo, len(slice_of)) if spans(groups, slice_of)]

    ops = ops_from_hlo(hlo, n_devices=8, devices_per_slice=4)
    handoffs = [o for o in ops if o.link == "inter" and o.collective == "collective-permute" and o.bytes == 4 * 64 * 64]
    assert sum(o.count for o in handoffs) >= 2 * 3
    # What else crosses: reductions of the stage-replicated embedding / head / norm gradients and the loss,
    # and the tokens and the last stage's output: no transfer as large as a device's shard of its stage's
    # layer weights (each stage keeps its own, and their gradients).
    layer_shard = sum(4 * a.size for a in jax.tree.leaves(T.abstract_params(step.cfg.model)["layers"])) / 8
    assert not [o for o in ops if o.link == "inter" and o.bytes >= layer_shard]
