"""Collecting activations to disk: `tdhook_fx.collect` against a hand-written loop, memory, 2 processes.

    python benchmarks/collect.py            # about 10 minutes on this project's (shared) 2-core machine
    python benchmarks/collect.py --quick    # a smoke run: smaller data, fewer rounds

1. Throughput, one process: every block's MLP output of a GPT-2-style model (4 blocks, width
   128, 32 tokens) for 2,048 inputs in batches of 64, to disk, float32. The baseline is what a
   user writes by hand: forward hooks on the four MLPs copying into `numpy.memmap` files
   allocated up front, over the plain Hugging Face model. The candidate is
   `tdhook_fx.collect(cm, batches, path)` with `cm` compiled beforehand (`save
   transformer.h[*].mlp`); its time includes joining the result. Rounds alternate the two,
   each into a new directory; the ratio is the median over rounds of baseline time / collect
   time (throughput: above 1 is faster; the target is >= 1.0). A third row adds `stop` after the
   last saved site, which drops the final norm and the LM head the hooks' forward still runs.
2. Peak resident memory (VmHWM of a fresh process) collecting one block's output for 10,000
   and 100,000 inputs (8 tokens, width 64: 20 and 205 MB written), against the same hand-written
   loop, whose memory map's pages count as resident while it fills them.
3. Scaling: the throughput workload in 1 process (1 and 2 torch threads) and in 2 processes of
   1 thread under `torchrun` (gloo), each taking every other batch, in alternating rounds (each
   a fresh run; the time of `collect` on rank 0, start-up and compilation excluded); the core
   count is printed. The machine is shared: its load average is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from tensordict import TensorDict

import tdhook_fx
from benchmarks.common import Section, log, machine, setup_process
from tdhook_fx import zoo

PROGRAM = "save transformer.h[*].mlp"


def workload(width: int = 128, seq: int = 32):
    sample = zoo.gpt2(n_layer=4, n_embd=width, n_head=4, batch=2, seq=seq)
    cm = tdhook_fx.compile(sample.model, PROGRAM, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    return sample, cm


def batches(count: int, batch: int, seq: int):
    """`count` batches of token ids, made on the fly (seeded): nothing of the data stays in memory."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        yield TensorDict(input_ids=torch.randint(0, 128, (batch, seq), generator=generator), batch_size=[batch])


def hand_written(model, layers: list, data, path: Path, examples: int, seq: int, width: int) -> None:
    """Forward hooks copying each layer's output into numpy memory maps allocated up front."""
    path.mkdir(parents=True)
    arrays = [np.memmap(path / f"{i}.npy", dtype=np.float32, mode="w+", shape=(examples, seq, width)) for i in range(len(layers))]
    offset = [0]

    def hook(i):
        def write(module, inputs, output):
            arrays[i][offset[0] : offset[0] + output.shape[0]] = output.numpy()

        return write

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for td in data:
                model(input_ids=td["input_ids"])
                offset[0] += td.batch_size[0]
    finally:
        for handle in handles:
            handle.remove()
    for array in arrays:
        array.flush()
    arrays.clear()


