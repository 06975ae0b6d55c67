"""Workflow data in shared or consolidated storage: written in place, so another process sees it.

A TensorDict in shared memory (`share_memory_()`) or consolidated into one buffer
(`consolidate()`) is how tensordict hands data between processes. A `Workflow` run on one keeps
that storage: each step works on a shallow copy, and the outputs it declares are copied into
the original leaves (which must exist beforehand with the same shape, dtype and device). What
cannot survive the handoff is refused with `WorkflowHandoffError`: non-tensor leaves, leaves
off the CPU or requiring gradients, a step that changes keys or metadata, a method that keeps
an autograd graph for the caller's backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase

from tdhook_fx._types import tensor_leaf_items
from tdhook_fx.errors import WorkflowHandoffError
from tdhook_fx.execution import AutogradLifetime, ExecutionSpec

DISCARDED = "_"  # an operator's out_key that is not written


def _leaf_keys(data: TensorDictBase) -> frozenset:
    return frozenset(key for key, _ in tensor_leaf_items(data))


@dataclass(frozen=True)
class Handoff:
    """The storage facts of a shared or consolidated TensorDict, checked after every step."""

    data: TensorDictBase
    keys: frozenset
    batch_size: torch.Size
    device: torch.device | None
    shared: bool
    consolidated: bool

    @classmethod
    def of(cls, data: TensorDictBase) -> Handoff | None:
        """The handoff facts of `data`, or None when its storage is ordinary."""
        shared, consolidated = data.is_shared(), data.is_consolidated()
        if not (shared or consolidated):
            return None
        for key, value in tensor_leaf_items(data):
            if not isinstance(value, torch.Tensor):
                raise WorkflowHandoffError(
                    f"Workflow handoff artifact key {key!r} must contain a Tensor, got {type(value).__name__}"
                )
            if value.device.type != "cpu":
                raise WorkflowHandoffError(
                    f"Workflow handoff artifact key {key!r} is on {value.device}; local process handoff requires CPU tensors"
                )
            if value.requires_grad:
                raise WorkflowHandoffError(
                    f"Workflow handoff artifact key {key!r} requires gradients; detach tensors before process handoff"
                )
        return cls(data, _leaf_keys(data), data.batch_size, data.device, shared, consolidated)

    def working_copy(self) -> TensorDictBase:
        """The containers copied; the leaves still the shared storage."""
        return self.data.clone(recurse=False)

    def check_step(self, out_keys, spec: ExecutionSpec | None) -> None:
        if spec is not None and spec.autograd_lifetime is AutogradLifetime.BACKWARD:
            raise WorkflowHandoffError(
                "Workflow handoff artifacts cannot retain an autograd graph for deferred backward execution"
            )
        missing = [key for key in out_keys if key != DISCARDED and key not in self.keys]
        if missing:
            raise WorkflowHandoffError(
                "Workflow handoff artifact storage requires every output to be preallocated; "
                f"missing output keys: {list(dict.fromkeys(missing))!r}"
            )

    def commit(self, current: TensorDictBase, working: TensorDictBase, step: str, out_keys) -> None:
        """Copy a step's declared outputs into the shared storage, after checking it kept the rest."""
        if current is not working:
            raise WorkflowHandoffError(
                f"Workflow step {step!r} returned a different TensorDict; "
                "handoff workflows must mutate their input TensorDict in place"
            )
        if current.batch_size != self.batch_size or current.device != self.device:
            raise WorkflowHandoffError(f"Workflow step {step!r} changed artifact batch size or device metadata")
        if _leaf_keys(current) != self.keys:
            raise WorkflowHandoffError(f"Workflow step {step!r} changed artifact keys")
        for key in out_keys:
            if key == DISCARDED:
                continue
            source, destination = current.get(key), self.data.get(key)
            if not isinstance(source, torch.Tensor) or not isinstance(destination, torch.Tensor):
                raise WorkflowHandoffError(f"Workflow handoff output {key!r} must remain a Tensor")
            facts = (source.shape, source.dtype, source.device)
            expected = (destination.shape, destination.dtype, destination.device)
            if facts != expected:
                raise WorkflowHandoffError(
                    f"Workflow handoff output {key!r} has shape/dtype/device {facts!r}, expected {expected!r}"
                )
            with torch.no_grad():
                destination.copy_(source.detach())
                if self.consolidated:
                    self._storage_view(key, destination).copy_(source.detach())

    def _storage_view(self, key, destination: torch.Tensor) -> torch.Tensor:
        """The bytes of `key` in the consolidated buffer (a leaf rebuilt by another process may no
        longer view the buffer, which the next handoff sends)."""
        parts = (key,) if isinstance(key, str) else tuple(key)
        record = getattr(self.data, "_consolidated", None)
        if not isinstance(record, Mapping):
            raise WorkflowHandoffError("TensorDict reported consolidated storage without storage metadata")
        metadata, storage = record.get("metadata"), record.get("storage")
        if not isinstance(metadata, Mapping) or not isinstance(storage, torch.Tensor):
            raise WorkflowHandoffError("Consolidated TensorDict storage metadata is unavailable")
        for part in parts[:-1]:
            metadata = metadata.get(part)
            if not isinstance(metadata, Mapping):
                raise WorkflowHandoffError(f"Consolidated storage metadata is missing output {key!r}")
        leaves = metadata.get("leaves")
        if not isinstance(leaves, Mapping) or parts[-1] not in leaves:
            raise WorkflowHandoffError(f"Consolidated storage metadata is missing output {key!r}")
        start, stop = leaves[parts[-1]][2:4]
        return storage[start:stop].view(destination.dtype)[: destination.numel()].view(destination.shape)

    def result(self) -> TensorDictBase:
        """The original TensorDict, checked to still have the storage it came with."""
        data = self.data
        same = (
            data.batch_size == self.batch_size
            and data.device == self.device
            and data.is_shared() == self.shared
            and data.is_consolidated() == self.consolidated
            and _leaf_keys(data) == self.keys
        )
        if not same:
            raise WorkflowHandoffError("Workflow changed native handoff artifact storage or metadata")
        return data
