"""device_kind strings and topology prefixes, checked against libtpu's deviceless topologies."""
import os

import pytest

from polychip.hardware import chip_for_device_kind, load_catalog

# Deviceless topology descriptions touch no chip; without this, libtpu refuses to start while any other
# process (a parallel test run, `polychip compile`) holds its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
topologies = pytest.importorskip("jax.experimental.topologies")
pytest.importorskip("libtpu")

SHAPES = {"v4": "2x2x1", "v5e": "2x2", "v5p": "2x2x1", "v6e": "2x2", "tpu7x": "2x2x1"}


@pytest.mark.parametrize("chip_name", ["tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "tpu7x"])
def test_topology_device_kind_maps_to_catalog(chip_name):
    chip = load_catalog()[chip_name]
    topo = topologies.get_topology_desc(topology_name=f"{chip.topology_prefix}:{SHAPES[chip.topology_prefix]}",
                                        platform="tpu")
    kind = topo.devices[0].device_kind
    assert chip_for_device_kind(kind) is chip or chip_for_device_kind(kind).name == chip_name
    n_chips = len({tuple(d.coords) for d in topo.devices})
    assert len(topo.devices) == n_chips * chip.topology_devices_per_chip
