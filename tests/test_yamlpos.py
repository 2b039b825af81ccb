"""yamlpos: line tracking, and what it refuses (aliases, duplicate keys, deep nesting, binary / non-UTF-8)."""
import time

import pytest

from polychip import yamlpos
from polychip.yamlpos import YamlSyntaxError

# 9 levels of 9-fold aliases: 9**9 (387 million) values if anything walks the expanded data.
BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def test_lines_are_tracked():
    data, lines = yamlpos.load("a:\n  b: [1, 2]\nc: x\n", "f.yaml")
    assert data == {"a": {"b": [1, 2]}, "c": "x"}
    assert lines[("a", "b")] == 2 and lines[("c",)] == 3 and lines[("a", "b", 1)] == 2


def test_alias_bomb_is_refused_quickly():
    t0 = time.perf_counter()
    with pytest.raises(YamlSyntaxError, match="f.yaml line 1: YAML anchors and aliases"):
        yamlpos.load(BOMB, "f.yaml")
    assert time.perf_counter() - t0 < 1.0


def test_self_referencing_alias_is_refused():
    with pytest.raises(YamlSyntaxError, match="aliases"):
        yamlpos.load("a: &x [*x]\n", "f.yaml")


def test_duplicate_keys_are_refused_with_their_line():
    with pytest.raises(YamlSyntaxError, match=r"f.yaml line 4: duplicate key 'count'"):
        yamlpos.load("pools:\n  - name: p\n    count: 4\n    count: 8\n", "f.yaml")


def test_deep_nesting_is_refused():
    with pytest.raises(YamlSyntaxError, match="nested more than"):
        yamlpos.load("[" * 2000 + "]" * 2000, "f.yaml")


def test_read_text_refuses_binary_and_non_utf8(tmp_path):
    b = tmp_path / "b.yaml"
    b.write_bytes(b"a: 1\n\x00\x01\x02")
    with pytest.raises(YamlSyntaxError, match="binary"):
        yamlpos.read_text(b)
    b.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(YamlSyntaxError, match=r"line 2: not UTF-8 text \(byte 0xe9\)"):
        yamlpos.read_text(b)
    b.write_bytes("a: café\n".encode())
    assert yamlpos.read_text(b) == "a: café\n"
