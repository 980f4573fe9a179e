"""The prompts an evaluation scores: prompt files (GenEval JSONL or plain text), a suite's default
prompts, the task-stratified selection of --max-prompts, image folders in the GenEval layout, and the
images to score in them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from benchmarks.geneval import layout
from benchmarks.eval_models import Model
from benchmarks.geneval.prompts import read_metadata, validate_entry
from benchmarks.suites.base import ImageItem
from rtdmd.errors import UserError


def read_prompt_file(path: str | Path) -> tuple[list[dict], bool]:
    """(entries, is_geneval): a GenEval JSONL file (first non-blank line is a JSON object), or
    plain text with one prompt per line (blank lines skipped) -> [{"prompt": ...}]."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist; pass a text file (one prompt per line) or a GenEval JSONL file.") from None
    except OSError as e:
        raise UserError(f"cannot read prompt file {path} ({e.strerror}); check the path and its permissions.") from None
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text; pass a text file (one prompt per line) or a GenEval JSONL file.") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"prompt file {path} holds no prompts; put one prompt per line.")
    if lines[0].startswith("{"):
        return read_metadata(path), True
    for n, ln in enumerate(text.splitlines(), start=1):
        if "\x00" in ln:
            raise UserError(f"{path} line {n}: contains a NUL character; pass a plain text file of prompts.")
    return [{"prompt": ln} for ln in lines], False


def prompt_set_id(entries: Sequence[dict]) -> str:
    return hashlib.sha256("\n".join(json.dumps(e, sort_keys=True) for e in entries).encode()).hexdigest()[:10]


def select_indices(n: int, max_prompts: int | None) -> list[int]:
    """All of ``n`` indices, or ``max_prompts`` evenly spaced ones (the first and the last included)."""
    if max_prompts is None or max_prompts >= n:
        return list(range(n))
    if max_prompts <= 0:
        raise UserError(f"--max-prompts must be positive, got {max_prompts}.")
    if max_prompts == 1:
        return [0]
    return sorted({round(j * (n - 1) / (max_prompts - 1)) for j in range(max_prompts)})


def task_quotas(sizes: Sequence[int], total: int) -> list[int]:
    """Prompts per task, as equal as the tasks' sizes allow: each task gets ``total // tasks`` (or all it has),
    what small tasks cannot take is shared out among the others the same way, and a remainder goes to the
    tasks in order. With fewer prompts than tasks, ``total`` evenly spaced tasks get one each."""
    quotas = [0] * len(sizes)
    if total < len(sizes):
        for t in select_indices(len(sizes), total):
            quotas[t] = 1
        return quotas
    left, open_ = total, [t for t in range(len(sizes)) if sizes[t] > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for j, t in enumerate(open_):
            take = min(sizes[t] - quotas[t], share + (1 if j < extra else 0))
            quotas[t] += take
            left -= take
        open_ = [t for t in open_ if quotas[t] < sizes[t]]
    return quotas


def stratified_indices(entries: Sequence[dict | None], max_prompts: int | None) -> list[int]:
    """The prompts --max-prompts selects: all present entries (None marks an absent one), or ``max_prompts`` of
    them stratified by GenEval task (``tag``; plain prompts form one task): quotas as equal per task as the
    tasks' sizes allow (task_quotas), evenly spaced within each task, in prompt order. Deterministic."""
    present = [i for i, e in enumerate(entries) if e is not None]
    if max_prompts is not None and max_prompts <= 0:
        raise UserError(f"--max-prompts must be positive, got {max_prompts}.")
    if max_prompts is None or max_prompts >= len(present):
        return present
    tasks: dict[str, list[int]] = {}
    for i in present:
        tasks.setdefault(str(entries[i].get("tag", "")), []).append(i)
    groups = list(tasks.values())
    quotas = task_quotas([len(g) for g in groups], max_prompts)
    return sorted(g[j] for g, q in zip(groups, quotas) if q for j in select_indices(len(g), q))


@dataclass
class PromptSet:
    name: str  # where the prompts came from (file path or "default:<suite>")
    entries: list[dict]
    indices: list[int]
    geneval: bool

    @property
    def id(self) -> str:
        return prompt_set_id(self.entries)


def prompt_sets(model: Model, suites: dict, opts) -> dict[str, PromptSet]:
    """suite name -> its prompts (suites with identical prompts share one PromptSet object); ``opts``: the
    runner's EvalOptions."""
    by_id: dict[str, PromptSet] = {}
    out: dict[str, PromptSet] = {}
    if opts.images_dir is not None:
        entries = _folder_metadata(Path(opts.images_dir))
        ps = PromptSet(str(opts.images_dir), entries, stratified_indices(entries, opts.max_prompts),
                       all("tag" in e and "include" in e for e in entries if e is not None))
        for name, suite in suites.items():
            out[name] = ps
    else:
        file_entries = None
        if opts.prompts_file is not None:
            file_entries, is_geneval = read_prompt_file(opts.prompts_file)
        for name, suite in suites.items():
            if file_entries is not None:
                ps = PromptSet(str(opts.prompts_file), file_entries, stratified_indices(file_entries, opts.max_prompts),
                               is_geneval)
            else:
                entries = suite.default_prompts(model.info)
                ps = PromptSet(f"default:{model.info.name}", entries, stratified_indices(entries, opts.max_prompts), True)
            ps = by_id.setdefault(ps.id + str(ps.indices), ps)
            out[name] = ps
    for name, suite in suites.items():
        if suite.needs_geneval_metadata and not out[name].geneval:
            raise UserError(f"the {name} suite needs GenEval prompt entries (JSONL with tag, include, prompt), but "
                            f"{out[name].name} holds plain prompts; pass a GenEval JSONL file or drop --prompts.")
    return out


def _folder_metadata(folder: Path) -> list:
    """Prompt entries of an image folder in the GenEval layout, by prompt index (None where absent)."""
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; pass the folder an earlier eval or sample wrote (GenEval layout).")
    found: dict[int, dict] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        mp = d / "metadata.jsonl"
        try:
            entry = json.loads(mp.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{mp} is missing; every prompt folder of --images needs its metadata.jsonl.") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{mp} is not one readable JSON object ({e}); rewrite it or regenerate the images.") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"]:
            raise UserError(f"{mp} has no 'prompt' string; rewrite it or regenerate the images.")
        if "tag" in entry:
            validate_entry(entry, str(mp))
        found[int(d.name)] = entry
    if not found:
        raise UserError(f"{folder} holds no <index:05d> prompt folders; pass a folder in the GenEval image layout.")
    return [found.get(i) for i in range(max(found) + 1)]


def collect_items(image_dir: Path, ps: PromptSet, images_per_prompt: int) -> list[ImageItem]:
    """The images to score: every selected prompt x images_per_prompt; a missing one is a UserError."""
    items = []
    for i in ps.indices:
        for k in range(images_per_prompt):
            p = layout.image_path(image_dir, i, k)
            if not p.is_file():
                raise UserError(f"image {p} is missing; rerun the eval without --images to generate it, "
                                "or lower --images-per-prompt.")
            if not layout.is_complete_png(p):
                raise UserError(f"image {p} is not a complete PNG (truncated or another format); delete it and rerun to regenerate it.")
            items.append(ImageItem(i, k, ps.entries[i], p))
    return items
