"""Datasets, disk and many processes: `collect` over batches into a memory-mapped TensorDict, resumable,
data-parallel under `torchrun` (`shard` gives a training loop the same split of batches)."""

from tdhook_fx.data.collect import collect
from tdhook_fx.data.ranks import shard

__all__ = ["collect", "shard"]
