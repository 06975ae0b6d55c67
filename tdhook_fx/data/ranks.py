"""The processes of a run: this one alone, or one rank of a `torch.distributed` group.

`Ranks.current()` is this process's place: rank 0 of 1 outside torch.distributed; under
`torchrun` (which sets RANK and WORLD_SIZE) it joins the default process group, initialising
it if the script did not. Batch `i` belongs to rank `i % world`: DistributedSampler's order
(shuffle=False) without its padding, so no batch is taken twice and none is left out.

The few collective steps (agreeing on an error, gathering each rank's summary) go through
torch.distributed's object collectives on a gloo group (the default group when its backend
has gloo, e.g. "gloo" or "cpu:gloo,cuda:nccl").
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from tdhook_fx.errors import TdhookFxError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's rank among `world` processes (`group`: the gloo group for collectives)."""

    rank: int = 0
    world: int = 1
    group: object = None

    @classmethod
    def current(cls) -> Ranks:
        """The running torch.distributed group's place for this process (rank 0 of 1 without one)."""
        import torch.distributed as dist

        if not dist.is_available():
            return cls()
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return cls()
            dist.init_process_group()  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, ...
            atexit.register(_destroy_group)  # started here: ended here (see `_destroy_group`)
        world = dist.get_world_size()
        if world == 1:
            return cls()
        return cls(dist.get_rank(), world, _gloo_group())

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owns(self, batch: int) -> bool:
        """Whether batch number `batch` is this rank's (DistributedSampler's order)."""
        return batch % self.world == self.rank

    def share(self, batches: Iterable[T]) -> Iterator[T]:
        """This rank's batches of `batches`, in order (every rank must be given the same ones)."""
        for index, batch in enumerate(batches):
            if self.owns(index):
                yield batch

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order (a plain list of one outside torch.distributed)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        found = [None] * self.world
        dist.all_gather_object(found, value, group=self.group)
        return found

    def together(self, step: Callable[[], T], what: str) -> T:
        """Run `step` on every rank; if it fails on any, raise on all (each rank's own error where it failed).

        The ranks stay in step: none waits forever in a later collective for one that failed.
        """
        error = None
        try:
            result = step()
        except Exception as raised:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = raised
        failures = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for rank, failure in enumerate(failures):
            if failure is not None:
                raise TdhookFxError(f"{what} failed on rank {rank} of {self.world}: {failure}")
        return result


_GLOO_GROUPS: dict[int, object] = {}  # per default group: made once (making a group is a collective step)


def _gloo_group():
    """None (the default group) when its backend has gloo, else a gloo group of all ranks."""
    import torch.distributed as dist

    if "gloo" in str(dist.get_backend()):
        return None
    world = id(dist.group.WORLD)
    if world not in _GLOO_GROUPS:
        _GLOO_GROUPS[world] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[world]


def shard(batches: Iterable[T]) -> Iterator[T]:
    """This process's share of `batches` under torch.distributed (all of them in a single process).

    Rank r of W takes batches r, r+W, r+2W, ...: the split `collect` and `sweep` use, for a
    training loop of your own (every rank must iterate the same batches in the same order).
    """
    return Ranks.current().share(batches)


def _destroy_group() -> None:
    """Destroy the process group `Ranks.current` started, at exit: left to the interpreter's
    shutdown, gloo's threads sometimes outlive it and the rank aborts ("terminate called without
    an active exception", exit code -6) after its work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