def throughput(args, scratch: Path) -> Section:
    examples, batch, seq, width = args.examples, 64, 32, 128
    count = examples // batch
    sample, cm = workload(width, seq)
    layers = [block.mlp for block in sample.model.transformer.h]
    log(f"collect: checking that both write the same values ({count} batches)")
    hand_written(sample.model, layers, batches(count, batch, seq), scratch / "check-hand", examples, seq, width)
    stored = tdhook_fx.collect(cm, batches(count, batch, seq), scratch / "check-collect")
    for i in range(len(layers)):
        hand = np.memmap(scratch / "check-hand" / f"{i}.npy", dtype=np.float32, mode="r", shape=(examples, seq, width))
        difference = (stored["saved", f"transformer.h.{i}.mlp"] - torch.from_numpy(np.array(hand))).abs().max()
        assert difference < 1e-4, f"layer {i} differs by {difference}"
    stopped = tdhook_fx.compile(sample.model, PROGRAM + "\nstop transformer.h[3].mlp", example=sample.example,
                                in_keys=sample.in_keys, out_keys=sample.out_keys)
    ratios, cpu_ratios, hand_times, collect_times = [], [], [], []
    stop_ratios, stop_times = [], []
    for round_ in range(args.throughput_rounds):
        log(f"collect: throughput round {round_ + 1}/{args.throughput_rounds}")
        start, cpu = time.perf_counter(), time.process_time()
        hand_written(sample.model, layers, batches(count, batch, seq), scratch / f"hand-{round_}", examples, seq, width)
        hand_times.append(time.perf_counter() - start)
        hand_cpu = time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        tdhook_fx.collect(cm, batches(count, batch, seq), scratch / f"collect-{round_}")
        collect_times.append(time.perf_counter() - start)
        ratios.append(hand_times[-1] / collect_times[-1])
        cpu_ratios.append(hand_cpu / (time.process_time() - cpu))
        start = time.perf_counter()
        tdhook_fx.collect(stopped, batches(count, batch, seq), scratch / f"stopped-{round_}")
        stop_times.append(time.perf_counter() - start)
        stop_ratios.append(hand_times[-1] / stop_times[-1])
        for name in ("hand", "collect", "stopped"):
            shutil.rmtree(scratch / f"{name}-{round_}")
    megabytes = examples * seq * width * 4 * len(layers) / 1e6
    section = Section(
        f"Collecting 4 MLP outputs of a GPT-2-style model (width {width}, {seq} tokens) for {examples} inputs, "
        f"batches of {batch}, float32 ({megabytes:.0f} MB): throughput against a hand-written loop",
        ["method", "seconds", "inputs / s", "throughput vs hand-written (>= 1.0 wanted)", "CPU time: hand-written / this"],
        notes=[
            f"median of {args.throughput_rounds} alternating rounds, 1 torch thread; each writes to a new directory",
            "CPU time: of the whole process (collect's writer thread included), less sensitive to other processes "
            "on a shared machine than wall-clock time",
        ],
    )
    hand, mine = statistics.median(hand_times), statistics.median(collect_times)
    section.add(**{"method": "hand-written: forward hooks -> numpy.memmap", "seconds": hand, "inputs / s": examples / hand,
                   "throughput vs hand-written (>= 1.0 wanted)": 1.0, "CPU time: hand-written / this": 1.0})
    section.add(**{"method": "tdhook_fx.collect(cm, batches, path)", "seconds": mine, "inputs / s": examples / mine,
                   "throughput vs hand-written (>= 1.0 wanted)": statistics.median(ratios),
                   "CPU time: hand-written / this": statistics.median(cpu_ratios)})
    stop = statistics.median(stop_times)
    section.add(**{"method": "the same, program ending in `stop transformer.h[3].mlp` (no head)", "seconds": stop,
                   "inputs / s": examples / stop, "throughput vs hand-written (>= 1.0 wanted)": statistics.median(stop_ratios)})
    return section


