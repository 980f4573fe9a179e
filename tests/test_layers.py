"""The import graph keeps its layers: rtdmd <- baselines <- benchmarks <- rtdmd_bench (benchmarks.arch_check).

Every import counts, function-level ones included. Module and function sizes are reported by
`python -m benchmarks.arch_check`, not asserted here.
"""

from __future__ import annotations

import textwrap

import pytest

from benchmarks import arch_check as A


@pytest.fixture(scope="module")
def sites():
    return A.import_sites()


def test_no_import_cycle(sites):
    assert A.cycles(sites) == []


def test_imports_go_down_the_layers_and_only_the_command_line_imports_it(sites):
    assert A.layer_violations(sites) == []


def test_rtdmd_names_no_module_of_a_higher_layer():
    assert A.module_strings() == []


def test_the_graph_sees_every_layer():
    modules = A.project_modules()
    assert {"rtdmd.flow", "baselines.dmd2", "benchmarks.runner", "rtdmd_bench.cli"} <= set(modules)
    sites = A.import_sites()
    assert any(s.module == "rtdmd_bench.cli" and s.target == "benchmarks.cli" for s in sites)


def _tree(root, files: dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for pkg in A.LAYERS:
        (root / pkg).mkdir(exist_ok=True)
        (root / pkg / "__init__.py").touch()
    return root


def test_the_checks_find_what_they_look_for(tmp_path):
    """A made-up tree with one of each problem: a lazy import up a layer, a cycle, a cli import, a module string."""
    root = _tree(tmp_path, {
        "rtdmd/a.py": "import rtdmd.b\n\ndef f():\n    from benchmarks import runner\n",
        "rtdmd/b.py": "from . import a\nTABLE = {'x': 'baselines.m:make'}\n",
        "baselines/m.py": "from rtdmd.cli import main\n",
        "rtdmd/cli.py": "",
        "benchmarks/runner.py": "x = 1\n" * (A.MAX_MODULE_LINES + 1),
    })
    sites = A.import_sites(root)
    assert A.cycles(sites) == [["rtdmd.a", "rtdmd.b"]]
    lazy = [s for s in sites if s.in_function]
    assert [(s.module, s.target) for s in lazy] == [("rtdmd.a", "benchmarks.runner")]
    problems = A.layer_violations(sites)
    assert len(problems) == 2 and "up a layer" in problems[0] + problems[1] and any("command-line" in p for p in problems)
    assert A.module_strings(root) == ["rtdmd.b:2 names 'baselines.m:make', a module of a higher layer"]
    assert A.size_violations(root) == [f"benchmarks/runner.py: {A.MAX_MODULE_LINES + 1} lines (module over 500)"]
