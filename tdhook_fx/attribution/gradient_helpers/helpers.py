"""Integration points and weights on [0, 1], with tdhook's (and captum's) names.

`approximation_parameters(method)` returns `(step_sizes, alphas)`, two functions of the number
of steps `n`: the integral of g over [0, 1] is approximated by `sum(s * g(a))` over the pairs.
The points are those of `tdhook_fx.attribution.quadrature`, which IntegratedGradients uses.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from tdhook_fx.attribution.quadrature import METHODS, RIEMANN_METHODS, quadrature
from tdhook_fx.errors import InvalidArgument

Builders = tuple[Callable[[int], list[float]], Callable[[int], list[float]]]


class Riemann(Enum):
    """The Riemann sums: left, right, middle and trapezoid."""

    left = 1
    right = 2
    middle = 3
    trapezoid = 4


SUPPORTED_RIEMANN_METHODS = list(RIEMANN_METHODS)
SUPPORTED_METHODS: list[str] = list(METHODS)


def approximation_parameters(method: str) -> Builders:
    """`(step_sizes, alphas)` of `method` ("riemann_left", ..., "gausslegendre")."""
    if method in SUPPORTED_RIEMANN_METHODS:
        return riemann_builders(Riemann[method.split("_")[-1]])
    if method == "gausslegendre":
        return gauss_legendre_builders()
    raise InvalidArgument(
        f"Invalid integral approximation method name: {method}\n  hint: use one of {', '.join(SUPPORTED_METHODS)}"
    )


def _builders(method: str) -> Builders:
    def step_sizes(n: int) -> list[float]:
        return quadrature(method, n)[1]

    def alphas(n: int) -> list[float]:
        return quadrature(method, n)[0]

    return step_sizes, alphas


def riemann_builders(method: Riemann = Riemann.trapezoid) -> Builders:
    """Equal steps of 1/n (halved at both ends for the trapezoid), points in [0, 1]."""
    if not isinstance(method, Riemann):
        raise InvalidArgument(f"Invalid Riemann approximation method: {method}")
    return _builders(f"riemann_{method.name}")


def gauss_legendre_builders() -> Builders:
    """Gauss-Legendre nodes and weights, moved from [-1, 1] to [0, 1]."""
    return _builders("gausslegendre")


__all__ = [
    "SUPPORTED_METHODS",
    "SUPPORTED_RIEMANN_METHODS",
    "Riemann",
    "approximation_parameters",
    "gauss_legendre_builders",
    "riemann_builders",
]
