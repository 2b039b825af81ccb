import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from polychip.config import DataConfig
from polychip.data import DataError, load_documents, resolve_files
from polychip.data.corpus import source_fingerprint, stdlib_dir


def cfg(source, **kw):
    return DataConfig(source=str(source), max_bytes=kw.pop("max_bytes", 0), **kw)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- text
def test_directory_reads_known_extensions_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "c.py").write_text("see = 1\n")
    (tmp_path / "sub" / "d.txt").write_text("dee")
    (tmp_path / "notes.csv").write_text("ignored,1")
    (tmp_path / "empty.txt").write_text("")
    assert load_documents(cfg(tmp_path)) == ["ay", "bee", "see = 1\n", "dee"]


def test_comma_list_and_glob_keep_given_order(tmp_path):
    for name, text in [("x1.txt", "one"), ("x2.txt", "two"), ("z.md", "zed")]:
        (tmp_path / name).write_text(text)
    src = f"{tmp_path / 'z.md'}, {tmp_path / 'x*.txt'}"
    assert load_documents(cfg(src)) == ["zed", "one", "two"]


def test_non_ascii_text_reads_and_bad_bytes_are_refused(tmp_path):
    p = tmp_path / "u.txt"
    p.write_bytes("héllo 你好 🙂".encode() + b" end")
    assert load_documents(cfg(p)) == ["héllo 你好 🙂 end"]
    # Non-UTF-8 bytes used to be dropped without a word; now the file and offset are named.
    p.write_bytes("héllo".encode() + b"\xff\xfe end")
    with pytest.raises(DataError, match=r"u.txt.*not UTF-8 text \(byte 0xff at offset 6\)"):
        load_documents(cfg(p))


def test_binary_files_are_refused(tmp_path):
    p = tmp_path / "model.bin.txt"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="looks binary"):
        load_documents(cfg(p))
    j = tmp_path / "d.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "\xc3\x28"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2.*not UTF-8"):
        load_documents(cfg(j))


def test_max_bytes_caps_total_and_cuts_last_document(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 60)
    (tmp_path / "b.txt").write_text("é" * 50)  # 2 bytes each
    (tmp_path / "c.txt").write_text("never read")
    docs = load_documents(cfg(tmp_path, max_bytes=101))
    assert docs[0] == "a" * 60
    # 41 bytes left: 20 whole 'é', the half character is dropped, not mangled.
    assert docs[1] == "é" * 20
    assert len(docs) == 2


def test_max_bytes_applies_to_jsonl_records(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 10} for _ in range(10)])
    docs = load_documents(cfg(p, max_bytes=35))
    assert docs == ["x" * 10] * 3 + ["x" * 5]


# ---------------------------------------------------------------------------------------------- jsonl
def test_jsonl_reads_field_and_skips_blank_lines_and_nulls(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"body": "first", "id": 1}\n\n{"body": "second"}\n{"body": null}\n')
    assert load_documents(cfg(p, text_field="body")) == ["first", "second"]


def test_jsonl_bad_line_reports_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": "ok"}, '{"text": "broken'])
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        load_documents(cfg(p))


def test_jsonl_missing_field_names_field_line_and_present_keys(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"content": "no text field"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: no field 'text'.*content"):
        load_documents(cfg(p))


def test_jsonl_non_object_and_non_string(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ['["a list"]'])
    with pytest.raises(DataError, match=r"a\.jsonl:1: expected a JSON object, got list"):
        load_documents(cfg(p))
    p = write_jsonl(tmp_path / "b.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'text' is int"):
        load_documents(cfg(p))


# ---------------------------------------------------------------------------------------------- parquet
def test_parquet_reads_column_skipping_nulls(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["alpha", None, "gamma"]}), p)
    assert load_documents(cfg(p)) == ["alpha", "gamma"]


def test_parquet_missing_and_non_string_column(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), p)
    with pytest.raises(DataError, match=r"d\.parquet.*no column 'text'.*id, body"):
        load_documents(cfg(p))
    with pytest.raises(DataError, match=r"column 'id' has type int64"):
        load_documents(cfg(p, text_field="id"))


def test_corrupt_parquet_is_a_data_error(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet"):
        load_documents(cfg(p))


# ---------------------------------------------------------------------------------------------- errors
def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data file '.*nope\.txt' not found"):
        load_documents(cfg(tmp_path / "nope.txt"))


def test_unknown_extension_and_empty_glob(tmp_path):
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"data\.csv.*unknown extension"):
        load_documents(cfg(tmp_path / "data.csv"))
    with pytest.raises(DataError, match=r"matches no"):
        load_documents(cfg(tmp_path / "*.jsonl"))
    with pytest.raises(DataError, match=r"holds no"):
        load_documents(cfg(tmp_path))  # only a .csv inside
    with pytest.raises(DataError, match=r"data.source is empty"):
        load_documents(cfg(" , "))


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    write_jsonl(tmp_path / "b.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match=r"yielded no text \(2 file"):
        load_documents(cfg(tmp_path))


def test_negative_max_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="max_bytes"):
        load_documents(cfg(tmp_path, max_bytes=-1))


# ---------------------------------------------------------------------------------------------- stdlib
def test_stdlib_files_in_fixed_shuffled_order_without_site_packages_or_tests():
    files = resolve_files("stdlib")
    assert len(files) > 100
    assert files == resolve_files("stdlib") and files != sorted(files) and len(set(files)) == len(files)
    root = stdlib_dir()
    rel_parts = [set(f.relative_to(root).parts) for f in files]
    assert not any(p & {"site-packages", "test", "tests", "encodings"} for p in rel_parts)
    # the first 10% of the order spans the alphabet (a byte cap samples the whole library)
    firsts = {f.relative_to(root).parts[0][0].lower() for f in files[: len(files) // 10]}
    assert len(firsts) > 10
    assert root / "os.py" in files


def test_stdlib_is_deterministic_and_capped():
    a = load_documents(DataConfig(source="stdlib", max_bytes=50_000))
    b = load_documents(DataConfig(source="stdlib", max_bytes=50_000))
    assert a == b
    assert sum(len(d.encode()) for d in a) == 50_000


def test_fingerprint_tracks_file_changes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one")
    f1 = source_fingerprint(str(p), "text", 0)
    assert source_fingerprint(str(p), "text", 0) == f1
    assert source_fingerprint(str(p), "text", 10) != f1
    p.write_text("one and more")
    assert source_fingerprint(str(p), "text", 0) != f1
