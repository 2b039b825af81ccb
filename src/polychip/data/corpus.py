"""Corpus readers: turn `DataConfig.source` into a deterministic list of documents (str).

Sources (comma-separated in `DataConfig.source`):
- ``stdlib``: this Python's own standard-library ``*.py`` sources (no download, always present).
- a file: ``.txt``, ``.md``, ``.py`` (whole file = one document), ``.jsonl`` (one JSON object per
  line, text in ``DataConfig.text_field``), ``.parquet`` (column ``DataConfig.text_field``).
- a directory: every file with one of those extensions below it, recursively.
- a glob (``data/*.jsonl``, ``corpus/**/*.txt``).

Order is deterministic: sources in the order given, files within a directory/glob sorted by path,
records in file order. Reading stops once ``DataConfig.max_bytes`` bytes of UTF-8 text have been
collected (0 = no cap); the last document is cut at the cap, so a huge single file is never read
whole. Empty documents are dropped.

Text must be UTF-8: a file with NUL bytes (binary) or bytes that are not UTF-8 is refused with its
name and offset, rather than trained on with the bad bytes silently dropped (a Latin-1 or binary
file would otherwise become a corpus of fragments, with exit 0).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

TEXT_EXTS = (".txt", ".md", ".py")
KNOWN_EXTS = TEXT_EXTS + (".jsonl", ".parquet")
# Directories skipped under the stdlib: installed packages are not "the standard library", and the
# test suites are large, repetitive and full of deliberately odd code.
# Skipped: installed packages, tests, and `encodings` (generated codec tables, not prose-like code).
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}


class DataError(ValueError):
    """A user mistake in the data set-up (missing file, bad record, empty corpus, vocab mismatch).

    The CLI prints the message on one line and exits non-zero; messages name the file (and line).
    """


# ----------------------------------------------------------------------------------------------
# Resolving sources to files
# ----------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    """The directory holding this interpreter's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_dir()
    if not root.is_dir():
        raise DataError(f"standard library directory {str(root)!r} not found (source='stdlib')")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    # A fixed pseudo-random order (hash of the relative path), so that a byte cap samples the whole
    # library rather than its alphabetical beginning; the same on every machine with this layout.
    return sorted(out, key=lambda p: (hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest(), str(p)))


def _dir_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(KNOWN_EXTS))
    return sorted(out)


def _check_ext(p: Path) -> Path:
    if not p.name.endswith(KNOWN_EXTS):
        raise DataError(f"data file {str(p)!r} has an unknown extension; supported: {', '.join(KNOWN_EXTS)}")
    return p


def resolve_files(source: str) -> list[Path]:
    """`DataConfig.source` -> ordered list of files to read (no reading yet).

    Raises DataError for an empty source, a path that does not exist, a glob or directory that
    matches no readable file, or a file with an unsupported extension.
    """
    parts = [s.strip() for s in source.split(",") if s.strip()]
    if not parts:
        raise DataError("data.source is empty; give 'stdlib' or paths/globs of .txt/.md/.py/.jsonl/.parquet files")
    files: list[Path] = []
    for part in parts:
        if part == "stdlib":
            files.extend(_stdlib_files())
            continue
        p = Path(part).expanduser()
        if p.is_dir():
            found = _dir_files(p)
            if not found:
                raise DataError(f"data directory {part!r} holds no {'/'.join(KNOWN_EXTS)} files")
            files.extend(found)
        elif p.is_file():
            files.append(_check_ext(p))
        elif glob.has_magic(part):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(part), recursive=True))
            matches = [m for m in matches if m.is_file() and m.name.endswith(KNOWN_EXTS)]
            if not matches:
                raise DataError(f"data source pattern {part!r} matches no {'/'.join(KNOWN_EXTS)} files")
            files.extend(matches)
        else:
            raise DataError(f"data file {part!r} not found")
    return files


def source_fingerprint(source: str, text_field: str, max_bytes: int) -> str:
    """Hash of what `load_documents` would read: resolved paths with sizes and mtimes, field, cap.

    Cheap (stat only). Used by the token cache to notice that the inputs changed.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"source": source, "text_field": text_field, "max_bytes": max_bytes}).encode())
    for f in resolve_files(source):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Readers: each yields documents, reading at most `budget` more bytes where it can.
# ----------------------------------------------------------------------------------------------
def _read_text_file(path: Path, budget: int | None) -> Iterator[str]:
    try:
        with open(path, "rb") as f:
            # A few bytes past the budget: the caller's cut then sees the text overflow the cap
            # (and stops) instead of a cut-off character leaving a sliver of budget unspent.
            raw = f.read() if budget is None else f.read(budget + 4)
    except OSError as e:
        raise DataError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from None
    truncated = budget is not None and len(raw) > budget
    yield _decode(raw, str(path), truncated)


def _decode(raw: bytes, where: str, truncated: bool = False) -> str:
    """Strict UTF-8, except a multi-byte character cut at the end of a truncated read."""
    if b"\0" in raw:
        raise DataError(f"data file {where!r} looks binary (it holds NUL bytes at offset {raw.index(0)}); "
                        "data.source takes UTF-8 text, JSONL or Parquet")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if truncated and e.start >= len(raw) - 4 and e.reason == "unexpected end of data":
            return raw[:e.start].decode("utf-8")
        raise DataError(f"data file {where!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "convert it (e.g. iconv -t UTF-8) or leave it out of data.source") from None


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, f"{path}:{lineno}").strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if field not in obj:
                keys = ", ".join(list(obj)[:10]) or "none"
                raise DataError(f"{path}:{lineno}: no field {field!r} (data.text_field); fields present: {keys}")
            text = obj[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, expected a string")
            yield text


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet file {str(path)!r}: {e}") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"Parquet file {str(path)!r} has no column {field!r} (data.text_field); columns: {', '.join(names)}")
    col_type = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(f"Parquet file {str(path)!r}: column {field!r} has type {col_type}, expected string")
    # Batches keep memory bounded and let the byte cap stop reading early.
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _read(path: Path, field: str, budget: int | None) -> Iterator[str]:
    name = path.name
    if name.endswith(".jsonl"):
        return _read_jsonl(path, field)
    if name.endswith(".parquet"):
        return _read_parquet(path, field)
    return _read_text_file(path, budget)


def _cut(text: str, budget: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits in `budget` bytes."""
    return text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")


def load_documents(cfg) -> list[str]:
    """Read the corpus named by `cfg` (a `polychip.config.DataConfig`).

    Returns documents in deterministic order (see module docstring), empty ones dropped, at most
    `cfg.max_bytes` UTF-8 bytes in total (0 = all). Raises DataError on missing/unreadable files,
    bad JSONL lines (file:line in the message), a missing field/column, or an empty corpus.
    """
    if cfg.max_bytes < 0:
        raise DataError(f"data.max_bytes must be >= 0 (0 = no cap), got {cfg.max_bytes}")
    cap = cfg.max_bytes or None
    docs: list[str] = []
    total = 0
    files = resolve_files(cfg.source)
    for path in files:
        if cap is not None and total >= cap:
            break
        for text in _read(path, cfg.text_field, None if cap is None else cap - total):
            if not text:
                continue
            n = len(text.encode("utf-8"))
            if cap is not None and total + n > cap:
                text = _cut(text, cap - total)
                n = len(text.encode("utf-8"))
                if text:
                    docs.append(text)
                total = cap
                break
            docs.append(text)
            total += n
    if not docs:
        raise DataError(f"data.source={cfg.source!r} yielded no text ({len(files)} file(s) read, all empty)")
    return docs
