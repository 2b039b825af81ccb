"""What every kernel backend shares and needs no toolchain for (the references import it too)."""
from __future__ import annotations

#: Masked scores. Finite, so a fully masked row never computes inf - inf = NaN: exp(NEG_INF - m) is
#: exactly 0 for any real max m, and a row with no allowed key still has a finite max.
NEG_INF = -1e30
