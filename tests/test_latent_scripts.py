"""End-to-end: latent_sft.py, soft_grpo.py and latent_grpo.py for a few steps, and eval.py on them."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
from conftest import ROOT, main_error, run_script
from test_scripts import one_line_error

RL_FAST = ["--max_steps", "2", "--train_batch_size", "4", "--mini_batch_size", "2", "--num_generations", "4",
           "--max_eval_samples", "8", "--max_completion_length", "40", "--eval_every", "100"]
SFT_FAST = ["--stage1_steps", "2", "--stage2_steps", "2", "--train_batch_size", "8", "--micro_batch_size", "4",
            "--max_eval_samples", "8", "--max_train_samples", "64", "--max_completion_length", "40", "--log_every", "1"]


def finite(rows, keys):
    return all(r[k] == r[k] and abs(r[k]) < 1e6 for r in rows for k in keys if k in r)


@pytest.fixture(scope="module")
def latent_sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "latent_sft"
    run_script("latent_sft.py", *SFT_FAST, "--output_dir", out)
    return out


def test_latent_sft_runs_saves_and_reloads(latent_sft_run):
    out = latent_sft_run
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "mixture" and cfg["top_k"] == 10 and cfg["method"] == "latent_sft"
    rows = common.read_metrics(out / "metrics.jsonl")
    stages = [r["stage"] for r in rows if "ce" in r]
    assert stages == [1, 1, 2, 2] and finite(rows, ["ce", "kl", "grad_norm"])
    assert all(r["kl"] > 0 for r in rows if r.get("stage") == 2)              # stage 2 fits the soft labels
    tok = AutoTokenizer.from_pretrained(out)
    assert {common.START_THINK, common.END_THINK} <= set(tok.get_vocab())
    AutoModelForCausalLM.from_pretrained(out)


def test_eval_runs_a_mixture_checkpoint_with_gumbel_pass_at_k(latent_sft_run, tmp_path):
    p = run_script("eval.py", "--model", latent_sft_run, "--max_samples", "6", "--num_samples", "3", "--noise_scale", "1.0",
                   "--max_completion_length", "40", "--output_file", tmp_path / "e.json")
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["mode"] == "mixture" and 0 <= res["pass@1"] <= res["pass@3"] <= 1 and res["mean_L"] > 0
    assert "| latent_sft | mixture |" in p.stdout


def test_latent_sft_high_lr_step_changes_the_decoder(tmp_path):
    """Full copies and the paper's two LoRA adapters: one step at a high learning rate moves every
    linear weight of the saved (merged) model."""
    for lora in ("0", "8"):
        out = tmp_path / f"lora{lora}"
        run_script("latent_sft.py", "--stage1_steps", "1", "--stage2_steps", "1", "--train_batch_size", "4",
                   "--max_eval_samples", "2", "--max_completion_length", "8", "--learning_rate", "1e-2", "--warmup_steps", "0",
                   "--lora_r", lora, "--lora_alpha", "16", "--output_dir", out)
        before, after = load_file(f"{common.TOY_COT}/model.safetensors"), load_file(out / "model.safetensors")
        linear = [n for n in before if n.endswith("proj.weight")]
        assert linear and all(not torch.allclose(after[n], before[n]) for n in linear), lora
        assert "lora_A" not in " ".join(after)                       # merged: plain transformers weights


def test_soft_grpo_runs_and_saves(tmp_path):
    out = tmp_path / "soft"
    run_script("soft_grpo.py", *RL_FAST, "--output_dir", out)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and finite(rows, ["loss", "kl", "grad_norm"]) and all(r["kl"] >= 0 for r in rows)
    assert all(r["n_latents"] > 0 for r in rows)
    assert json.loads((out / "latent_config.json").read_text())["method"] == "soft_grpo"
    AutoModelForCausalLM.from_pretrained(out)


def test_latent_grpo_high_lr_step_trains_the_body_and_freezes_the_embeddings(tmp_path):
    out = tmp_path / "lgrpo"
    run_script("latent_grpo.py", "--max_steps", "1", "--train_batch_size", "4", "--mini_batch_size", "4", "--num_generations", "8",
               "--max_eval_samples", "4", "--max_completion_length", "40", "--learning_rate", "1e-2", "--ste", "code",
               "--beta", "0.01", "--log_completions", "--output_dir", out)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert finite(rows, ["loss", "kl", "crossed_frac", "grad_norm"]) and rows[0]["latent_frac"] > 0
    before, after = load_file(f"{common.TOY_LATENT_SFT}/model.safetensors"), load_file(out / "model.safetensors")
    for name, w in before.items():
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(after[name], w), f"{name} is frozen but changed"
        else:
            assert not torch.allclose(after[name], w), f"{name} did not change"
    assert (out / "completions.jsonl").read_text().count("\n") == 4


def test_latent_grpo_with_every_design_switched_off_runs(tmp_path):
    out = tmp_path / "abl"
    run_script("latent_grpo.py", *RL_FAST, "--one_sided_noise", "false", "--ste", "none", "--first_token_selection", "false",
               "--mask_invalid", "false", "--dual_clip", "0", "--single_valid_advantage", "zero", "--output_dir", out)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and finite(rows, ["loss", "grad_norm"])


def test_latent_grpo_from_a_model_without_latent_sft(tmp_path):
    out = tmp_path / "from_cot"
    p = run_script("latent_grpo.py", "--model", common.TOY_COT, *RL_FAST, "--max_latent_steps", "6", "--output_dir", out)
    assert "never saw latent SFT" in p.stderr and p.stderr.count("never saw latent SFT") == 1
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(r["n_latents"] <= 6 for r in rows)                              # the span is capped
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "mixture" and cfg["max_latent_steps"] == 6
    assert common.END_THINK in AutoTokenizer.from_pretrained(out).get_vocab()  # markers were added
    run_script("eval.py", "--model", out, "--max_samples", "4", "--max_completion_length", "24", "--output_file", tmp_path / "e.json")


@pytest.mark.parametrize("script,argv,words", [
    ("latent_grpo.py", ["--num_generations", "1"], "--num_generations must be at least 2"),
    ("latent_grpo.py", ["--ste", "sometimes"], "--ste must be paper, code or none"),
    ("latent_grpo.py", ["--single_valid_advantage", "one"], "--single_valid_advantage must be reward or zero"),
    ("soft_grpo.py", ["--latent_density", "mine"], "--latent_density must be code or paper"),
    ("soft_grpo.py", ["--num_generations", "1"], "--num_generations must be at least 2"),
    ("soft_grpo.py", ["--model", "no/such-model-here"], "no/such-model-here"),
    ("latent_sft.py", ["--compression", "0"], "--compression and --top_k must be at least 1"),
])
def test_bad_input_is_one_line(script, argv, words, tmp_path):
    assert words in main_error(script[:-3], *argv, "--output_dir", tmp_path / "x")


def test_bad_input_from_the_command_line(tmp_path):
    one_line_error(run_script("latent_grpo.py", "--ste", "sometimes", "--output_dir", tmp_path / "x", ok=False),
                   "--ste must be paper, code or none")


def test_latent_sft_needs_reasoning_steps(tmp_path):
    data = tmp_path / "nosteps.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(10)))
    assert "has no reasoning steps" in main_error("latent_sft", "--dataset", data, "--output_dir", tmp_path / "x")


def test_two_process_latent_grpo(tmp_path):
    out = tmp_path / "lgrpo"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521",
               ROOT / "tests" / "dist_worker.py", "latent_grpo", *RL_FAST, "--beta", "0.01", "--output_dir", out,
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and finite(rows, ["loss", "kl", "grad_norm"])
