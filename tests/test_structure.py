"""The shape the project promises: one method per file, a small common.py of plumbing, files that
depend downward only, a method file that runs when copied out with common.py and toy.py, and no
line of code over 120 columns anywhere."""
import ast
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import common
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
    assert {"coconut_sft", "grpo_latent", "latent_value_rl", "latent_sft", "soft_grpo", "latent_grpo",
            "hrpo"} <= set(METHODS)
    assert len(METHODS) >= 8


def test_files_depend_downward_only():
    graph = {name: imports(name) for name in TOP}
    assert graph["toy"] == set(), graph["toy"]
    assert graph["common"] <= {"toy"}, f"common.py imports {graph['common'] - {'toy'}}"
    for name in METHODS:
        assert graph[name] <= PLUMBING, (f"{name}.py imports {graph[name] - PLUMBING}: "
                                         "a method file imports only common and toy")
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
    missing = [name for name, _, f in sum(common.flag_fields(module.Args), []) if not f.metadata.get("help")]
    assert not missing, f"{name}.py: no help for {missing}"


@pytest.mark.parametrize("name", METHODS)
def test_trainers_declare_the_shared_flags_once(name):
    """Every trainer's Args derives from common.TrainArgs and re-declares a shared flag only to change
    its default or its help: the shared flags are written once, in common.py."""
    args = importlib.import_module(name).Args
    assert issubclass(args, common.TrainArgs), f"{name}.Args does not derive from common.TrainArgs"
    base = {f.name: f for f in dataclasses.fields(common.TrainArgs)}
    source = ast.parse((ROOT / f"{name}.py").read_text())
    body = next(n for n in source.body if isinstance(n, ast.ClassDef) and n.name == "Args").body
    redeclared = [n.target.id for n in body if isinstance(n, ast.AnnAssign) and n.target.id in base]
    own = {f.name: f for f in dataclasses.fields(args)}
    same = [k for k in redeclared if own[k].default == base[k].default
            and own[k].metadata.get("help", base[k].metadata["help"]) == base[k].metadata["help"]]
    assert not same, f"{name}.py re-declares {same} as common.TrainArgs has them"


MAX_COLUMNS = 120


def is_code(path):
    """A .py or .sh file, or a script without a suffix that starts with #! (.ci/run)."""
    if path.suffix in (".py", ".sh"):
        return True
    if path.suffix or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


def code_files(root=ROOT, git=True):
    """Every file of code in the repository: the ones git tracks; without git (or outside a
    checkout), the ones on disk, leaving out .git, caches and virtual environments."""
    names = None
    if git:
        try:
            p = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, timeout=60)
            names = [n for n in p.stdout.split("\0") if n] if p.returncode == 0 else None
        except OSError:  # no git on the PATH
            pass
    if names is None:
        names = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != ".git" and d != "__pycache__" and not d.endswith("_cache")
                       and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))]
            names += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    # (a tracked file deleted in the working tree is not there to read)
    return sorted(Path(n) for n in names if (root / n).is_file() and is_code(root / n))


