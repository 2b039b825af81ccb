"""A deviceless compile for two v5e:2x2 slices (`v5e:2x2*2`): only gradient reductions cross the DCN.

In a multi-slice executable XLA TPU keeps in-slice collectives as ordinary HLO collectives (replica
groups over one slice's devices) and turns each cross-slice collective into a send/recv pair handled by
the DCN ("megascale") runtime, tagged with its kind (_xla_megascale_transfer_type). So the test reads
both: in-slice replica groups must not span slices, and every DCN transfer must be a SUM all-reduce
whose bytes are those of this device's shard of the gradients.
"""
import math
import re

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
