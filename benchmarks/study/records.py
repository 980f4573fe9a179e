"""What a finished study job was made from, so that editing the study file after a job ran is caught.

A job's record (``train.json``, ``eval.json``, a sweep value's ``score.json``) carries ``inputs``: the parts of the
study file that determine what the job computed. Training: backend, method, preset, overrides, the value its sweep
chose (not the sweep's settings: a changed sweep that chooses the same value trains the same arm) and the inputs of
the ``init_from`` arm it starts from. Evaluation: the arm's sampling settings, the evaluation (less the report-time
``bootstrap``) and, for a training arm, its training inputs. A sweep value: its arm's training inputs with the
sweep's settings in place of the choice, and the evaluation less ``curves``. A record is checked once the jobs it
depends on are done (benchmarks.study.execute.done_record), so the choice it is compared with is known. When the study file now gives other inputs for a job that is done, ``check`` stops with the
setting that changed and the folder to delete, instead of mixing old results under new settings. A record written
without ``inputs`` is taken as it is.
"""

from __future__ import annotations

import dataclasses
import json
from rtdmd.errors import UserError

from benchmarks.study import sweep
from benchmarks.study.spec import ArmSpec, Study


def train_inputs(study: Study, arm: ArmSpec) -> dict:
    chosen = {"key": arm.sweep.key, "value": sweep.current_choice(study, arm)} if arm.sweep.key else None
    out = {"backend": study.backend, "method": arm.method, "preset": arm.preset, "overrides": arm.overrides,
           "sweep": chosen}
    if arm.init_from:
        out["init_from"] = {"arm": arm.init_from, **train_inputs(study, study.arms[arm.init_from])}
    return out


def _eval_settings(study: Study) -> dict:
    return {k: v for k, v in dataclasses.asdict(study.eval).items() if k != "bootstrap"}


def eval_inputs(study: Study, arm: ArmSpec) -> dict:
    out = {"checkpoint": arm.checkpoint, "steps": arm.steps, "guidance": arm.guidance, "eta": arm.eta,
           "sampler": arm.sampler, "eval": _eval_settings(study)}
    if arm.trains:
        out["train"] = train_inputs(study, arm)
    return out


def sweep_inputs(study: Study, arm: ArmSpec) -> dict:
    """A sweep run is scored once, on held-out prompts drawn by the evaluation's settings (curves do not apply)."""
    return {"train": {**train_inputs(study, arm), "sweep": dataclasses.asdict(arm.sweep)}, "eval": {k: v for k, v in _eval_settings(study).items() if k != "curves"}}


def inputs(study: Study, kind: str, arm: ArmSpec) -> dict:
    """The inputs of a job of ``kind`` (sweep, train or eval) of ``arm``, as JSON types (what a record stores)."""
    made = {"sweep": sweep_inputs, "train": train_inputs, "eval": eval_inputs}[kind](study, arm)
    return json.loads(json.dumps(made, sort_keys=True))


def first_difference(old, new, prefix: str = "") -> str | None:
    """The dotted key of the first place where ``old`` and ``new`` differ (None when equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = first_difference(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
            if d is not None:
                return d
        return None
    return None if old == new else (prefix or "(the whole record)")


def check(study: Study, kind: str, arm: ArmSpec, record: dict, label: str, remove: str) -> None:
    """Stop when ``record`` (of the done job ``label``) was made from other inputs than the study file gives now;
    ``remove`` names what to delete to redo the job."""
    if "inputs" not in record:
        return
    changed = first_difference(record["inputs"], inputs(study, kind, arm))
    if changed is not None:
        raise UserError(f"study job '{label}' is done but was run with another '{changed}' than {study.path} gives now; "
                        f"restore the study file, or delete {remove} to run it again with the new settings.")
