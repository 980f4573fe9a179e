"""GenEval's official scoring rules on any Detector (docs/evaluation.md, "Scoring rules").

Facts follow the official evaluator (djghosh13/geneval evaluation/evaluate_images.py and
summary_scores.py). Three deterministic choices where the official code is not: ties in
score keep the detector's order (stable sort); the classes in ``details`` appear in
order of their first detection; a failed position lists the relations that hold in the
fixed order left of, right of, above, below (the official code joins a Python set).
The official optional NMS (``max_overlap``) is off by default there and not offered here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from benchmarks.geneval.detection import Detection, Detector
from benchmarks.geneval.prompts import GENEVAL_COLORS, GENEVAL_TAGS, validate_entry
from rtdmd.world.geneval import relative_position
from rtdmd.errors import UserError


@dataclass
class RuleConfig:
    threshold: float = 0.3  # keep detections with score strictly above this ...
    counting_threshold: float = 0.9  # ... or above this for the counting tag
    max_objects: int = 16  # per class, most confident first
    position_threshold: float = 0.1  # fraction of the summed box sizes ignored per axis
    colors: tuple[str, ...] = GENEVAL_COLORS  # order used in colour 'reason' strings


def keep_detections(detections: Sequence[Detection], tag: str, cfg: RuleConfig) -> dict[str, list[Detection]]:
    """Per class: score > threshold (counting: > counting_threshold), by decreasing score, at most max_objects."""
    thr = cfg.counting_threshold if tag == "counting" else cfg.threshold
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        if d.score > thr:
            by_class.setdefault(d.label, []).append(d)
    return {c: sorted(ds, key=lambda d: -d.score)[: cfg.max_objects] for c, ds in by_class.items()}


@dataclass
class Assessment:
    correct: bool
    reasons: list[str]
    checks: list[tuple[str, bool]]  # (description, met) for partial credit
    kept: dict[str, list[Detection]] = field(default_factory=dict)

    @property
    def credit(self) -> float:
        return sum(ok for _, ok in self.checks) / len(self.checks) if self.checks else 0.0


def _failing_pair(objects: Sequence[Detection], targets: Sequence[Detection], rel: str, threshold: float):
    """The relations that hold for the first (object, target) pair where ``rel`` does not; None when it holds for all."""
    for obj in objects:
        for tgt in targets:
            holds = relative_position(obj.box, tgt.box, threshold)
            if rel not in holds:
                return holds
    return None


def assess(image: np.ndarray, metadata: dict, detector: Detector, cfg: RuleConfig | None = None) -> Assessment:
    """Run the detector once and apply the official pass/fail rules and the partial-credit checks."""
    cfg = cfg or RuleConfig()
    validate_entry(metadata, "GenEval metadata")
    kept = keep_detections(detector.detect(image), metadata["tag"], cfg)
    correct, reasons, checks = True, [], []
    found_per_clause: list[list[Detection]] = []
    count_ok: list[bool] = []
    matched_groups: list[list[Detection] | None] = []  # official: a clause's objects if it fully passed
    for req in metadata["include"]:
        cls, n = req["class"], req["count"]
        found = kept.get(cls, [])[:n]
        ok_count = len(found) >= n
        found_per_clause.append(found)
        count_ok.append(ok_count)
        checks.append((f"include {cls}>={n}", ok_count))
        matched = ok_count
        if not ok_count:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        if "color" in req:
            want = req["color"]
            ok_color = False
            if ok_count:
                colors = list(detector.classify_colors(image, found, cls))
                if len(colors) != len(found):
                    raise ValueError(f"{detector.name}.classify_colors returned {len(colors)} colours for {len(found)} objects")
                ok_color = colors.count(want) >= n
                if not ok_color:
                    matched = False
                    tally = ", ".join(f"{colors.count(c)} {c}" for c in cfg.colors if c in colors)
                    reasons.append(f"expected {want} {cls}>={n}, found {colors.count(want)} {want}; and {tally}")
            checks.append((f"color {want} {cls}", ok_color))
        if "position" in req:
            rel, target = req["position"]
            failing = None
            if ok_count and count_ok[target]:
                failing = _failing_pair(found, found_per_clause[target], rel, cfg.position_threshold)
            checks.append((f"position {cls} {rel} include[{target}]", ok_count and count_ok[target] and failing is None))
            if matched:  # official: position is only checked when count and colour passed
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                elif failing is not None:
                    matched = False
                    reasons.append(f"expected {cls} {rel} target, found {' and '.join(failing)} target")
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls, n = req["class"], req["count"]
        have = len(kept.get(cls, []))
        ok = have < n
        checks.append((f"exclude {cls}<{n}", ok))
        if not ok:
            correct = False
            reasons.append(f"expected {cls}<{n}, found {have}")
    return Assessment(correct, reasons, checks, kept)


def _result(metadata: dict, a: Assessment, detector: Detector) -> dict:
    details = {c: [[*map(float, d.box), float(d.score)] for d in ds] for c, ds in a.kept.items()}
    return {
        "filename": None,
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": a.correct,
        "reason": "\n".join(a.reasons),
        "metadata": json.dumps(metadata),
        "details": json.dumps(details),
        "detector": detector.name,
    }


def evaluate_image(image: np.ndarray, metadata: dict, detector: Detector, cfg: RuleConfig | None = None) -> dict:
    """One official result record; the caller fills ``filename``.

    ``details`` maps each class to its kept boxes as [x0, y0, x1, y1, score] (as the
    official file); ``detector`` (the detector's name) is added beyond the official fields.
    """
    return _result(metadata, assess(image, metadata, detector, cfg), detector)


def partial_credit(image: np.ndarray, metadata: dict, detector: Detector, cfg: RuleConfig | None = None) -> float:
    """Fraction of checks met, in [0, 1]; 1.0 exactly when the official rules say correct.

    Checks counted: one per include clause (at least ``count`` kept detections of its
    class); one per clause with a colour (at least ``count`` of its top-``count`` kept
    objects classified as that colour; failed when the count check fails); one per clause
    with a position (this clause and its target both have enough objects and every pair
    satisfies the relation; unlike the pass/fail rule it does not depend on the colour
    checks); one per exclude clause (fewer than ``count`` kept detections).
    """
    return assess(image, metadata, detector, cfg).credit


def summarize(results: Sequence[dict]) -> dict:
    """Official summary: fractions (the official script prints them x100 as %).

    ``tasks`` holds accuracy over images per tag (first-appearance order); ``overall`` is
    the unweighted mean over the tags present; absent official tags are listed in
    ``tasks_missing`` and excluded from the mean.
    """
    if not results:
        raise UserError("No GenEval results to summarize; score some images first.")
    correct = [bool(r["correct"]) for r in results]
    by_prompt: dict[str, bool] = {}
    by_tag: dict[str, list[bool]] = {}
    for r, ok in zip(results, correct):
        by_prompt[r["metadata"]] = by_prompt.get(r["metadata"], False) or ok
        by_tag.setdefault(r["tag"], []).append(ok)
    tasks = {t: sum(v) / len(v) for t, v in by_tag.items()}
    missing = [t for t in GENEVAL_TAGS if t not in tasks]
    out = {
        "images": len(results),
        "prompts": len(by_prompt),
        "correct_images": sum(correct) / len(correct),
        "correct_prompts": sum(by_prompt.values()) / len(by_prompt),
        "tasks": tasks,
        "task_counts": {t: (sum(v), len(v)) for t, v in by_tag.items()},
        "overall": sum(tasks.values()) / len(tasks),
        "tasks_missing": missing,
    }
    out["note"] = (
        f"overall averages {len(tasks)} tasks; missing (excluded): {', '.join(missing)}" if missing
        else "overall averages all 6 tasks"
    )
    return out
