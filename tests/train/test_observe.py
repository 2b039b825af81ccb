"""Observability of a training run: TensorBoard events, profiler trace, events.jsonl, goodput, `report`.

One run folder is trained in two attempts: the first stops after step 4 (checkpoints at 2 and 4), the
checkpoint at 4 is then removed as if the process had died before writing it, so the second attempt
resumes from 2: its first step (3) compiles, step 4 is recomputed.
"""
import gzip
import json
import shutil
import sys
import time

import pytest

from polychip.cli import main
from polychip.config import build_config
from polychip.train import goodput
from polychip.train.loop import train
from polychip.train.observe import device_memory
from polychip.train.tboard import TensorBoard

COMMON = ["data.max_bytes=100000", "mesh.num_devices=1", "train.steps=6", "train.checkpoint_every=2",
          "train.eval_every=2", "train.warmup_steps=1", "train.profile_steps=2-3"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("obs") / "run"
    cfg = build_config("tiny", overrides=[f"out_dir={out}", *COMMON])
    walls, results = [], []
    for stop_after in (4, None):
        t0 = time.perf_counter()
        results.append(train(cfg, log=lambda *a: None, stop_after=stop_after))
        walls.append(time.perf_counter() - t0)
        if stop_after:
            shutil.rmtree(out / "checkpoints" / "4")
    return out, results, walls


def test_tensorboard_events_read_back_with_tensorboards_reader(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results, _ = resumed_run
    ea = EventAccumulator(str(out))
    ea.Reload()

    def steps(tag):
        return [e.step for e in ea.Scalars(tag)]

    # The second attempt purged what the first logged from step 3 on: each step appears once.
    for tag in ("train/loss", "train/grad_norm", "train/lr", "perf/step_time_s", "perf/tokens_per_s"):
        assert steps(tag) == [1, 2, 3, 4, 5, 6], tag
    assert steps("perf/mfu") == [2, 4, 5, 6]  # no MFU for a step that compiled (1, and 3 after the restart)
    assert steps("eval/loss") == [2, 4, 6]
    assert steps("goodput/fraction") == [6] and "goodput/compile_s" in ea.Tags()["scalars"]
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert losses[3:] == pytest.approx(results[1].losses[1:], rel=1e-6)
    assert "config/text_summary" in ea.Tags()["tensors"]


def test_profile_of_two_steps_is_written_once(resumed_run):
    out = resumed_run[0]
    runs = list((out / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1  # the second attempt resumed inside the range and did not trace again
    xplane = list(runs[0].glob("*.xplane.pb"))
    assert xplane and xplane[0].stat().st_size > 0
    trace = json.loads(gzip.decompress((runs[0] / "perfetto_trace.json.gz").read_bytes()))
    assert trace["traceEvents"]


def test_goodput_categories_sum_to_wall_time(resumed_run):
    out, results, walls = resumed_run
    for res, wall in zip(results, walls):
        total = sum(res.goodput["seconds"].values())
        # 2% of the attempt plus a fixed 0.25 s (a sum: pytest.approx would take the larger of the two). In the
        # full suite (never alone) 0.1-0.16 s of the caller's wall falls outside train()'s clock, before its first
        # line or after its last lap; a likely but unverified cause is the release of train()'s locals (compiled
        # executables, device buffers) as its frame is torn down after the return.
        assert abs(total - wall) <= 0.02 * wall + 0.25, (total, wall)
        assert res.goodput["wall_s"] == pytest.approx(total, rel=1e-9)
        s = res.goodput["seconds"]
        assert s["compile"] > 0 and s["step"] > 0 and s["checkpoint"] > 0 and s["eval"] > 0 and s["startup"] > 0
    first, second = (r.goodput["seconds"] for r in results)
    assert first["restore"] == 0 and first["recompute"] == 0
    assert second["restore"] > 0 and second["recompute"] > 0  # step 4 had been run by the first attempt
    doc = goodput.load(out)
    assert len(doc["attempts"]) == 2
    # the file was saved before the observer's files closed; the returned account also charges that
    assert doc["total"]["wall_s"] == pytest.approx(sum(r.goodput["wall_s"] for r in results), rel=1e-2)
    assert doc["total"]["wall_s"] <= sum(r.goodput["wall_s"] for r in results)
    assert 0 < doc["total"]["goodput"] < 1


def test_events_file_records_checkpoints_and_the_restart(resumed_run):
    out = resumed_run[0]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds.count("end") == 2
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4, 4, 6]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert resume["step"] == 2 and resume["recomputed_steps"] == 2 and resume["restore_s"] > 0


def test_report_writes_page_and_pngs(resumed_run, tmp_path, capsys):
    out = resumed_run[0]
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("checkpoints", "profile"))
    assert main(["report", str(out), str(other), "--out", str(tmp_path / "rep")]) == 0
    rep = tmp_path / "rep"
    for name in ("loss.png", "throughput.png", "step_time.png", "goodput.png"):
        assert (rep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (rep / "memory.png").exists()  # CPU reports no device memory
    page = (rep / "index.html").read_text()
    assert "run" in page and "other" in page and "resume" in page and "model:" in page
    assert str(rep / "index.html") in capsys.readouterr().out
    # one run: the report goes into the run folder by default
    assert main(["report", str(other)]) == 0 and (other / "report" / "loss.png").exists()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no metrics.jsonl" in err and "Traceback" not in err


def test_bad_profile_range_is_one_line_error(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "train.profile_steps=5-2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.profile_steps" in err


def test_tensorboard_is_a_noop_with_a_note_when_tensorboardx_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    notes = []
    tb = TensorBoard(tmp_path, log=notes.append)
    tb.scalars(1, {"train/loss": 1.0})
    tb.close()
    assert not tb.enabled and "tensorboardX is not installed" in notes[0] and not list(tmp_path.iterdir())


def test_device_memory_reads_what_the_platform_reports():
    class Dev:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

    assert device_memory(Dev({"bytes_in_use": 5, "peak_bytes_in_use": 7, "other": 1})) == {
        "mem_bytes_in_use": 5.0, "mem_peak_bytes_in_use": 7.0}
    assert device_memory(Dev(None)) == {} and device_memory(Dev(RuntimeError("unsupported"))) == {}
