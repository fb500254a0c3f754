"""The shape the project promises: one method per file, a small common.py of plumbing, files that
depend downward only, and a method file that runs when copied out with common.py and toy.py."""
import ast
import dataclasses
import importlib
import shutil
import sys

import pytest

from conftest import ROOT, run_script

PLUMBING = {"common", "toy"}
TOOLS = {"eval"}
METHODS = sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in PLUMBING | TOOLS)
TOP = set(METHODS) | PLUMBING | TOOLS


def imports(name):
    """The top-level project modules a file imports, anywhere in it (lazy imports included)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & TOP - {name}


def test_the_expected_files_are_there():
    assert {"coconut_sft", "grpo_latent", "latent_value_rl", "latent_sft", "soft_grpo", "latent_grpo", "hrpo"} <= set(METHODS)
    assert len(METHODS) >= 8


def test_files_depend_downward_only():
    graph = {name: imports(name) for name in TOP}
    assert graph["toy"] == set(), graph["toy"]
    assert graph["common"] <= {"toy"}, f"common.py imports {graph['common'] - {'toy'}}"
    for name in METHODS:
        assert graph[name] <= PLUMBING, f"{name}.py imports {graph[name] - PLUMBING}: a method file imports only common and toy"
    assert graph["eval"] <= PLUMBING, graph["eval"]   # eval.py reaches method files through importlib only


def test_no_import_cycle_among_top_level_files():
    """Also counts eval.py's importlib dispatch (MODE_FILES) as an edge."""
    graph = {name: imports(name) for name in TOP}
    eval_module = importlib.import_module("eval")
    graph["eval"] |= set(eval_module.MODE_FILES.values())
    state = {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        assert state.get(n) != "active", f"import cycle: {' -> '.join(path + [n])}"
        state[n] = "active"
        for m in sorted(graph.get(n, ())):
            visit(m, path + [n])
        state[n] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_every_mode_is_defined_by_a_file_that_exists():
    eval_module = importlib.import_module("eval")
    for mode, name in eval_module.MODE_FILES.items():
        module = importlib.import_module(name)
        assert callable(getattr(module, "reasoning", None)), f"{name}.py defines mode {mode!r} but has no reasoning()"


@pytest.mark.parametrize("name", METHODS + ["eval"])
def test_every_argument_has_help(name):
    module = importlib.import_module(name)
    missing = [f.name for f in dataclasses.fields(module.Args) if not f.metadata.get("help")]
    assert not missing, f"{name}.py: no help for {missing}"
