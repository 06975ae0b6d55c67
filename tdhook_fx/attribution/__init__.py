"""tdhook's attribution methods, compiled: the same names, parameters and TensorDict keys.

```python
from tdhook_fx.attribution import IntegratedGradients
with IntegratedGradients(init_attr_targets=f, multiply_by_inputs=True).prepare(model) as hooked:
    td = hooked(td)          # td["attr", "input"]
```

Each method is a `HookingContextFactory` of the one method framework (`tdhook_fx.methods`): it
builds a small program (`save` / `save grad` / `set grad` / `stop`) as AST statements, runs it
through the method layer's program cache, and takes plain `torch.autograd.grad`s through the
compiled module: no hooks are installed on the model. The hooked module is a `HookedModule`.
`LRP` adds one `rule SITE = NAME(ARGS)` statement per module (its rule from `lrp_helpers.rules`).
"""

from tdhook_fx.attribution.activation_maximisation import ActivationMaximisation
from tdhook_fx.attribution.grad_cam import DimsConfig, GradCAM
from tdhook_fx.attribution.gradients import GradientAttribution
from tdhook_fx.attribution.guided_backpropagation import GuidedBackpropagation
from tdhook_fx.attribution.integrated_gradients import IntegratedGradients
from tdhook_fx.attribution.lrp import LRP
from tdhook_fx.attribution.saliency import Saliency

__all__ = [
    "LRP",
    "ActivationMaximisation",
    "DimsConfig",
    "GradCAM",
    "GradientAttribution",
    "GuidedBackpropagation",
    "IntegratedGradients",
    "Saliency",
]
