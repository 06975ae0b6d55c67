"""What the `rule` pass puts in the graph: relevance rules as plain, differentiable torch code.

Every rule keeps the forward value exactly and changes only what the backward carries, with two
tricks that autograd, torch.compile and torch.export all treat as ordinary ops (no hooks, no
custom autograd function):

- `x0 + (x - x0) * w` with `x0 = x.detach()` is `x` in value, and its gradient is the incoming
  one times `w` (so `w = x0` turns a gradient into gradient x input);
- `y.detach() + (s - s.detach())` is `y` in value, and the gradient flows back through `s`
  instead of through the module (a surrogate computed from the module's inputs, for example
  with changed parameters).

A backward through the rewritten graph then carries relevance instead of gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def stabilized(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """`z` moved `epsilon` away from zero (towards its sign; zero counts as positive)."""
    return z + torch.where(z < 0, -epsilon, epsilon)


def times_input(x: torch.Tensor) -> torch.Tensor:
    """`x`, whose gradient comes back multiplied by `x` (gradient x input)."""
    x0 = x.detach()
    return x0 + (x - x0) * x0


def epsilon_normalized(y: torch.Tensor, epsilon: float, count: int = 1) -> torch.Tensor:
    """`y`, whose gradient comes back divided by `y` stabilized by `epsilon` (and by `count`)."""
    y0 = y.detach()
    part = y - y0
    if count != 1:
        part = part / count
    return y0 + part / stabilized(y0, epsilon)


def rerouted(y: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """`y` in value; its gradient flows through `surrogate` (not through what computed `y`)."""
    return y.detach() + (surrogate - surrogate.detach())


def passed(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`y`, whose gradient goes to `x` unchanged (the module passes relevance through)."""
    return rerouted(y, x)


def stopped(y: torch.Tensor) -> torch.Tensor:
    """`y` without a gradient: no relevance reaches the module's inputs."""
    return y.detach()


def shared(y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """`y`, whose gradient goes to each input divided by their number."""
    return rerouted(y, sum(x / len(inputs) for x in inputs))


def softmax_relevance(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`y` = softmax(x), whose gradient R comes back as x * (R - y * sum(R)) over the last
    dimension; inputs of -inf (masked scores) count as 0."""
    weights = torch.where(torch.isneginf(x), 0.0, x).detach()
    weighted = x.detach() + (x - x.detach()) * weights
    return rerouted(y, weighted - (y.detach() * weighted).sum(-1, keepdim=True))


def pseudo_identity(y: torch.Tensor, x: torch.Tensor, stabilizer: float) -> torch.Tensor:
    """`y`, whose gradient comes back to `x` multiplied by y / x (stabilized)."""
    x0 = x.detach()
    return rerouted(y, x0 + (x - x0) * (y.detach() / stabilized(x0, stabilizer)))


def values_only(y: torch.Tensor) -> torch.Tensor:
    """`y` = (query, key, value) along the last dimension, with query and key held constant."""
    split = y.shape[-1] // 3 * 2
    return torch.cat([y[..., :split].detach(), y[..., split:]], dim=-1)


# ---- rules that recompute the module ------------------------------------------------------------


def surrogate(rule: nn.Module, y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """`y` with the gradient of `rule` (a `ChangedParameters` or `LayerNormEpsilon` of the graph)."""
    return rule(y, *inputs)


def changed_forward(module: nn.Module, parameters: dict, *inputs: torch.Tensor) -> torch.Tensor:
    """`module(*inputs)` with some of its own parameters replaced."""
    if isinstance(module, nn.Linear):
        return nn.functional.linear(inputs[0], parameters["weight"], parameters.get("bias"))
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward(inputs[0], parameters["weight"], parameters.get("bias"))
    return functional_call(module, parameters, inputs)


class ChangedParameters(nn.Module):
    """A rule that passes relevance through the module recomputed with other parameters.

    - `w_square`: inputs of ones, parameters squared: R_i = J'^T (R / z');
    - `flat`: inputs of ones, weights of ones and no bias;
    - `alpha_beta`: positive and negative parts of the inputs through positive and negative
      parameters; alpha times the positive contributions minus beta times the negative ones,
      each normalized by its own total (the bias counts with its sign).

    The graph calls it through `surrogate(self.rule_<site>, y, *inputs)`: `y` with the new gradient.
    """

    def __init__(self, module: nn.Module, rule: str, arguments: dict[str, float], site: str):
        super().__init__()
        self.module = module
        self.rule = rule
        self.arguments = dict(arguments)
        self.site = site

    def extra_repr(self) -> str:
        values = ", ".join(f"{name}={value:g}" for name, value in self.arguments.items())
        return f"rule {self.site} = {self.rule}({values})"

    def _changed(self, change) -> dict:
        return {name: change(name, p) for name, p in self.module.named_parameters(recurse=False)}

    def forward(self, y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        if self.rule == "alpha_beta":
            return rerouted(y, self._alpha_beta(inputs[0]))
        if self.rule == "w_square":
            parameters = self._changed(lambda name, p: p * p)
        else:
            parameters = self._changed(lambda name, p: torch.zeros_like(p) if name == "bias" else torch.ones_like(p))
        ones = [torch.ones_like(x) + (x - x.detach()) for x in inputs]  # ones in value, the gradient goes to x
        z = changed_forward(self.module, parameters, *ones)
        return rerouted(y, z / stabilized(z.detach(), self.arguments["stabilizer"]))

    def _alpha_beta(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta, stabilizer = self.arguments["alpha"], self.arguments["beta"], self.arguments["stabilizer"]
        positive, negative = x.detach().clamp(min=0), x.detach().clamp(max=0)
        change = x - x.detach()
        x_positive, x_negative = positive + change * positive, negative + change * negative  # gradient x input part

        def through(sign: int, bias: bool, part: torch.Tensor) -> torch.Tensor:
            def clamp(name, p):
                if name == "bias" and not bias:
                    return torch.zeros_like(p)
                return p.clamp(min=0) if sign > 0 else p.clamp(max=0)

            return changed_forward(self.module, self._changed(clamp), part)

        activating = through(1, True, x_positive) + through(-1, False, x_negative)
        found = alpha * (activating / stabilized(activating.detach(), stabilizer))
        if beta:
            inhibiting = through(-1, True, x_positive) + through(1, False, x_negative)
            found = found - beta * (inhibiting / stabilized(inhibiting.detach(), stabilizer))
        return found


class LayerNormEpsilon(nn.Module):
    """LXT's LayerNorm rule (AttnLRP, Achtibat et al. 2024): the epsilon rule through the
    normalization with its standard deviation held constant (the identity rule on 1/std):
    R_in = x * J^T (R / (s + epsilon)), s = (x - mean) / std * weight + bias over the last dim."""

    def __init__(self, module: nn.Module, epsilon: float, site: str):
        super().__init__()
        self.module = module
        self.epsilon = epsilon
        self.site = site

    def extra_repr(self) -> str:
        return f"rule {self.site} = layer_norm({self.epsilon:g})"

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = times_input(x)
        centred = x - x.mean(dim=-1, keepdim=True)
        std = (centred.square().mean(dim=-1, keepdim=True) + self.module.eps).sqrt()
        s = centred / std.detach()
        if self.module.weight is not None:
            s = s * self.module.weight
        if self.module.bias is not None:
            s = s + self.module.bias
        return rerouted(y, s / (s.detach() + self.epsilon))
