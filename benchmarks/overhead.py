"""Per-forward eager overhead: one intervened call / one plain forward, per peer and intervention.

Each peer's result is checked against `tdhook_fx.reference` first; a peer whose result differs
is reported as "wrong", never timed. Patch calls run the source too (hook peers: two full
forwards; tdhook_fx: one graph with the source run only up to the patched layer), so a patch
ratio counts both runs against one plain forward.
"""

from __future__ import annotations

from benchmarks import peers
from benchmarks.common import Config, Section, log, paired_ratios
from benchmarks.workloads import OPERATIONS, selected


def run(config: Config) -> list[Section]:
    sections = []
    for name, build in selected(config.models).items():
        workload = build()
        section = Section(
            f"Eager overhead per forward: {workload.description}",
            ["intervention", *(peers.LABELS[p] for p in peers.PEERS)],
            notes=[
                (
                    "ratio = time of one intervened call / one plain forward of the same model, paired round by "
                    "round; lower is better"
                ),
                (
                    f"steer/set/patch act on {workload.layer} ({_position(workload)}); save-all keeps "
                    f"{len(workload.save_sites)} module outputs"
                ),
            ],
        )
        skipped = {p: peers.unavailable(p) for p in peers.PEERS}
        for peer, reason in skipped.items():
            if reason:
                section.notes.append(f"{peers.LABELS[peer]} skipped: {reason}")
        for operation in OPERATIONS:
            log(f"overhead: {name} {operation}")
            section.add(intervention=operation, **_measure(workload, operation, skipped, config))
        sections.append(section)
    return sections


def _measure(workload, operation: str, skipped: dict, config: Config) -> dict:
    want = workload.reference(operation)
    candidates = {}
    prepared_all = {}
    cells = {}
    for peer in peers.PEERS:
        label = peers.LABELS[peer]
        if skipped[peer]:
            cells[label] = "skipped"
            continue
        try:
            prepared = peers.prepare(peer, workload, operation)
        except Exception as error:  # noqa: BLE001 - a peer that cannot express this: reported in its cell
            cells[label] = f"fails: {type(error).__name__}"
            log(f"  {peer}: {type(error).__name__}: {error}")
            continue
        prepared_all[peer] = prepared
        problem = _checked(workload, operation, prepared, want)
        if problem:
            cells[label] = "wrong"
            log(f"  {peer}: {problem}")
            continue
        candidates[peer] = prepared.call
    try:
        times = paired_ratios(workload.plain(), candidates, config)
    finally:
        for prepared in prepared_all.values():
            prepared.close()
    for peer in peers.PEERS:
        if peer in times:
            cells[peers.LABELS[peer]] = round(times[peer].ratio, 3)
    return cells


def _checked(workload, operation, prepared, want) -> str | None:
    try:
        return peers.check(workload, operation, prepared, want)
    except Exception as error:  # noqa: BLE001 - a peer that fails is reported, not timed
        return f"{type(error).__name__}: {error}"


def _position(workload) -> str:
    index = workload.layers.index(workload.layer)
    return f"layer {index} of {len(workload.layers)}"
