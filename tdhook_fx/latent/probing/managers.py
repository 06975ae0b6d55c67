"""Probes and the managers that own their estimators and results (no hooks involved).

`ProbeManager(estimator_class, estimator_kwargs, compute_metrics).probe_factory` makes one
probe per (module, direction): on a `step_type="fit"` batch it fits the estimator, on
"predict" it predicts; `compute_metrics(predictions, labels)` (a dict) is recorded in
`results[(phase, f"{module}_{direction}", metric)]` (tdhook 0.3.0) and in the
`fit_metrics` / `predict_metrics` dicts (tdhook 0.1.3). `BilinearProbeManager(pairs, ...)`
fits `estimator.fit(h1, h2, y=labels)` once both modules of a pair were seen.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tensordict import TensorDict

from tdhook_fx.errors import InvalidArgumentType, ProbingError


def _check_step_type(step_type) -> None:
    if step_type not in ("fit", "predict"):
        raise ProbingError(
            f"step_type must be 'fit' or 'predict', got {step_type!r}\n"
            "  hint: put td['step_type'] = 'fit' (or 'predict') and td['labels'] in the TensorDict, "
            "and pass additional_keys=['labels', 'step_type'] to Probing"
        )


class Probe:
    """Fits or evaluates one estimator on one module's activations."""

    def __init__(
        self,
        estimator: Any,
        predict_callback: Callable[[Any, Any], Any],
        fit_callback: Callable[[Any, Any], Any] | None = None,
        data_preprocess_callback: Callable[[Any], Any] | None = None,
    ):
        self._estimator = estimator
        self._predict_callback = predict_callback
        self._fit_callback = fit_callback
        self._data_preprocess_callback = data_preprocess_callback or self._default_data_preprocess_callback

    @property
    def estimator(self) -> Any:
        return self._estimator

    def step(self, data: Any, **kwargs) -> Any:
        labels = kwargs.get("labels")
        step_type = kwargs.get("step_type")
        _check_step_type(step_type)
        data = self._data_preprocess_callback(data)
        if step_type == "fit":
            self._estimator.fit(data, y=labels)
            if self._fit_callback is not None:
                return self._fit_callback(self._estimator.predict(data), labels)
            return None
        return self._predict_callback(self._estimator.predict(data), labels)

    @staticmethod
    def _default_data_preprocess_callback(data: Any) -> Any:
        return data.detach().flatten(1)


class BilinearProbe(Probe):
    """A probe on two modules' activations; waits for both (the first is cached)."""

    def __init__(
        self,
        h1_key: str,
        h2_key: str,
        estimator,
        predict_callback,
        fit_callback=None,
        data_preprocess_callback=None,
    ):
        super().__init__(estimator, predict_callback, fit_callback, data_preprocess_callback)
        self._h1_key = h1_key
        self._h2_key = h2_key
        self._cached: dict[str, Any] = {}

    def step(self, data: Any, key: str, labels: Any = None, step_type: str | None = None, **kwargs) -> Any:
        data = self._data_preprocess_callback(data)
        if self._h1_key == self._h2_key:
            return self._run(data, data, labels, step_type)
        if key == self._h1_key:
            self._cached["h1"] = data
        elif key == self._h2_key:
            self._cached["h2"] = data
        else:
            return None
        if "h1" in self._cached and "h2" in self._cached:
            h1, h2 = self._cached.pop("h1"), self._cached.pop("h2")
            return self._run(h1, h2, labels, step_type)
        return None

    def _run(self, h1, h2, labels, step_type):
        _check_step_type(step_type)
        if step_type == "fit":
            self._estimator.fit(h1, h2, y=labels)
            if self._fit_callback is not None:
                return self._fit_callback(self._estimator.predict(h1, h2), labels)
            return None
        return self._predict_callback(self._estimator.predict(h1, h2), labels)

    def before_all(self) -> None:
        self._cached.clear()

    def after_all(self) -> list[tuple[str, str]]:
        waiting = [(self._h1_key, self._h2_key)] if self.is_waiting else []
        self._cached.clear()
        return waiting

    @property
    def is_waiting(self) -> bool:
        return self._h1_key != self._h2_key and len(self._cached) == 1


