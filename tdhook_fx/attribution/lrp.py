"""Layer-wise relevance propagation (tdhook.attribution.lrp's `LRP`), as graph rewrites.

```python
from tdhook_fx.attribution.lrp import LRP
from tdhook_fx.attribution.lrp_helpers.rules import EpsilonPlus
with LRP(rule_mapper=EpsilonPlus(), skip_modules=LRP.default_skip, init_attr_targets=target).prepare(model) as hooked:
    td = hooked(td)              # td["attr", "input"]: the relevance at the input
```

`rule_mapper(name, module)` gives each module (model-relative name, "" for the model itself) a
rule of `lrp_helpers.rules`, or None. Each rule becomes a statement `rule SITE = NAME(ARGS)` of
the compiled program, one per call of the module, placed before the attribution's own
statements; the backward through the rewritten graph carries relevance, which the gradient
attribution pipeline reads at the inputs (and at `input_modules`, before their own rule). The
relevance starts at the targets as `init_attr_grads` (ones by default), as in tdhook. Nothing
is hooked: the program prints (`hooked.program`, `hooked.code`), exports and compiles.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from tensordict.nn import TensorDictModule
from torch import nn

from tdhook_fx.attribution.gradients import GradientAttribution
from tdhook_fx.attribution.lrp_helpers.rules import IgnoreRule, Rule
from tdhook_fx.compiler.capture.sites import SiteTable
from tdhook_fx.errors import InvalidArgumentType, MethodUsageError
from tdhook_fx.methods.programs import ProgramBuilder
from tdhook_fx.methods.reads import dsl_site
from tdhook_fx.syntax import ast


class LRP(GradientAttribution):
    """tdhook's `LRP`: the gradient attribution parameters, plus

    - `rule_mapper(name, module) -> Rule | None`: the rule of each module (None: its plain
      gradient, with a warning when `warn_on_missing_rule`);
    - `skip_modules(name, module) -> bool`: modules that get no rule and no warning
      (`LRP.default_skip` skips the model itself and containers).
    """

    def __init__(
        self,
        *args,
        rule_mapper: Callable[[str, nn.Module], Rule | None] | None = None,
        warn_on_missing_rule: bool = True,
        skip_modules: Callable[[str, nn.Module], bool] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._rule_mapper = rule_mapper or (lambda name, module: None)
        self._warn_on_missing_rule = warn_on_missing_rule
        self._skip_modules = skip_modules
        self._rules: dict[str, Rule] = {}

    @staticmethod
    def default_skip(name: str, module: nn.Module) -> bool:
        return name in ("", "td_module", "module") or isinstance(module, (nn.ModuleList, nn.Sequential, TensorDictModule))

    def enter(self, hooked) -> None:
        """Ask the rule mapper once per context (as tdhook does when it hooks the model)."""
        self._rules = self.rules(hooked.interface.model)

    def rules(self, model: nn.Module) -> dict[str, Rule]:
        """The rule of each module of `model` that gets one, by name (IgnoreRule left out)."""
        found = {}
        for name, module in model.named_modules():
            if self._skip_modules is not None and self._skip_modules(name, module):
                continue
            rule = self._rule_mapper(name, module)
            if rule is None:
                if self._warn_on_missing_rule:
                    warnings.warn(f"No rule found for module `{name}` ({type(module).__name__})", stacklevel=3)
                continue
            if not isinstance(rule, Rule):
                raise InvalidArgumentType(
                    f"the rule for module {name!r} is a {type(rule).__name__}, not a tdhook_fx rule\n"
                    "  hint: use the rules of tdhook_fx.attribution.lrp_helpers.rules (tdhook's are autograd "
                    "functions installed on the module; these are compiled into the graph)"
                )
            if isinstance(rule, IgnoreRule):
                continue
            if name == "":
                raise MethodUsageError(
                    f"a rule ({rule!r}) for the whole model cannot be compiled: a rule applies to a module of it\n"
                    "  hint: skip_modules=LRP.default_skip leaves the model itself out"
                )
            found[name] = rule
        return found

    def add_rewrites(self, hooked, table: SiteTable, builder: ProgramBuilder) -> None:
        for name, rule in self._rules.items():
            for call in range(table.calls(name)):
                for output in table.activations(name, call, "out")[:1]:
                    site = dsl_site(table, output) if output.item is None else ast.Site(dsl_site(table, output).path, call or None)
                    builder.add(ast.Rule(site, rule.name, rule.arguments()))

    def _grad_attr(self, grads: dict, values: dict) -> dict:
        return grads
