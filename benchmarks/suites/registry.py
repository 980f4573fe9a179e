"""Evaluation suites by name: geneval, preference, aesthetic, fid ('all' = every one)."""

from __future__ import annotations

from benchmarks.geneval.suite import GenEvalSuite
from benchmarks.suites.aesthetic import AestheticSuite
from benchmarks.suites.fid import FIDSuite
from benchmarks.suites.preference import PreferenceSuite
from rtdmd.errors import UserError

SUITE_NAMES = ("geneval", "preference", "aesthetic", "fid")


def expand_suites(names) -> list[str]:
    """'all' -> every suite; validates names; keeps order, drops repeats."""
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    out: list[str] = []
    for n in names:
        if n == "all":
            wanted = list(SUITE_NAMES)
        elif n in SUITE_NAMES:
            wanted = [n]
        else:
            raise UserError(f"unknown suite '{n}'; choose one of {', '.join(SUITE_NAMES)} or all.")
        out.extend(w for w in wanted if w not in out)
    if not out:
        raise UserError(f"no suite given; choose one of {', '.join(SUITE_NAMES)} or all.")
    return out


def make_suite(name: str, fid_reference: str | None = None, inception_path: str | None = None):
    """A fresh suite object (detector / scorers are built by its load())."""
    expand_suites([name])
    if name == "geneval":
        return GenEvalSuite()
    if name == "preference":
        return PreferenceSuite()
    if name == "aesthetic":
        return AestheticSuite()
    return FIDSuite(fid_reference, inception_path)