def memory(args, scratch: Path) -> Section:
    section = Section(
        "Peak resident memory collecting one block's output (8 tokens, width 64), fresh process each",
        ["inputs", "MB written", "tdhook_fx.collect: peak RSS MB", "hand-written memmap loop: peak RSS MB"],
        notes=["VmHWM (/proc/self/status); the hand-written loop's memory-mapped pages count as resident while it fills them"],
    )
    for examples in args.memory_sizes:
        log(f"collect: peak memory at {examples} inputs")
        peaks = {}
        for method in ("collect", "hand"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", "memory", method, str(examples), str(scratch / f"rss-{method}-{examples}")],
                capture_output=True, text=True, check=True,
            ).stdout
            peaks[method] = json.loads(out.strip().splitlines()[-1])["peak_rss_kib"] / 1024
            shutil.rmtree(scratch / f"rss-{method}-{examples}", ignore_errors=True)
        section.add(**{
            "inputs": examples, "MB written": examples * 8 * 64 * 4 / 1e6,
            "tdhook_fx.collect: peak RSS MB": peaks["collect"], "hand-written memmap loop: peak RSS MB": peaks["hand"],
        })
    return section


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def memory_child(method: str, examples: int, path: Path) -> None:
    setup_process()
    sample = zoo.gpt2(n_layer=2, n_embd=64, n_head=4, batch=2, seq=8)
    batch = 250
    data = batches(examples // batch, batch, 8)
    if method == "collect":
        cm = tdhook_fx.compile(sample.model, "save transformer.h[1].mlp", example=sample.example,
                               in_keys=sample.in_keys, out_keys=sample.out_keys)
        tdhook_fx.collect(cm, data, path)
    else:
        hand_written(sample.model, [sample.model.transformer.h[1].mlp], data, path, examples, 8, 64)
    print(json.dumps({"peak_rss_kib": peak_rss_kib()}))


def scaling(args, scratch: Path) -> Section:
    cores = os.cpu_count()
    section = Section(
        f"The throughput workload in 1 and 2 processes on this machine ({cores} cores, shared)",
        ["processes x torch threads", "seconds", "speed-up vs 1 x 1"],
        notes=[
            f"load average before: {[round(x, 2) for x in os.getloadavg()]}; median of {args.rounds} alternating rounds",
            (
                "2 processes: torchrun --standalone --nproc-per-node=2 (gloo), each process takes every other batch, "
                "then each copies its part into the one result; times: collect on rank 0, from its start to its end "
                "(process start-up and compilation excluded)"
            ),
        ],
    )
    child = [__file__, "--child", "scale"]
    runs = {
        "1 x 1": [sys.executable, *child, "1", str(args.examples)],
        "1 x 2": [sys.executable, *child, "2", str(args.examples)],
        "2 x 1": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *child, "1", str(args.examples)
        ],
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    speedups: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, command in runs.items():
            log(f"collect: scaling round {round_ + 1}/{args.rounds}, {name}")
            done = subprocess.run([*command, str(scratch / "scale")], capture_output=True, text=True, check=False,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
            out = done.stdout
            seconds[name].append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["seconds"])
            speedups[name].append(seconds["1 x 1"][-1] / seconds[name][-1])
            shutil.rmtree(scratch / "scale", ignore_errors=True)
    for name in runs:
        section.add(**{"processes x torch threads": name, "seconds": statistics.median(seconds[name]),
                       "speed-up vs 1 x 1": statistics.median(speedups[name])})
    return section


def scale_child(threads: int, examples: int, path: Path) -> None:
    setup_process()
    torch.set_num_threads(threads)
    _, cm = workload()
    start = time.perf_counter()
    tdhook_fx.collect(cm, batches(examples // 64, 64, 32), path)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"seconds": time.perf_counter() - start}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer rounds (a smoke run)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "memory":
            memory_child(rest[0], int(rest[1]), Path(rest[2]))
        else:
            scale_child(int(rest[0]), int(rest[1]), Path(rest[2]))
        return 0
    setup_process()
    args.examples = 1024 if args.quick else 2048
    args.rounds = 2 if args.quick else 3
    args.throughput_rounds = 2 if args.quick else 9
    args.memory_sizes = [1000, 10000] if args.quick else [10000, 100000]
    info = machine()
    with tempfile.TemporaryDirectory(prefix="tdhook-fx-collect-") as directory:
        scratch = Path(directory)
        sections = [throughput(args, scratch), memory(args, scratch), scaling(args, scratch)]
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average {info.get('load_average')}\n")
    print("\n\n".join(section.render() for section in sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
