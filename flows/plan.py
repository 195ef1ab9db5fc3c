"""``harmonize plan``: what a run would compute, and why, and about how long it takes, without computing anything.

For every valid row (and each of its tau variants) and every stage, in pipeline order:

- **cached**: the stage's cache key (``tasks.caching``) has a record under ``<out>/.cache`` whose object still
  exists; its output digest is known, so the next stage's key can be computed too;
- **new**: nothing was ever computed for this id and stage;
- **stale**: it was computed before (the item's ``<stage>.json`` records what its key was made of) but something
  changed; the reason says what: an input file, a setting (``pass2.tau 5 -> 2``), the code, the weights, an
  upstream stage that recomputes, or an output that went missing.

The total says how many items and stages would compute and about how long that takes: from the stage timings
already recorded under ``--out`` at the same working size when there are some, else the core's own CPU estimate
(``harmonize_core.estimate``). Inputs are validated with the input index, so unchanged inputs are not downloaded
again. Nothing here talks to Prefect: it reads the output storage only.
"""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from harmonize_core.config import HarmonizeConfig, canonical_section
from harmonize_core.estimate import describe_seconds, stage_seconds, working_pixels
from harmonize_core.passes.stages import STAGES
from manifests import ValidationReport
from tasks import storage
from tasks.caching import FILE_INPUTS, UPSTREAM, config_from_dict, key_from_payload, key_payload
from tasks.stages import variant_of

from .item import SHARED_STAGES, variant_items

CACHED, NEW, STALE = "cached", "new", "stale"
PASSES = ("pass1", "pass2")
READERS = 16  # items planned at once (storage round trips)
SHOWN_SETTINGS = 3  # changed settings named in one reason
# The stage behind each upstream parameter of the stage tasks (tasks.caching.UPSTREAM names parameters).
PARAMETER_STAGE = {"loose": "dilate", "blended": "blend", "pass1": "pass1", "pass2": "pass2"}


@dataclass
class StagePlan:
    """One stage of one item: ``cached``/``new``/``stale``, why, and the estimated seconds if it computes."""

    stage: str
    status: str
    reason: str = ""
    seconds: float | None = None


@dataclass
class ItemPlan:
    """One row (or one tau variant of it) and its stages."""

    id: str
    variant: str
    row: int
    stages: list[StagePlan] = field(default_factory=list)

    def to_compute(self) -> list[str]:
        """Return the stages that would compute."""
        return [s.stage for s in self.stages if s.status != CACHED]


@dataclass
class Plan:
    """The whole plan: per item, the invalid rows and warnings, the estimate and what it is based on."""

    manifest: str
    out: str
    items: list[ItemPlan]
    invalid: int = 0
    warnings: int = 0
    basis: str = ""

    def computing(self) -> list[StagePlan]:
        """Return each stage that would compute once (tau variants share their item's dilate, pass1, blend)."""
        unique = {id(stage): stage for item in self.items for stage in item.stages if stage.status != CACHED}
        return list(unique.values())

    def seconds(self) -> float | None:
        """Return the estimated compute seconds of every stage to compute (None when some cannot be estimated)."""
        parts = [stage.seconds for stage in self.computing()]
        return None if any(p is None for p in parts) else float(sum(parts))

    def total_line(self) -> str:
        """Return the one-line total ``run`` prints before it starts."""
        busy = [item for item in self.items if item.to_compute()]
        ids = {item.id for item in busy}
        counts = {stage: sum(s.stage == stage for s in self.computing()) for stage in STAGES}
        stages = ", ".join(f"{stage} x{count}" for stage, count in counts.items() if count)
        outputs = f"{len(busy)} output(s) of {len(self.items)} to compute ({len(ids)} item(s)"
        outputs += f": {stages})" if stages else ")"
        seconds = self.seconds()
        estimate = f", about {describe_seconds(seconds)} ({self.basis})" if busy and seconds is not None else ""
        estimate = estimate or (f", time unknown ({self.basis})" if busy else "; everything is cached")
        invalid = f"; {self.invalid} invalid row(s)" if self.invalid else ""
        return f"plan: {outputs}{estimate}{invalid}"

    def table(self, everything: bool = False) -> str:
        """Return the per-row table (only rows with something to compute unless ``everything``) and the total."""
        shown = [item for item in self.items if everything or item.to_compute()]
        lines = []
        for item in shown:
            name = f"{item.id}/{item.variant}" if item.variant else item.id
            cells = [s.status + (f" ({s.reason})" if s.reason else "") for s in item.stages]
            lines.append(f"row {item.row} {name}: " + "; ".join(f"{s.stage} {c}" for s, c in zip(item.stages, cells,
                                                                                              strict=True)))
        hidden = len(self.items) - len(shown)
        if hidden:
            lines.append(f"({hidden} output(s) fully cached, not listed; --all lists them)")
        return "\n".join([*lines, self.total_line()])

    def to_json(self) -> str:
        """Return the plan as JSON (for machines)."""
        return json.dumps({**asdict(self), "seconds": self.seconds(), "total": self.total_line()}, indent=2)