def long_lines(path, limit=MAX_COLUMNS):
    """`path:line: N columns` for each line longer than `limit` characters."""
    lines = [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    return [f"{path}:{i}: {len(line)} columns" for i, line in enumerate(lines, 1) if len(line) > limit]


def test_no_line_of_code_over_120_columns():
    files = code_files()
    for must in ("common.py", "tests/test_structure.py", "scripts/toy_results.py", "scripts/gpu_check.sh"):
        assert Path(must) in files, f"{must} is not among the files checked"
    bad = [hit for f in files for hit in long_lines(ROOT / f)]
    assert not bad, f"lines over {MAX_COLUMNS} columns:\n" + "\n".join(bad)


def test_the_line_check_catches_a_121_column_line(tmp_path):
    (tmp_path / "ok.py").write_text("x = 1\n" + "#" * 120 + "\n" + "é" * 120 + "\n")
    (tmp_path / "long.py").write_text("x = 1\n" + "#" * 121 + "\n")
    (tmp_path / "long.sh").write_text("echo " + "a" * 116 + "\n")
    (tmp_path / "run").write_text("#!/usr/bin/env bash\n" + "a" * 121 + "\n")
    (tmp_path / "notes.txt").write_text("a" * 200 + "\n")  # not code
    assert long_lines(tmp_path / "ok.py") == []
    assert long_lines(tmp_path / "long.py") == [f"{tmp_path / 'long.py'}:2: 121 columns"]
    assert len(long_lines(tmp_path / "long.sh")) == 1
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "cached.py").write_text("#" * 121 + "\n")
    files = code_files(tmp_path, git=False)  # the files on disk
    assert files == [Path("long.py"), Path("long.sh"), Path("ok.py"), Path("run")]
    assert [f for f in files if long_lines(tmp_path / f)] == [Path("long.py"), Path("long.sh"), Path("run")]
    if shutil.which("git"):  # the files git tracks
        subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
        subprocess.run(["git", "add", "ok.py", "long.py", "run", "notes.txt"], cwd=tmp_path, check=True)
        assert code_files(tmp_path) == [Path("long.py"), Path("ok.py"), Path("run")]


# One step of each method file copied out with common.py and toy.py alone (no checkpoints/, no other
# file): the defaults fall back to the untrained toy model; a start that must be of a given kind is a
# local tiny checkpoint.
ONE_STEP = ["--max_train_samples", "16", "--max_eval_samples", "2", "--max_completion_length", "8"]
RL_STEP = ["--max_steps", "1", "--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2", *ONE_STEP]
COPY_RUNS = {
    "coconut_sft": ["--start_stage", "0", "--end_stage", "0", "--max_steps", "1", "--train_batch_size", "4",
                    "--micro_batch_size", "4", *ONE_STEP],
    "grpo_latent": RL_STEP,
    "latent_value_rl": ["--model", ROOT / "checkpoints" / "toy-coconut", "--max_steps", "1",
                        "--pretrain_questions", "4", "--pretrain_epochs", "1", "--train_batch_size", "2", *ONE_STEP],
    "latent_sft": ["--stage1_steps", "1", "--stage2_steps", "1", "--train_batch_size", "4", "--micro_batch_size", "4",
                   *ONE_STEP],
    "soft_grpo": RL_STEP,
    "latent_grpo": RL_STEP,
    "hrpo": ["--max_steps", "1", "--train_batch_size", "2", "--num_generations", "2", *ONE_STEP],
    "atp_sft": ["--end_stage", "1", "--steps_per_stage", "1", "--train_batch_size", "4", "--micro_batch_size", "4",
                *ONE_STEP],
    "atp_rl": [*RL_STEP, "--micro_batch_size", "4"],
    "multiplex_thinking": RL_STEP,
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, *map(str, argv)], cwd=folder, capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0, f"{argv} in {folder} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_a_docs_page_whose_numbered_details_are_its_comments(name):
    """docs/<name>.md exists, and its implementation details are numbered as the `(n)` comments of
    <name>.py: each deviation is named at its line and explained on the page."""
    import re
    page = ROOT / "docs" / f"{name}.md"
    assert page.is_file(), f"{name}.py has no docs page"
    text = page.read_text()
    assert "## Implementation details" in text and "## Logged metrics" in text, page
    details = text.split("## Implementation details", 1)[1].split("\n## ", 1)[0]
    in_code = {int(n) for n in re.findall(r"[#;(\s]\((\d{1,2})\)", (ROOT / f"{name}.py").read_text())}
    on_page = {int(n) for n in re.findall(r"^(\d{1,2})\. ", details, re.M)}
    assert in_code == on_page, f"{name}: only in the code {sorted(in_code - on_page)}, only on the page " \
                               f"{sorted(on_page - in_code)}"