class ProbeManager:
    """Owns one estimator per (module, direction) and the metrics of every fit and predict step."""

    def __init__(
        self,
        estimator_class: Any,
        estimator_kwargs: dict,
        compute_metrics: Callable[[Any, Any], dict[str, Any]],
        overwrite_results: bool = False,
        data_preprocess_callback: Callable[[Any], Any] | None = None,
        *,
        allow_overwrite: bool | None = None,
    ):
        self._estimator_class = estimator_class
        self._estimator_kwargs = dict(estimator_kwargs)
        self._compute_metrics = compute_metrics
        self._overwrite_results = overwrite_results if allow_overwrite is None else allow_overwrite
        self._data_preprocess_callback = data_preprocess_callback
        self._estimators: dict[str, Any] = {}
        self._probes: dict[str, Probe] = {}
        self._results = TensorDict(batch_size=[])
        self._metrics: dict[str, dict[str, dict]] = {"fit": {}, "predict": {}}

    @property
    def estimators(self) -> dict[str, Any]:
        return self._estimators

    @property
    def results(self) -> TensorDict:
        """Metrics as tdhook 0.3.0 keeps them: `results[(phase, key, metric)]`."""
        return self._results

    @property
    def fit_metrics(self) -> dict[str, dict]:
        """Metrics of the fit steps, `{f"{module}_{direction}": metrics}` (tdhook 0.1.3)."""
        return self._metrics["fit"]

    @property
    def predict_metrics(self) -> dict[str, dict]:
        return self._metrics["predict"]

    def probe_factory(self, key: str, direction: str) -> Probe:
        probe_key = f"{key}_{direction}"
        if probe_key in self._probes:
            return self._probes[probe_key]
        estimator = self._estimator_class(**self._estimator_kwargs)
        self._estimators[probe_key] = estimator
        probe = Probe(
            estimator,
            predict_callback=lambda predictions, labels: self._record(
                "predict", probe_key, predictions, labels
            ),
            fit_callback=lambda predictions, labels: self._record("fit", probe_key, predictions, labels),
            data_preprocess_callback=self._data_preprocess_callback,
        )
        self._probes[probe_key] = probe
        return probe

    def _record(self, phase: str, key: str, predictions: Any, labels: Any) -> TensorDict:
        if key in self._metrics[phase] and not self._overwrite_results:
            raise ProbingError(
                f"Result for {key} already exists in phase {phase!r}; "
                "call reset_results() or use overwrite_results=True"
            )
        metrics = self._compute_metrics(predictions, labels)
        if not isinstance(metrics, dict):
            raise InvalidArgumentType("compute_metrics must return a dict")
        result = TensorDict.from_dict(metrics, batch_size=[])
        self._results.set((phase, key), result)
        self._metrics[phase][key] = metrics
        return result

    def reset_estimators(self) -> None:
        self._estimators = {}
        self._probes = {}

    def reset_results(self) -> None:
        self._results = TensorDict(batch_size=[])
        self._metrics = {"fit": {}, "predict": {}}

    reset_metrics = reset_results


class BilinearProbeManager(ProbeManager):
    """One bilinear probe per (h1, h2) pair of module names."""

    def __init__(
        self,
        pairs: list[tuple[str, str]],
        estimator_class: Any,
        estimator_kwargs: dict,
        compute_metrics: Callable[[Any, Any], dict[str, Any]],
        overwrite_results: bool = False,
        data_preprocess_callback: Callable[[Any], Any] | None = None,
        *,
        allow_overwrite: bool | None = None,
    ):
        super().__init__(
            estimator_class,
            estimator_kwargs,
            compute_metrics,
            overwrite_results,
            data_preprocess_callback,
            allow_overwrite=allow_overwrite,
        )
        self._pairs = list(pairs)
        self._pair_probes: dict[tuple[str, str, str], BilinearProbe] = {}

    @property
    def key_pattern(self) -> str:
        """A pattern for Probing that matches exactly the modules of the pairs."""
        keys = sorted({k for pair in self._pairs for k in pair})
        return "|".join(re.escape(k) + "$" for k in keys)

    def probe_factory(self, key: str, direction: str):
        probes = []
        for h1, h2 in self._pairs:
            if key not in (h1, h2):
                continue
            pair_key = (h1, h2, direction)
            if pair_key not in self._pair_probes:
                self._pair_probes[pair_key] = self._pair_probe(h1, h2, direction)
            probes.append(self._pair_probes[pair_key])
        return _Dispatcher(key, probes)

    def _pair_probe(self, h1: str, h2: str, direction: str) -> BilinearProbe:
        pair_key = f"{h1}_{h2}_{direction}"
        estimator = self._estimator_class(**self._estimator_kwargs)
        self._estimators[pair_key] = estimator
        return BilinearProbe(
            h1,
            h2,
            estimator,
            predict_callback=lambda predictions, labels: self._record(
                "predict", pair_key, predictions, labels
            ),
            fit_callback=lambda predictions, labels: self._record("fit", pair_key, predictions, labels),
            data_preprocess_callback=self._data_preprocess_callback,
        )

    def before_all(self) -> None:
        """Forget half-seen pairs before a new set of forward passes."""
        for probe in self._pair_probes.values():
            probe.before_all()

    def after_all(self) -> None:
        """Raise if a pair saw only one of its modules."""
        waiting = [pair for probe in self._pair_probes.values() for pair in probe.after_all()]
        if waiting:
            keys = sorted({k for pair in waiting for k in pair})
            raise ProbingError(f"Bilinear probes still waiting on keys: {keys}. Unresolved pairs: {waiting}")

    def reset_estimators(self) -> None:
        super().reset_estimators()
        self._pair_probes.clear()


class _Dispatcher:
    """What `BilinearProbeManager.probe_factory` returns: steps every pair that has the module."""

    def __init__(self, key: str, probes: list[BilinearProbe]):
        self._key = key
        self._probes = probes

    def step(self, data: Any, **kwargs) -> None:
        for probe in self._probes:
            probe.step(data, key=self._key, **kwargs)
