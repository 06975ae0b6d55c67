"""collect across processes: killed mid-run and rerun, peak memory at two sizes, torchrun with 2 ranks, DDP.

Each test runs `tests.data.workers` in child processes (plain Python, or `torch.distributed.run`
with 2 CPU processes on gloo) and compares what they wrote with the result computed here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx.data.parts import Part
from tests.data import workers
from tests.data.test_collect import assert_stored

ROOT = Path(__file__).resolve().parents[2]


def worker(*args: str, ranks: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    return [*launcher, "-m", "tests.data.workers", *map(str, args)]


def run(*args: str, ranks: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(worker(*args, ranks=ranks), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def fetched(log: Path, rank: int = 0) -> list[int]:
    path = Path(f"{log}.{rank}")
    return [int(n) for n in path.read_text().split()] if path.exists() else []


def committed(out: Path) -> list[int]:
    """The batches the parts' journals hold as complete."""
    lines = [line for journal in (out / ".collecting").glob("rank-*/journal.jsonl") for line in journal.read_text().splitlines()]
    return sorted(json.loads(line)["batch"] for line in lines)


# ---- one process, killed ------------------------------------------------------------------------


def test_killed_in_the_middle_then_rerun_gives_every_batch_once(tmp_path):
    out, log = tmp_path / "out", tmp_path / "fetched"
    killed = run("collect", out, "--batches", 8, "--kill-at", 5, "--fetched", log)
    assert killed.returncode == -signal.SIGKILL
    assert fetched(log) == [0, 1, 2, 3, 4]
    complete = committed(out)  # the last batches computed may still have been waiting to be written
    assert complete == list(range(len(complete))) and len(complete) >= 5 - 1 - Part.QUEUED
    rerun = run("collect", out, "--batches", 8, "--fetched", f"{log}-rerun")
    assert rerun.returncode == 0, rerun.stderr
    assert fetched(Path(f"{log}-rerun")) == list(range(len(complete), 8))  # after the last complete batch
    assert_stored(TensorDict.load_memmap(out), workers.expected(8))


@pytest.mark.slow
def test_killed_from_outside_at_any_moment(tmp_path):
    """SIGKILL while batches are being written (whenever it lands), then a rerun: the same result."""
    out = tmp_path / "out"
    journal = out / ".collecting" / "rank-0" / "journal.jsonl"
    child = subprocess.Popen(worker("collect", out, "--batches", 12, "--mask", "--pause", 0.05), cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    rerun = run("collect", out, "--batches", 12, "--mask")
    assert rerun.returncode == 0, rerun.stderr
    stored = TensorDict.load_memmap(out)
    assert_stored(stored.exclude("position", "example"), workers.expected(12, mask=True))


# ---- memory ---------------------------------------------------------------------------------------


def test_peak_memory_does_not_grow_with_the_data(tmp_path):
    """Peak resident memory after collecting 10, then 100 batches of 2 x 512 x 256 floats (10, then 100 MiB)."""
    done = run("memory", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [report[size]["rows"] for size in ("10", "100")] == [10 * 512, 100 * 512]
    peak = {size: report[size]["peak_rss_kib"] / 1024 for size in ("10", "100")}
    assert peak["100"] - peak["10"] < 30, peak  # the 90 MiB more data stays on disk, not in memory


# ---- torchrun: 2 ranks ----------------------------------------------------------------------------


def test_two_ranks_write_one_result_in_batch_order(tmp_path):
    out, log = tmp_path / "out", tmp_path / "fetched"
    done = run("collect", out, "--batches", 9, "--mask", "--fetched", log, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert fetched(log, 0) == [0, 2, 4, 6, 8] and fetched(log, 1) == [1, 3, 5, 7]  # DistributedSampler's split
    stored = TensorDict.load_memmap(out)
    assert_stored(stored.exclude("position", "example"), workers.expected(9, mask=True))
    masks = torch.cat([workers.batch(n)["attention_mask"] for n in range(9)])
    example, position = masks.nonzero().unbind(1)
    assert torch.equal(stored["example"], example) and torch.equal(stored["position"], position)


@pytest.mark.slow
def test_a_rank_fails_then_the_rerun_completes(tmp_path):
    out, log = tmp_path / "out", tmp_path / "fetched"
    failed = run("collect", out, "--batches", 9, "--fail-at", 5, "--fail-rank", 1, "--pause", 0.2, "--fetched", log, ranks=2)
    assert failed.returncode != 0
    assert "this rank fails at batch 5" in failed.stdout + failed.stderr
    assert not (out / "collect.json").exists()
    assert fetched(log, 1) == [1, 3]
    complete = committed(out)
    assert 1 in complete and 5 not in complete
    rerun = run("collect", out, "--batches", 9, "--fetched", f"{log}-rerun", ranks=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = [*fetched(Path(f"{log}-rerun"), 0), *fetched(Path(f"{log}-rerun"), 1)]
    assert sorted(again + complete) == list(range(9))  # each batch written once: before, or now
    assert fetched(Path(f"{log}-rerun"), 1) == [5, 7]
    assert_stored(TensorDict.load_memmap(out), workers.expected(9))


@pytest.mark.slow
def test_two_ranks_interrupted_one_process_finishes(tmp_path):
    """A resumed run may have another number of processes: a single one takes every batch still missing."""
    out, log = tmp_path / "out", tmp_path / "fetched"
    failed = run("collect", out, "--batches", 9, "--fail-at", 3, "--fail-rank", 1, "--pause", 0.2, ranks=2)
    assert failed.returncode != 0
    stored = tdhook_fx.collect(workers.compiled(), workers.Batches(9, log=str(log)), out, outputs=["label"])
    assert 3 in [int(n) for n in log.read_text().split()]
    assert_stored(stored, workers.expected(9))


@pytest.mark.slow
def test_a_sweep_over_prompts_with_two_ranks(tmp_path):
    done = run("sweep", tmp_path / "out", "--batches", 5, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = TensorDict.load_memmap(tmp_path / "out")
    alone = workers.sweep([workers.prompts(n) for n in range(5)], tmp_path / "alone")
    assert stored["site"] == alone["site"] == ["layers.0", "layers.1", "layers.2"]
    torch.testing.assert_close(stored["metric"], alone["metric"])


@pytest.mark.slow
def test_a_steering_vector_trained_under_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    """DistributedDataParallel around a module holding the compiled module: gradients averaged over 2 ranks."""
    done = run("train", tmp_path / "trained.pt", "--steps", 3, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "trained.pt", weights_only=True)
    vector, grads = workers.train([workers.batch(step, size=8) for step in range(3)], 3)
    for step, (ddp, whole) in enumerate(zip(got["grads"], grads)):
        torch.testing.assert_close(ddp, whole, msg=f"step {step}")
    torch.testing.assert_close(got["vector"], vector)
    assert vector.abs().sum() > 0