def _flatten(section: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(section, dict):
        return {prefix: section}
    flat: dict[str, Any] = {}
    for key, value in section.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def why_stale(before: dict[str, Any], now: dict[str, Any]) -> str:
    """Return why a stage's key changed, from its previous and current key payloads (``tasks.caching``)."""
    now = json.loads(json.dumps(now, default=str))  # the recorded payload went through JSON: tuples are lists
    reasons = []
    if before.get("schema") != now["schema"]:
        reasons.append("cache format changed")
    if before.get("code") != now["code"]:
        reasons.append("code changed")
    for name, digest in now["inputs"].items():
        if (before.get("inputs") or {}).get(name) != digest:
            reasons.append(f"input {name} changed" if name in FILE_INPUTS else f"upstream {name} changed")
    # an older record may write a setting another way (tau left empty for 5): compare meanings
    old, new = _flatten(canonical_section(before.get("config") or {})), _flatten(now["config"])
    settings = [f"{key} {old.get(key)} -> {new.get(key)}" for key in sorted(set(old) | set(new))
                if old.get(key) != new.get(key)]
    if settings:
        more = f" and {len(settings) - SHOWN_SETTINGS} more" if len(settings) > SHOWN_SETTINGS else ""
        reasons.append("setting " + ", ".join(settings[:SHOWN_SETTINGS]) + more)
    if before.get("weights") != now["weights"]:
        reasons.append("weights changed")
    return "; ".join(reasons) or "key changed"


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
    except (ValueError, OSError):
        return None


def cached_output(out: str, key: str) -> str | None:
    """Return the output digest of the cache record ``key`` when it and its object exist, else None."""
    record = _read_json(storage.join(storage.cache_uri(out), key))
    if record is None:
        return None
    result = json.loads(record["result"]) if isinstance(record.get("result"), str) else record.get("result") or {}
    uri, digest = result.get("uri"), result.get("sha256")
    return digest if uri and digest and storage.exists(uri) else None


class Planner:
    """Plans items against one output location with one backbone; collects the recorded timings it reads."""

    def __init__(self, out: str, weights_digest: str, device_type: str = "cpu") -> None:
        self.out, self.weights, self.device_type = out, weights_digest, device_type
        self.timings: dict[tuple[str, int], list[dict[str, float]]] = {}

    def plan_variant(self, item: dict[str, Any], known: dict[str, str], stages: tuple[str, ...]) -> list[StagePlan]:
        """Return the plans of ``stages`` for one item or variant; ``known`` maps a cached stage to its digest."""
        config = config_from_dict(item["config"])
        plans, recomputing = [], None
        for stage in stages:
            previous = _read_json(storage.uri_for(self.out, item["id"], stage, "json", variant_of(item, stage)))
            if previous is not None:
                self._remember(stage, config, previous)
            upstream = {name: PARAMETER_STAGE[name] for name in UPSTREAM[stage]}
            if recomputing is None and all(s in known for s in upstream.values()):
                digests = {name: item["files"][name]["sha256"] for name in FILE_INPUTS}
                digests.update({name: known[source] for name, source in upstream.items()})
                payload = key_payload(stage, digests, config, self.weights)
                found = cached_output(self.out, key_from_payload(payload))
                if found:
                    known[stage] = found
                    plans.append(StagePlan(stage, CACHED))
                    continue
                recomputing = stage
                before = (previous or {}).get("cache")
                reason = "" if previous is None else (why_stale(before, payload) if before else "recorded by an older "
                                                      "version")
                if before and before == payload:
                    reason = "output missing"
            else:
                waiting = recomputing or next(s for s in upstream.values() if s not in known)
                reason = "" if previous is None else f"upstream {waiting} recomputes"
            plans.append(StagePlan(stage, NEW if previous is None else STALE, reason))
        return plans

    def _remember(self, stage: str, config: HarmonizeConfig, metrics: dict[str, Any]) -> None:
        size = (metrics.get("config") or {}).get("sizing", {}).get("size", config.sizing.size)
        entry = {key: float(metrics[key]) for key in ("seconds", "seconds_per_evaluation", "seconds_optimise")
                 if isinstance(metrics.get(key), (int, float))}
        if entry:
            self.timings.setdefault((stage, int(size)), []).append(entry)

    def plan_item(self, item: dict[str, Any]) -> list[ItemPlan]:
        """Return one ``ItemPlan`` per variant of ``item`` (the shared stages repeated on each)."""
        known: dict[str, str] = {}
        shared = self.plan_variant(item, known, SHARED_STAGES)
        tail = tuple(s for s in STAGES if s not in SHARED_STAGES)
        plans = []
        for variant in variant_items(item):
            own = self.plan_variant(variant, dict(known), tail)
            plans.append(ItemPlan(item["id"], variant.get("variant", ""), item["row"], [*shared, *own]))
        return plans

    def estimate(self, stage: str, config: HarmonizeConfig, pixels: int | None) -> tuple[float | None, bool]:
        """Return (estimated seconds of ``stage``, whether it came from recorded timings)."""
        recorded = self.timings.get((stage, config.sizing.size), [])
        if recorded and stage in PASSES and all("seconds_per_evaluation" in r for r in recorded):
            per = statistics.median(r["seconds_per_evaluation"] for r in recorded)
            setup = statistics.median(r["seconds"] - r.get("seconds_optimise", r["seconds"]) for r in recorded)
            return per * (getattr(config, stage).iterations + 1) + max(0.0, setup), True
        if recorded and stage not in PASSES:
            return statistics.median(r["seconds"] for r in recorded), True
        return stage_seconds(config, stage, pixels=pixels, device_type=self.device_type), False


def plan_run(report: ValidationReport, out: str, weights_digest: str, device_type: str = "cpu") -> Plan:
    """Return the ``Plan`` of running ``report``'s valid items into ``out`` (reads storage only)."""
    planner = Planner(out, weights_digest, device_type)
    records = [item.to_record() for item in report.items]
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        items = [plan for plans in pool.map(planner.plan_item, records) for plan in plans]
    by_key = {(r["id"], v.get("variant", "")): (config_from_dict(v["config"]), r) for r in records
              for v in variant_items(r)}
    recorded = estimated = 0
    for item in items:
        config, record = by_key[(item.id, item.variant)]
        pixels = working_pixels(config.sizing.size, record.get("shape"))
        for stage in item.stages:
            if stage.status != CACHED:
                stage.seconds, from_records = planner.estimate(stage.stage, config, pixels)
                recorded += from_records
                estimated += not from_records
    basis = ("recorded stage timings under the output" if recorded and not estimated else
             "the core's CPU estimate" if estimated and not recorded else "recorded timings and the core's estimate")
    if device_type != "cpu" and estimated:
        basis = "no timings recorded yet and no GPU estimate"
    return Plan(report.manifest, out, items, invalid=len(report.invalid_rows()), warnings=len(report.warnings),
                basis=basis)
