"""The oracle for generation: Hugging Face `model.generate` with the program applied by forward hooks.

Independent of the compiler and of `tdhook_fx.generation`'s own position handling: the hooks
are `tdhook_fx.reference`'s, and positions are handled the plainest way there is. Each hooked
value holds the positions a forward computes (the last ones of the sequence so far, as the cache
says), so each statement keeps a buffer of its site over the whole sequence: the forward's chunk
is written into it, the statement is applied to the whole buffer with the program's own index
(exactly as in one forward over the whole sequence), and the chunk is read back. A saved value
is its buffer, cut to the positions computed, indexed at the end.

`seq_dim` is the sequence dimension of the hooked sites (1 for the hidden states of Hugging
Face causal language models: batch, sequence, features).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from tdhook_fx.reference import _HookedProgram, _pruned, _Recorder
from tdhook_fx.syntax import ast
from tdhook_fx.syntax.parse import parse


def generate(
    model: nn.Module, program, input_ids: torch.Tensor, *, values=None, max_new_tokens: int, seq_dim: int = 1,
    **generation_kwargs,
) -> dict:
    """`model.generate(input_ids, max_new_tokens=..., **generation_kwargs)` with `program` applied.

    Returns {"sequences": ..., "logits": (batch, new, vocab), ("saved", name): ...}: the tokens,
    the logits each new token was chosen from, and each saved value over every position computed.
    """
    program = parse(program) if isinstance(program, str) else program
    hooked = _HookedProgram(model, program, dict(values or {}))
    hooks = hooked.plan_hooks(program.statements)
    total = input_ids.shape[1] + max_new_tokens
    recorder = _PositionRecorder(hooked, hooks, total, seq_dim)
    handles = [model.register_forward_pre_hook(recorder.on_forward, with_kwargs=True)]
    for name in {module for module, _, _ in hooks}:
        module = hooked.modules[name]
        handles.append(module.register_forward_pre_hook(recorder._pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(recorder._post(name), with_kwargs=True))
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        generation_kwargs.setdefault("logits_to_keep", 0)  # every position reaches the head, as in one forward
    edits = [s for s in program.statements if isinstance(s, ast.Prune) or hooked.edited_parameters(s)]
    try:
        with _pruned(hooked, edits, recorder._eval), torch.no_grad():
            output = model.generate(
                input_ids, max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_logits=True,
                **generation_kwargs,
            )
    finally:
        for handle in handles:
            handle.remove()
    sequences = output.sequences
    result = {"sequences": sequences, "logits": torch.stack(output.logits, dim=1)}
    computed = sequences.shape[1] - 1
    for name, (key, index) in recorder.save_points.items():
        whole = recorder.buffers[key].narrow(seq_dim, 0, computed)
        items = recorder._index(index)
        result[("saved", name)] = whole if items is None else whole[items]
    return result


class _PositionRecorder(_Recorder):
    """The reference's hooks, applied to buffers over the whole sequence (see the module doc)."""

    def __init__(self, hooked, hooks, total: int, seq_dim: int):
        super().__init__(hooked, hooks, record_only=False)
        self.total = total
        self.seq_dim = seq_dim
        self.end = 0  # positions computed once the current forward is done
        self.buffers: dict = {}  # (statement, site) -> the site's values over the whole sequence
        self.save_points: dict = {}  # saved name -> (buffer key, index)

    def on_forward(self, module, args, kwargs):
        """Each forward of the model computes the positions after those in its cache."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        self.end = past + ids.shape[1]
        self.calls.clear()

    def apply(self, statement, value: torch.Tensor, index, site: str) -> torch.Tensor:
        key = (id(statement), site)
        chunk = value.shape[self.seq_dim]
        buffer = self.buffers.get(key)
        if buffer is None:
            shape = list(value.shape)
            shape[self.seq_dim] = self.total
            buffer = self.buffers[key] = value.new_zeros(shape)
        buffer.narrow(self.seq_dim, self.end - chunk, chunk).copy_(value)
        if isinstance(statement, ast.Save):
            self.save_points[statement.name or site] = (key, index)
            super().apply(statement, buffer, index, site)  # for `@name` in later statements
            return value
        return super().apply(statement, buffer, index, site).narrow(self.seq_dim, self.end - chunk, chunk)
