"""End-to-end: each script for a few steps on the tiny model, as a user runs it."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
from conftest import ROOT, main_error, one_line_error, run_script

FAST = ["--max_steps", "2", "--train_batch_size", "8", "--micro_batch_size", "4", "--max_eval_samples", "8",
        "--max_train_samples", "64", "--max_completion_length", "24", "--log_every", "1"]


@pytest.fixture(scope="module")
def coconut_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "coconut"
    p = run_script("coconut_sft.py", "--model", "toy", "--start_stage", "0", "--end_stage", "2",
                   "--max_latent_stage", "1", "--uniform_prob", "0.5", "--output_dir", out, *FAST)
    return out, p


def test_coconut_sft_runs_saves_and_reloads(coconut_run):
    out, p = coconut_run
    rows = common.read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(0 < x < 20 for x in losses)          # 3 stages x 2 steps, finite
    assert [r["stage"] for r in rows if "eval_acc" in r] == [0, 1, 2]     # evaluated after every stage
    assert any("thought_norm" in r for r in rows)
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "coconut" and cfg["n_latents"] == 2 and cfg["stage"] == 2
    assert (out / "curves.png").is_file() and not Path(str(out) + ".tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(out)                     # plain transformers loads it
    tok = AutoTokenizer.from_pretrained(out)
    assert common.LATENT in tok.get_vocab() and model.get_input_embeddings().weight.shape[0] == len(tok)


def test_eval_runs_on_the_saved_checkpoint(coconut_run, tmp_path):
    out, _ = coconut_run
    p = run_script("eval.py", "--model", out, "--max_samples", "6", "--num_samples", "3", "--max_completion_length", "16",
                   "--output_file", tmp_path / "r.json")
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["mode"] == "coconut" and res["n"] == 6 and 0 <= res["pass@1"] <= 1 and "pass@3" in res
    assert res["mean_L"] >= 2  # two latent slots at least
    assert "| coconut |" in p.stdout


def test_one_high_lr_step_changes_every_trained_parameter(tmp_path):
    start = tmp_path / "start"
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    common.save_checkpoint(model, tok, start, {"mode": "cot"})
    before = load_file(start / "model.safetensors")
    run_script("coconut_sft.py", "--model", start, "--dataset", "toy", "--start_stage", "1", "--end_stage", "1", "--learning_rate", "1e-2",
               "--output_dir", tmp_path / "out", *FAST[:-2], "--max_steps", "1")
    after = load_file(tmp_path / "out" / "model.safetensors")
    for name, w in before.items():
        new = after[name][: w.shape[0]] if "embed" in name else after[name]
        assert not torch.allclose(new, w), f"{name} did not change"


def test_token_removal_pause_and_no_curriculum_run(tmp_path):
    import coconut_sft  # in-process: three short runs without three interpreter start-ups
    for extra in (["--removal", "token"], ["--pause_as_thought"], ["--no_curriculum"]):
        out = tmp_path / extra[0].strip("-")
        argv = ["--model", "toy", "--start_stage", "1", "--end_stage", "2", "--output_dir", out, *extra, *FAST]
        coconut_sft.main(common.parse_args(coconut_sft.Args, [str(a) for a in argv]))
        assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,words", [
    (["--model", "/no/such/folder"], "neither a local folder nor a hub id"),
    (["--model", "nobody/no-such-model-xyz"], "could not load model"),
    (["--dataset", "/no/such/data.jsonl"], "does not exist"),
    (["--c_thought", "0"], "--c_thought must be at least 1"),
    (["--max_latent_stage", "-1"], "--max_latent_stage must be >= 0"),
    (["--model", str(ROOT / "tests")], "not a model checkpoint"),
])
def test_bad_input_is_one_line(argv, words, tmp_path):
    assert words in main_error("coconut_sft", "--model", "toy", *FAST, "--output_dir", tmp_path / "x", *argv)
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_bad_input_is_one_line_in_a_real_process(tmp_path):
    p = run_script("coconut_sft.py", "--model", "/no/such/folder", "--output_dir", tmp_path / "x", ok=False, timeout=120)
    one_line_error(p, "neither a local folder nor a hub id")


def test_bad_dataset_fields_are_one_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x", "answer": "1"}) + "\n")
    (tmp_path / "e.jsonl").write_text("")
    for name, words in [("d.jsonl", "no question field"), ("e.jsonl", "is empty")]:
        assert words in main_error("coconut_sft", "--model", "toy", "--dataset", tmp_path / name, *FAST, "--output_dir", tmp_path / "x")
    p = run_script("eval.py", "--model", ROOT / "tests", ok=False)
    one_line_error(p, "not a model checkpoint")


def test_require_latent_config(tmp_path):
    with pytest.raises(SystemExit, match="not a latent-rl checkpoint"):
        common.require_latent_config(tmp_path)
