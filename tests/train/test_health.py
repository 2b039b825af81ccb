"""Non-finite loss / gradient norm stops a run with a message that keeps the last checkpoint."""
import math

import numpy as np
import pytest

from polychip.train.health import NonFiniteError, check_finite


def test_finite_metrics_pass():
    check_finite(3, {"loss": np.float32(2.5), "grad_norm": 0.7, "lr": 1e-3})


@pytest.mark.parametrize("metrics,needle", [
    ({"loss": math.nan, "grad_norm": 1.0}, "loss nan"),
    ({"loss": 1.0, "grad_norm": np.float32(np.inf)}, "grad_norm inf"),
    ({"loss": -math.inf}, "loss -inf"),
])
def test_non_finite_metrics_stop(metrics, needle):
    with pytest.raises(NonFiniteError, match=needle) as e:
        check_finite(12, metrics, last_checkpoint=10)
    assert "step 12" in str(e.value) and "step 10) is kept" in str(e.value)


def test_cli_reports_it_on_one_line(capsys):
    from polychip.cli import guarded

    def diverge(args):
        check_finite(5, {"loss": math.nan})

    assert guarded(diverge, None) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("polychip: error: step 5: loss nan")
