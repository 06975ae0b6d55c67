"""What the data tests run, in this process or in others (`python -m tests.data.workers ...`, `torchrun`).

Everything is deterministic (seeded model and batches), so a parent process can compute the
expected result itself and compare it with what a child, a killed child or a group of ranks wrote.

    python -m tests.data.workers collect PATH [--batches N] [--kill-at K] [--fail-at K --fail-rank R]
                                        [--fetched FILE] [--pause S] [--mask]
    python -m tests.data.workers sweep PATH [--batches N]    # a patching sweep streamed to PATH
    python -m tests.data.workers memory PATH                  # peak memory after 10, then 100 batches
    python -m tests.data.workers train OUT [--steps S]        # DDP steering; writes the vector
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

import torch
from tensordict import TensorDict
from torch import nn

import tdhook_fx
from tdhook_fx.zoo import Sample

VOCAB, WIDTH, SEQ, BATCH = 20, 8, 6, 4
PROGRAM = "save layers[*]"


class TokenModel(nn.Module):
    """Token ids (B, T) -> logits (B, T, V): an embedding, an MLP per token, a head (fx-traceable)."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.head(self.layers(self.embed(input_ids)))


def sample() -> Sample:
    torch.manual_seed(0)
    model = TokenModel().eval()
    return Sample(model, batch(0), ["input_ids"], ["logits"])


def batch(number: int, size: int = BATCH, seq: int = SEQ) -> TensorDict:
    """Batch `number`: token ids, a right-padding attention mask (1 to seq tokens), a label per example."""
    generator = torch.Generator().manual_seed(1000 + number)
    lengths = torch.randint(1, seq + 1, (size, 1), generator=generator)
    return TensorDict(
        input_ids=torch.randint(0, VOCAB, (size, seq), generator=generator),
        attention_mask=(torch.arange(seq) < lengths).long(),
        label=torch.randint(0, 2, (size,), generator=generator),
        batch_size=[size],
    )


def compiled(program: str = PROGRAM):
    s = sample()
    return tdhook_fx.compile(s.model, program, example=s.example, in_keys=s.in_keys, out_keys=s.out_keys)


class Batches(Sequence):
    """Batches 0..count-1, made on demand; optionally logs each fetch, pauses, or dies at one batch."""

    def __init__(self, count: int, log: str | None = None, kill_at: int | None = None, pause: float = 0.0,
                 fail_at: int | None = None, make=batch):
        self.count, self.log, self.kill_at, self.pause, self.fail_at = count, log, kill_at, pause, fail_at
        self.make = make

    def __len__(self):
        return self.count

    def __getitem__(self, number):
        if not isinstance(number, int) or not 0 <= number < self.count:
            raise IndexError(number)
        if number == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers: as a crash
        if number == self.fail_at:
            raise RuntimeError(f"this rank fails at batch {number} (on purpose)")
        if self.log:
            with open(self.log, "a") as file:
                file.write(f"{number}\n")
        time.sleep(self.pause)
        return self.make(number)


def expected(count: int, mask: bool = False) -> TensorDict:
    """What collect must write for batches 0..count-1: the compiled module run batch by batch."""
    cm = compiled()
    results = []
    with torch.no_grad():
        for number in range(count):
            td = cm(batch(number))
            if mask:
                keep = td["attention_mask"].bool()
                row = TensorDict(
                    saved=td["saved"].apply(lambda x, keep=keep: x[keep], batch_size=[int(keep.sum())]),
                    label=td["label"].repeat_interleave(keep.sum(1)),
                    batch_size=[int(keep.sum())],
                )
            else:
                row = TensorDict(saved=td["saved"], label=td["label"], batch_size=td.batch_size)
            results.append(row)
    return torch.cat(results)


def run_collect(args) -> None:
    rank = int(os.environ.get("RANK", "0"))
    fail_at = args.fail_at if args.fail_rank is None or args.fail_rank == rank else None
    log = f"{args.fetched}.{rank}" if args.fetched else None
    batches = Batches(args.batches, log=log, kill_at=args.kill_at, pause=args.pause, fail_at=fail_at)
    options = {"mask": "attention_mask"} if args.mask else {}
    tdhook_fx.collect(compiled(), batches, args.path, outputs=["label"], **options)


def prompts(number: int) -> TensorDict:
    """Batch `number` of prompts for a sweep: target token ids, and source ids at ("patched", "input_ids")."""
    td = batch(number)
    generator = torch.Generator().manual_seed(2000 + number)
    td["patched", "input_ids"] = torch.randint(0, VOCAB, td["input_ids"].shape, generator=generator)
    return td


def last_token_gap(run) -> torch.Tensor:
    return run["logits"][:, -1, 0] - run["logits"][:, -1, 1]


def sweep(batches, path):
    s = sample()
    return tdhook_fx.sweep(s.model, "layers[*]", batches, positions=[0, 3, 5], metric=last_token_gap,
                           in_keys=s.in_keys, out_keys=s.out_keys, path=path)


def run_sweep(args) -> None:
    sweep(Batches(args.batches, pause=args.pause, make=prompts), args.path)


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def run_memory(args) -> None:
    """Collect 10, then 100 wide batches made on the fly; print the peak resident memory after each."""
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    example = TensorDict(input=torch.randn(512, 256), batch_size=[512])
    cm = tdhook_fx.compile(model, "save {0,2}", example=example)

    def batches(count):
        generator = torch.Generator().manual_seed(0)
        for _ in range(count):
            yield TensorDict(input=torch.randn(512, 256, generator=generator), batch_size=[512])

    report = {}
    for count in (10, 100):
        stored = tdhook_fx.collect(cm, batches(count), os.path.join(args.path, str(count)))
        report[count] = {"rows": stored.batch_size[0], "peak_rss_kib": peak_rss_kib()}
    print(json.dumps(report))


class Steered(nn.Module):
    """A compiled module with a trainable steering vector `v`, passed in as the runtime value $v."""

    def __init__(self, cm):
        super().__init__()
        self.cm = cm
        self.v = nn.Parameter(torch.zeros(WIDTH))

    def forward(self, td: TensorDict) -> torch.Tensor:
        td = td.copy()
        td["v"] = self.v.expand(td.batch_size[0], 1, WIDTH)
        return self.cm(td)["logits"]


def steering_loss(logits: torch.Tensor) -> torch.Tensor:
    """Push every token towards class 3."""
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.full((logits.shape[0] * logits.shape[1],), 3))


def train(batches, steps: int, wrap=lambda module: module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A plain loop training the steering vector on `batches` (one per step); the vector and each step's gradient."""
    cm = compiled("steer layers[0] += $v")
    cm.base_model.requires_grad_(False)
    steered = wrap(Steered(cm))
    optimizer = torch.optim.SGD(steered.parameters(), lr=0.5)
    grads = []
    for step in range(steps):
        optimizer.zero_grad()
        steering_loss(steered(batches[step])).backward()
        grads.append(next(steered.parameters()).grad.clone())
        optimizer.step()
    return next(steered.parameters()).detach().clone(), grads


def run_train(args) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # each step, each rank takes its half of one 8-example batch
    batches = [batch(step, size=8)[rank::world] for step in range(args.steps)]
    vector, grads = train(batches, args.steps, wrap=DistributedDataParallel)
    if rank == 0:
        torch.save({"vector": vector, "grads": grads}, args.path)
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["collect", "sweep", "memory", "train"])
    parser.add_argument("path")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--fail-at", type=int)
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--fetched")
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--mask", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    {"collect": run_collect, "sweep": run_sweep, "memory": run_memory, "train": run_train}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
