"""A stub performance model with hand-chosen rates, so plan scenarios can be solved by hand."""
import pytest

from polychip.plan.perf import ServeConfig, TrainEstimate


class StubPerf:
    """Training: `rate[chip]` tokens/s per chip, perfect scaling. Serving: one replica of `k[chip]`
    chips sustains `rps[chip]` requests/s with ttft/tpot `lat[chip]`."""

    def __init__(self, rate=None, rps=None, k=None, lat=None):
        self.rate, self.rps, self.k, self.lat = rate or {}, rps or {}, k or {}, lat or {}

    def train(self, w, chip, n):
        if chip.name not in self.rate:
            return None
        tps = self.rate[chip.name] * n
        step = w.batch * w.seq_len / tps
        return TrainEstimate(chip.name, n, step, tps, 0.5, "stub", "stub rate", "none", n, 1, 1, "compute", 0.0)

    def serve(self, s, chip):
        if chip.name not in self.rps:
            return None
        t1, t2 = self.lat.get(chip.name, (0.1, 0.01))
        if (s.ttft_s is not None and t1 > s.ttft_s) or (s.tpot_s is not None and t2 > s.tpot_s):
            return None
        return ServeConfig(chip.name, self.k.get(chip.name, 1), 8, t1, t2, self.rps[chip.name], "stub", "stub")

    def serve_unreachable(self, s, chip):
        return f"{chip.name}: stub says no"


@pytest.fixture
def stub():
    return StubPerf
