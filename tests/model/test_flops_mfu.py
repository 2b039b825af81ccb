"""The one MFU formula (polychip.model.flops.mfu)."""
import pytest

from polychip.model.flops import mfu


def test_mfu_is_model_flops_over_time_devices_and_peak():
    # 8 devices at 1e12 FLOP/s each for 2 s could do 1.6e13 FLOPs; 4e12 of model FLOPs is 25%.
    assert mfu(4e12, 2.0, 8, 1e12) == pytest.approx(0.25)
    # Per chip or per device: the same utilisation when the peak is split across the devices of a chip.
    assert mfu(4e12, 2.0, 4, 2e12) == mfu(4e12, 2.0, 8, 1e12)


@pytest.mark.parametrize("peak", [None, 0, 0.0])
def test_mfu_is_none_without_a_peak(peak):
    assert mfu(4e12, 2.0, 8, peak) is None


@pytest.mark.parametrize("step", [0.0, -1.0])
def test_mfu_is_none_without_a_step_time(step):
    assert mfu(4e12, step, 8, 1e12) is None
