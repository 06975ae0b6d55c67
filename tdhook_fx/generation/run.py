"""One generation: the prompt, the static cache, the two compiled steps and the decoding loop.

`Generation(model, input_ids, attention_mask, max_new_tokens)` sets up what every program needs
(the step module, its cache, the site tables of the prompt, of one decoding step and of the whole
sequence); `generation.run(...)` compiles a program into the prefill and decoding steps and
decodes:

    prefill:  logits = prefill(prompt, mask, positions, 0, *cache)          positions 0 .. T-1
    step i:   logits = decode(token, mask, position, T + i, *cache, gates)  position T + i

Each position is computed once; the last token chosen is not computed (as in `model.generate`).
Token choice, end-of-sequence handling and padding follow `model.generate` (see `sampling`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tdhook_fx.compiler.capture import SiteTable
from tdhook_fx.errors import GenerationError
from tdhook_fx.generation.positions import PositionPlan, plan_positions, whole_sequence_table
from tdhook_fx.generation.sampling import DecodingOptions
from tdhook_fx.generation.step import (
    cache_length,
    cache_shape,
    head_module,
    in_keys,
    keeps_last_logits,
    step_model,
)
from tdhook_fx.generation.steps import compile_step, site_table
from tdhook_fx.syntax import ast


@dataclass
class Generated:
    """What a generation produced."""

    sequences: torch.Tensor  # (batch, prompt + new)
    saved: dict[str, torch.Tensor]  # every position computed, joined along the sequence
    logits: list[torch.Tensor] = field(default_factory=list)  # per new token: (batch, vocab), float32
    scores: list[torch.Tensor] = field(default_factory=list)  # the same after temperature/top-k/top-p
    prefill: nn.Module | None = None  # the compiled prefill step
    decode: nn.Module | None = None  # the compiled decoding step


class Generation:
    """The setting of one generation: prompt, cache and site tables (shared by every program run on it)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int):
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise GenerationError(
                f"the prompt must be token ids of shape (batch, length); got a {str(input_ids.dtype).removeprefix('torch.')} "
                f"tensor of shape {tuple(input_ids.shape)}"
            )
        batch, prompt = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != (batch, prompt):
            raise GenerationError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; the prompt has shape {(batch, prompt)}"
            )
        self.model = model
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt
        self.computed = prompt + max_new_tokens - 1  # positions computed at most (the last token is not)
        shape = cache_shape(model)
        length = cache_length(prompt + max_new_tokens)
        self.length = length
        self.step = step_model(model, length)
        self.head = head_module(model) if keeps_last_logits(model) else None
        self.keys = in_keys(shape)
        device = input_ids.device
        self.cache = shape.allocate(batch, length, device)
        self.mask = torch.ones(batch, length, dtype=attention_mask.dtype, device=device)
        self.mask[:, :prompt] = attention_mask
        # as model.generate: positions count the real tokens (left padding sits at position 0)
        self.positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.prefill_inputs = (input_ids, self.mask, self.positions, self._start(0), *self.cache)
        self.decode_inputs = self._decode_inputs(input_ids[:, -1:], self.positions[:, -1:] + 1, prompt)
        prefill_table = site_table(self.step, self.prefill_inputs, self.keys)
        decode_table = site_table(self.step, self.decode_inputs, self.keys)
        if prompt > 1:
            other, other_length = prefill_table, prompt
        else:  # a one-token prompt: a two-token chunk tells which dimensions follow the sequence
            probe = (input_ids.repeat(1, 2), self.mask, self.positions.repeat(1, 2), self._start(0), *self.cache)
            other, other_length = site_table(self.step, probe, self.keys), 2
        self.whole, self.sequence_dims = whole_sequence_table(other, other_length, decode_table, 1, self.computed, self.step)

    @property
    def sites(self) -> SiteTable:
        """The step's sites over the whole sequence (what a program is resolved against)."""
        return self.whole

    def _start(self, position: int) -> torch.Tensor:
        return torch.tensor(position, device=self.input_ids.device)

    def _decode_inputs(self, tokens, positions, position: int) -> tuple:
        return (tokens, self.mask, positions, self._start(position), *self.cache)

    def run(
        self,
        module_class: type,
        program: ast.Program,
        values: dict,
        options: DecodingOptions,
        *,
        text: str | None = None,
        source: str = "program",
        compiled: bool | dict = False,
    ) -> Generated:
        """Compile `program` (with runtime `values`) into the two steps and generate."""
        plan, prefill, decode = self.steps(module_class, program, values, text=text, source=source, compiled=compiled)
        with torch.no_grad():
            result = self._decode(plan, prefill, decode, values, options)
        result.prefill, result.decode = prefill, decode
        return result

    def steps(
        self,
        module_class: type,
        program: ast.Program,
        values: dict,
        *,
        text: str | None = None,
        source: str = "program",
        compiled: bool | dict = False,
        reuse: bool = True,
    ) -> tuple[PositionPlan, nn.Module, nn.Module | None]:
        """The program's position plan and its compiled prefill and decoding steps (None when one
        new token needs no decoding step); `reuse=False` compiles modules of the caller's own."""
        plan = plan_positions(program, self.whole, self.sequence_dims, values, self.prompt, text, source)
        prefill = compile_step(
            module_class, self._prefill_step(plan), plan.prefill, self.prefill_inputs, self.keys,
            text=text, source=source, reuse=reuse,
        )
        decode = None
        if self.max_new_tokens > 1:
            decode = compile_step(
                module_class, self.step, plan.decode, self.decode_inputs, self.keys,
                text=text, source=source, compiled=compiled, reuse=reuse,
            )
        return plan, prefill, decode

    def _prefill_step(self, plan: PositionPlan) -> nn.Module:
        """The prompt's step module: the head at the last position only (as `model.generate` computes
        it), unless the program touches the head, whose values at every position it then needs."""
        if self.head is None or any(m == self.head or m.startswith(self.head + ".") for m in plan.modules):
            return self.step
        return step_model(self.model, self.length, last_logits=True)

    def _decode(self, plan: PositionPlan, prefill, decode, values: dict, options: DecodingOptions) -> Generated:
        out = prefill(*self.prefill_inputs, **_runtime(prefill, values))
        saved_prefill = out.get("saved", {})
        logits = out["logits"][:, -1].to(copy=True, dtype=torch.float32)
        sequences = self.input_ids
        unfinished = torch.ones(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        positions = self.positions[:, -1:]
        steps: list[dict] = []
        result = Generated(sequences, {})
        for number in range(self.max_new_tokens):
            tokens, scores = options.choose(sequences, logits)
            if options.eos_token_ids is not None:
                tokens = torch.where(unfinished, tokens, torch.full_like(tokens, options.pad_token_id))
            sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
            unfinished &= ~options.ended(tokens)
            if options.output_logits:
                result.logits.append(logits)
            if options.output_scores:
                result.scores.append(scores)
            if number == self.max_new_tokens - 1 or not bool(unfinished.any()):
                break
            position = self.prompt + number
            positions = positions + 1
            runtime = _runtime(decode, {**values, **plan.gate_values(position, sequences.device)})
            out = decode(*self._decode_inputs(tokens[:, None], positions, position), **runtime)
            steps.append({name: v for name, v in out.get("saved", {}).items() if plan.keeps(name, position)})
            logits = out["logits"][:, -1].to(copy=True, dtype=torch.float32)
        result.sequences = sequences
        result.saved = plan.assemble(saved_prefill, steps, self.prompt + len(steps))
        return result


def _runtime(step, values: dict) -> dict:
    """The runtime values `step` takes (a missing one is reported by the step, by name)."""
    return {name: values[name] for name in step.runtime_names if name in values}
