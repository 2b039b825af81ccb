"""Collectives and their replica groups, read from compiled HLO text (helper for the multi-slice tests).

Replica-group ids are positions in the executable's device assignment (mesh.devices.flat order).
XLA prints groups three ways:
  {{0,1},{2,3}}                                       explicit
  [2,4]<=[8] / [4,2]<=[2,4]T(1,0)                      iota: ids iota(dims).transpose(perm), rows = groups
  mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}
                                                      ids laid out on the mesh; a group varies the named axes
"""
import itertools
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def _iota(dims, perm):
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _ints(text):
    return [int(v) for v in re.findall(r"\d+", text)]


def parse_groups(line: str, n: int) -> list[list[int]]:
    """The replica groups of one collective instruction line (all n ids in one group when none are given)."""
    m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if m:
        return [_ints(g) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        ids = _iota(_ints(m.group(3)), _ints(m.group(4) or ""))
        return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}", line)
    if m:
        names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        shape = [int(s) for _, s in names]
        ids = _iota(_ints(m.group(2)), _ints(m.group(3) or "")) if m.group(2) else np.arange(int(np.prod(shape)))
        ids = ids.reshape(shape)
        vary = [i for i, (a, _) in enumerate(names) if f"'{a}'" in m.group(4)]
        fixed = [i for i in range(len(shape)) if i not in vary]
        moved = ids.transpose(fixed + vary).reshape(-1, int(np.prod([shape[i] for i in vary])) if vary else 1)
        return moved.tolist()
    if "source_target_pairs" in line:
        return [_ints(p) for p in re.findall(r"\{(\d+,\d+)\}", line)]
    return [list(range(n))]


def collectives(hlo: str, n: int):
    """[(kind, groups, line)] for every collective in the module."""
    out = []
    for line in hlo.splitlines():
        m = _OP.match(line)
        if m:
            out.append((m.group(1), parse_groups(line, n), line))
    return out


def spans(groups, slice_of) -> bool:
    """True when some group holds devices of two slices."""
    return any(len({slice_of[i] for i in g}) > 1 for g in groups)


def _selfcheck():
    assert parse_groups("replica_groups={{0,1},{2,3}}, x", 4) == [[0, 1], [2, 3]]
    assert parse_groups("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    line = "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, x"
    assert parse_groups(line, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert parse_groups("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}, x", 8) == \
        [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert list(itertools.chain(*parse_groups("z", 3))) == [0, 1, 2]


_selfcheck()
