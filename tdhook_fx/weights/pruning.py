"""Pruning: zero weights by importance, compiled as `prune` statements (the model is never touched).

On enter, `importance_callback(module_key=..., parameter_name=..., parameter=...)` scores each
parameter (None skips it), and the masks are computed by `torch.nn.utils.prune`'s own
methods, exactly as tdhook's `prune.global_unstructured` (global, L1 on the scores) or
`prune.ln_structured` (`modules_to_prune={path: (dim, amount)}`) would. Each mask becomes
`prune PARAM N by $prune_mask_0` with the mask bound as the scores (its N zeros are exactly
the weights to prune). The compiled graph multiplies the weight by the mask where its module
uses it; the model's parameters are never changed, so there is nothing to restore on exit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torch.nn.utils import prune as torch_prune

from tdhook_fx.errors import InvalidArgument
from tdhook_fx.methods.context import OnePassMethod
from tdhook_fx.methods.paths import dsl_path, module_names, resolve_submodule
from tdhook_fx.syntax import ast


class Pruning(OnePassMethod):
    """Prune by importance, globally (`amount_to_prune`) or per module (`modules_to_prune`)."""

    def __init__(
        self,
        importance_callback: Callable,
        amount_to_prune: float | None = None,
        modules_to_prune: dict[str, tuple[int, float | int | None]] | None = None,
        skip_modules: Callable[[str, nn.Module], bool] | None = None,
        relative_path: str | None = None,
    ):
        if amount_to_prune is None and modules_to_prune is None:
            raise InvalidArgument("`amount_to_prune` is required for global pruning")
        super().__init__()
        self._importance_callback = importance_callback
        self._amount_to_prune = amount_to_prune
        self._modules_to_prune = modules_to_prune
        self._skip_modules = skip_modules
        self._relative_path = relative_path or ""
        self._masks: dict[str, torch.Tensor] = {}  # parameter name in the model -> mask
        self._pruned: dict[str, int] = {}  # parameter name -> how many weights its mask zeros

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The masks of the active context, by parameter name (1 keeps a weight, 0 prunes it)."""
        return dict(self._masks)

    def enter(self, hooked) -> None:
        interface = hooked.interface
        root = resolve_submodule(interface.root, self._relative_path)
        names = module_names(interface.model)
        if id(root) not in names:
            raise InvalidArgument(f"relative_path {self._relative_path!r} names a module outside the model")
        prefix = names[id(root)]
        with torch.no_grad():
            if self._modules_to_prune is None:
                masks = self._global_masks(root)
            else:
                masks = self._structured_masks(root)
        self._masks = {_join(prefix, module, parameter): mask for (module, parameter), mask in masks.items()}
        self._pruned = {name: int((mask == 0).sum()) for name, mask in self._masks.items()}  # counted once

    def exit(self, hooked) -> None:
        self._masks, self._pruned = {}, {}

    def _global_masks(self, root: nn.Module) -> dict:
        entries = []
        for name, submodule in root.named_modules():
            if self._skip_modules and self._skip_modules(name, submodule):
                continue
            for parameter_name, parameter in submodule.named_parameters(recurse=False):
                score = self._importance_callback(
                    module_key=name, parameter_name=parameter_name, parameter=parameter
                )
                if score is not None:
                    entries.append(((name, parameter_name), parameter, torch.as_tensor(score)))
        if not entries:
            return {}
        scores = torch.cat([score.reshape(-1) for _, _, score in entries])
        method = torch_prune.L1Unstructured(amount=self._amount_to_prune)
        flat = method.compute_mask(scores, default_mask=torch.ones_like(scores))
        masks, start = {}, 0
        for key, parameter, _ in entries:
            masks[key] = flat[start : start + parameter.numel()].view_as(parameter)
            start += parameter.numel()
        return masks

    def _structured_masks(self, root: nn.Module) -> dict:
        masks = {}
        names = module_names(root)
        for path, (dim, amount) in self._modules_to_prune.items():
            submodule = resolve_submodule(root, path)
            name = names[id(submodule)]
            for parameter_name, parameter in submodule.named_parameters(recurse=False):
                score = self._importance_callback(
                    module_key=path, parameter_name=parameter_name, parameter=parameter
                )
                if score is None:
                    continue
                method = torch_prune.LnStructured(amount=amount or self._amount_to_prune, n=1, dim=dim)
                score = torch.as_tensor(score)
                masks[(name, parameter_name)] = method.compute_mask(
                    score, default_mask=torch.ones_like(score)
                )
        return masks

    def build(self, hooked, builder, table, td):
        for name, mask in self._masks.items():
            pruned = self._pruned[name]
            module = name.rpartition(".")[0]
            if not pruned or not table.calls(module):
                continue  # nothing to zero, or a module the model never calls (its weights do nothing)
            scores = builder.var("prune_mask", mask)
            builder.add(ast.Prune(dsl_path(name), ast.Amount(pruned, False), ast.Importance(scores)))

    @staticmethod
    def default_skip(name: str, module: nn.Module) -> bool:
        return name in ("", "td_module", "module") or isinstance(
            module, (nn.ModuleList, nn.Sequential, TensorDictModule)
        )


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)
