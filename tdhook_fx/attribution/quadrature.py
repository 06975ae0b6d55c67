"""Where IntegratedGradients evaluates the gradient along the path, and with what weights.

The same points and weights as captum and tdhook: Riemann sums (left, right, middle,
trapezoid) and Gauss-Legendre quadrature, on the interval [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType

RIEMANN_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
METHODS = RIEMANN_METHODS + ("gausslegendre",)


def quadrature(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """(alphas, step sizes) of `method` with `n_steps` points: the integral of g over [0, 1]
    is approximated by sum(step * g(alpha))."""
    if method not in METHODS:
        raise InvalidArgument(
            f"Invalid integral approximation method name: {method}\n"
            f"  hint: use one of {', '.join(METHODS)}"
        )
    minimum = 1 if method == "gausslegendre" else 2
    if isinstance(n_steps, bool) or not isinstance(n_steps, int):
        raise InvalidArgumentType(f"n_steps must be an integer for {method}; got {type(n_steps).__name__}")
    if n_steps < minimum:
        raise InvalidArgument(f"n_steps must be at least {minimum} for {method}; got {n_steps}")
    n = n_steps
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    steps = [1 / n] * n
    if method == "riemann_trapezoid":
        steps[0] /= 2
        steps[-1] /= 2
        return torch.linspace(0, 1, n).tolist(), steps
    if method == "riemann_left":
        return torch.linspace(0, 1 - 1 / n, n).tolist(), steps
    if method == "riemann_middle":
        return torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n).tolist(), steps
    return torch.linspace(1 / n, 1, n).tolist(), steps
