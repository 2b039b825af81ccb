"""Checkpoints with Orbax: atomic, verified, restorable onto any mesh.

Layout: <out>/checkpoints/<step>/{params, opt_state, meta} written by an Orbax CheckpointManager
(which writes into a temporary folder and renames it when complete, so a crash mid-write never
leaves a half checkpoint under a step name). After the save completes, process 0 writes
`polychip.manifest.json` into the step folder: every file's size and CRC32. On restore the newest
step whose files match their manifest is used; a truncated or corrupted one, or one without a
manifest (nothing to check it against), is reported and skipped in favour of the previous good one.
When the retrained step is saved again, the damaged folder is first moved to
<out>/checkpoints.damaged/ and removed once the new save is complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import jax

from polychip.files import atomic_write_json

MANIFEST = "polychip.manifest.json"


class CheckpointError(ValueError):
    """No usable checkpoint, or one written for a different model."""


def _crc(path: Path) -> int:
    c = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            c = zlib.crc32(chunk, c)
    return c


def _files(step_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[str(p.relative_to(step_dir))] = {"size": p.stat().st_size, "crc32": _crc(p)}
    return out


def write_manifest(step_dir: Path) -> None:
    atomic_write_json(step_dir / MANIFEST, {"files": _files(step_dir)}, indent=None)


def verify(step_dir: Path) -> str | None:
    """None if the step folder matches its manifest, else what is wrong."""
    m = step_dir / MANIFEST
    if not m.is_file():
        return "no manifest: its save did not finish or the manifest was removed, so its files cannot be verified"
    try:
        want = json.loads(m.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for rel, info in want.items():
        p = step_dir / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != info["size"]:
            return f"{rel} is {p.stat().st_size} bytes, expected {info['size']} (truncated?)"
        if _crc(p) != info["crc32"]:
            return f"{rel} fails its CRC32 check (corrupted)"
    return None


class Checkpointer:
    """Save/restore {params, opt_state} plus JSON metadata under <out>/checkpoints."""

    def __init__(self, out_dir: str | Path, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.dir = Path(out_dir).absolute() / "checkpoints"
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.mngr = ocp.CheckpointManager(self.dir, options=opts, item_names=("params", "opt_state", "meta"))

    def steps(self) -> list[int]:
        self.mngr.reload()
        return sorted(self.mngr.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        ocp = self._ocp
        aside = None
        if step in self.steps():
            if verify(self.dir / str(step)) is None:
                return  # already saved and intact (a run resumed at its last step): same state
            aside = self._set_aside(step)
        _quiet_orbax_echoes()
        try:
            self.mngr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta)), force=True)
            self.mngr.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as e:
            # Disk full / read-only reach us from TensorStore as ValueError("RESOURCE_EXHAUSTED ...").
            # Orbax never renamed its temp folder, so earlier steps are intact; free the space it took.
            if jax.process_index() == 0:
                for tmp in self.dir.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"writing checkpoint step {step} in {self.dir} failed ({_short(e)}); "
                                  "earlier checkpoints are intact") from e
        if jax.process_index() == 0:
            write_manifest(self.dir / str(step))
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        _barrier(f"polychip_ckpt_{step}")

    def _set_aside(self, step: int) -> Path:
        """Move a damaged step folder out of Orbax's sight so the retrained step can take its name.
        Moved, not deleted, until the replacement is complete: a crash in between loses nothing
        that was usable, and the previous good step still restores."""
        aside = self.dir.parent / "checkpoints.damaged" / str(step)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(self.dir / str(step), aside)
        _barrier(f"polychip_ckpt_aside_{step}")
        self.mngr.reload()
        return aside

    def restore(self, abstract_params: Any, abstract_opt_state: Any | None, want_meta: dict | None = None,
                log=print) -> tuple[int, Any, Any, dict] | None:
        """Newest good checkpoint as (step, params, opt_state or None, meta); None if there is none.

        abstract_* are pytrees of ShapeDtypeStruct with the *target* shardings: a checkpoint written on
        one mesh restores onto another. want_meta["model"] is compared with the saved model config.
        """
        ocp = self._ocp
        steps = self.steps()
        problems = []
        for step in reversed(steps):
            step_dir = self.dir / str(step)
            bad = verify(step_dir)
            if bad:
                # No manifest means nothing to check the files against (a save cut off before its
                # manifest, or a removed manifest): restoring it could load corrupted weights silently.
                log(f"checkpoint step {step} is damaged ({bad}); trying the previous one")
                problems.append(f"step {step}: {bad}")
                continue
            try:
                meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
                log(f"checkpoint step {step} metadata unreadable ({type(e).__name__}); trying the previous one")
                problems.append(f"step {step}: metadata unreadable")
                continue
            if want_meta is not None and want_meta.get("model") != meta.get("model"):
                diff = _diff(meta.get("model", {}), want_meta.get("model", {}))
                raise CheckpointError(
                    f"checkpoint {step_dir} was written for a different model ({diff}); "
                    "use a new --out folder or the matching model settings")
            items = {"params": ocp.args.StandardRestore(abstract_params)}
            if abstract_opt_state is not None:
                items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
            try:
                got = self.mngr.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001
                log(f"checkpoint step {step} could not be read ({type(e).__name__}: {str(e)[:200]}); "
                    "trying the previous one")
                problems.append(f"step {step}: {type(e).__name__}")
                continue
            return step, got["params"], got.get("opt_state") if abstract_opt_state is not None else None, meta
        if problems:
            raise CheckpointError(f"no usable checkpoint in {self.dir}: " + "; ".join(problems)
                                  + f"; move {self.dir} away to start from scratch")
        return None

    def close(self) -> None:
        self.mngr.close()


class _EchoFilter(logging.Filter):
    """Drops the echoes of a failed save: Orbax's worker threads and its never-awaited asyncio tasks
    each log the TensorStore error that `save` raises as one CheckpointError, with a traceback
    (dozens for one full disk)."""

    NOISE = ("RESOURCE_EXHAUSTED", "Event loop is closed", "Task exception was never retrieved",
             "_SignalingThread.run() raised an exception")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + str(record.exc_info[1])
        return not any(n in text for n in self.NOISE)


def _quiet_orbax_echoes() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _EchoFilter) for f in logger.filters):
            logger.addFilter(_EchoFilter())


def _short(e: BaseException) -> str:
    """The useful end of a TensorStore/Orbax error: the OS reason if there is one, else its first line."""
    text = " ".join(str(e).split())
    for reason in ("No space left on device", "Permission denied", "Read-only file system", "Disk quota exceeded"):
        if reason in text:
            return reason
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


def _diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    d = [f"{k}: checkpoint {a.get(k)!r} vs this run {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return ", ".join(d[:4]) or "model settings differ"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
