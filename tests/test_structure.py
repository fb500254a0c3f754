"""The shape the project promises: one method per file, a small common.py of plumbing, files that
depend downward only, and a method file that runs when copied out with common.py and toy.py."""
import ast
import dataclasses
import importlib
import shutil
import sys

import pytest

from conftest import ROOT

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


# One step of each method file copied out with common.py and toy.py alone (no checkpoints/, no other
# file): the defaults fall back to the untrained toy model; a start that must be of a given kind is a
# local tiny checkpoint.
ONE_STEP = ["--max_train_samples", "16", "--max_eval_samples", "2", "--max_completion_length", "8"]
RL_STEP = ["--max_steps", "1", "--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2", *ONE_STEP]
COPY_RUNS = {
    "coconut_sft": ["--start_stage", "0", "--end_stage", "0", "--max_steps", "1", "--train_batch_size", "4",
                    "--micro_batch_size", "4", *ONE_STEP],
    "grpo_latent": RL_STEP,
    "latent_value_rl": ["--model", ROOT / "checkpoints" / "toy-coconut", "--max_steps", "1", "--pretrain_questions", "4",
                        "--pretrain_epochs", "1", "--train_batch_size", "2", *ONE_STEP],
    "latent_sft": ["--stage1_steps", "1", "--stage2_steps", "1", "--train_batch_size", "4", "--micro_batch_size", "4", *ONE_STEP],
    "soft_grpo": RL_STEP,
    "latent_grpo": RL_STEP,
    "hrpo": ["--max_steps", "1", "--train_batch_size", "2", "--num_generations", "2", *ONE_STEP],
    "atp_sft": ["--end_stage", "1", "--steps_per_stage", "1", "--train_batch_size", "4", "--micro_batch_size", "4", *ONE_STEP],
    "atp_rl": [*RL_STEP, "--micro_batch_size", "4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COPY_RUNS))
def test_a_method_file_copied_out_with_common_and_toy_runs(name, tmp_path):
    assert set(COPY_RUNS) == set(METHODS), "every method file has a copy run"
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in (f"{name}.py", "common.py", "toy.py"):
        shutil.copy(ROOT / f, folder / f)
    args = [str(a) for a in COPY_RUNS[name]]
    if name == "atp_rl":  # its start is an atp_sft checkpoint, made by atp_sft.py copied out on its own
        sft = tmp_path / "sft"
        sft.mkdir()
        for f in ("atp_sft.py", "common.py", "toy.py"):
            shutil.copy(ROOT / f, sft / f)
        run_in(sft, "atp_sft.py", *COPY_RUNS["atp_sft"], "--output_dir", tmp_path / "atp-start")
        args = ["--model", str(tmp_path / "atp-start"), *args]
    help_text = run_in(folder, f"{name}.py", "--help").stdout
    assert "--output_dir" in help_text and "--model" in help_text
    p = run_in(folder, f"{name}.py", *args, "--output_dir", tmp_path / "out")
    assert (tmp_path / "out" / "latent_config.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
    if "--model" not in args:
        assert "starting from the untrained toy model" in p.stdout


def run_in(folder, *argv):
    """`python <argv>` in `folder` with nothing of the project on the path but that folder."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, *map(str, argv)], cwd=folder, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, f"{argv} in {folder} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p
