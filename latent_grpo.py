"""Latent-GRPO: stable GRPO for vocabulary-superposition latent reasoning.

Paper: "Latent-GRPO: Group Relative Policy Optimization for Latent Reasoning", Jingcheng Deng, Zihao Wei,
Liang Pang et al. 2026, arXiv 2604.27998 (code: github DJC-GO-SOLO/Latent-GRPO). It starts from a
Latent-SFT model (latent_sft.py) and builds on Soft-GRPO (soft_grpo.py).
Docs: docs/latent_grpo.md

A rollout thinks in latent tokens until </think>, then answers in sampled words. A latent token:
    l = log_softmax(z),   g = noise_scale * (clamp(Gumbel, -1.5, 3) + 1.5 + eps) >= 0   (one-sided)
    s = l + g,   S = top-k(s),   fed vector sum_{i in S} softmax(s_S / tau_g)_i E[i],   token = argmax s
with no noise at a step whose noise-free top-1 is </think>. The surrogate log-likelihood of a latent
token under the current policy is (1/k) sum_{i in S} f(s_i - l_i(theta)), f(r) = -r - exp(-r) (the
Gumbel log-density); its margins r_i are >= 0 at the rollout policy. Three designs, each behind a flag:
  - invalid-sample advantage masking (--mask_invalid): a rollout that never ends gets advantage 0
    and leaves its group's mean and std;
  - one-sided noise (--one_sided_noise) and a straight-through rule (--ste) where an update made a
    margin negative (a crossed target), so that the update stays aligned with the advantage;
  - optimal correct-path first-token selection (--first_token_selection): of a group's correct,
    valid rollouts only the one with the best mean log-prob keeps its first latent's advantage.
Loss: PPO clip (0.8, 1.2) with dual clip 3 for A < 0, a token mean over latent and answer positions;
input embedding and LM head frozen; groups without signal are dropped and sampling continues until
the batch is full (dynamic sampling). The fraction of latent tokens is logged: RL can drift to text.

Usage:
    python latent_grpo.py                                    # toy: from checkpoints/toy-latent-sft -> runs/latent_grpo
    python latent_grpo.py --first_token_selection false      # an ablation (--one_sided_noise false --ste none: another)
    python eval.py --model runs/latent_grpo --num_samples 8 --noise_scale 1.0
"""
import contextlib
import functools
import random
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from tqdm import tqdm

import common
import toy

START_THINK, END_THINK = "<think>", "</think>"   # the think span: prompts end with <think>


@dataclass
class Args(common.TrainArgs):
    # the method: its three designs, the latent token, dynamic sampling
    mask_invalid: bool = field(default=True, metadata={
        "help": "design 1: rollouts that never end get advantage 0 and leave the group statistics"})
    single_valid_advantage: Literal["reward", "zero"] = field(default="reward", metadata={
        "help": "a group's lone valid rollout: reward (A = R, the authors' code) or zero (the paper)"})
    one_sided_noise: bool = field(default=True, metadata={
        "help": "design 2: shift the clamped Gumbel noise to >= 0 (false: two-sided)"})
    ste: Literal["paper", "code", "none"] = field(default="paper", metadata={
        "help": "straight-through rule for crossed targets: the paper's, the authors' code's, or none"})
    noise_scale: float = field(default=1.0, metadata={"help": "scale of the Gumbel noise on the latent scores"})
    noise_eps: float = field(default=1e-6, metadata={"help": "offset of the one-sided noise (the paper's eps)"})
    first_token_selection: bool = field(default=True, metadata={
        "help": "design 3: only the best correct rollout of a group keeps its first-token advantage"})
    top_k: int = field(default=10, metadata={"help": "vocabulary entries per latent token"})
    tau_g: float = field(default=1.0, metadata={"help": "temperature of the latent mixture weights"})
    temperature: float = field(default=0.6, metadata={"help": "answer sampling temperature (after </think>)"})
    top_p: float = field(default=0.95, metadata={"help": "answer nucleus sampling (after </think>)"})
    max_latent_steps: int = field(default=-1, metadata={
        "help": "cap on latent tokens, then </think> (-1: the checkpoint's, else min(48, half the completion))"})
    max_num_gen_batches: int = field(default=4, metadata={
        "help": "rollout rounds per step to fill the batch with groups that carry signal"})
    dual_clip: float = field(default=3.0, metadata={"help": "c of the dual clip for negative advantages (0 = off)"})
    # GRPO (TRL's names)
    num_generations: int = field(default=8, metadata={"help": "G: rollouts per prompt"})
    num_iterations: int = field(default=1, metadata={"help": "passes over each batch"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range (lower, and upper unless --epsilon_high)"})
    epsilon_high: Optional[float] = field(default=None, metadata={"help": "upper clip range (default: --epsilon)"})
    loss_type: Literal["dapo", "grpo", "dr_grpo", "token-mean", "seq-mean-token-mean"] = field(
        default="dapo", metadata={"help": "loss aggregation: dapo (token mean), grpo (rollouts' token means), dr_grpo"})
    scale_rewards: Literal["group", "batch", "none", "true", "false"] = field(default="group", metadata={
        "help": "divide R - valid group mean by the group's std, the batch's, or none (true/false = group/none)"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL coefficient to the frozen start model (paper: 0, 0.001)"})
    # the training loop
    mini_batch_size: int = field(default=8, metadata={"help": "prompts per optimizer update"})
    micro_batch_size: int = field(default=64, metadata={"help": "rollouts per forward pass on one rank"})
    max_steps: int = field(default=60, metadata={"help": "training steps"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps"})
    log_completions: bool = field(default=False, metadata={"help": "one completion per prompt to completions.jsonl"})
    generation_batch_size: int = field(default=0, metadata={
        "help": "rollouts generated at once on a rank, a multiple of --num_generations (0 = all at once)"})
    distributed: Literal["fsdp", "ddp"] = field(default="fsdp", metadata={"help": "under torchrun: FSDP2 or DDP"})
    # the flags every trainer shares (common.TrainArgs); (7) defaults sized for the toy task (paper: lr 1e-6)
    model_name_or_path: str = field(default=toy.LATENT_SFT, metadata={
        "help": "a Latent-SFT checkpoint, or a plain model or CoT checkpoint (capped)"})
    output_dir: str = "runs/latent_grpo"
    train_batch_size: int = field(default=16, metadata={"help": "prompts (groups with signal) per step, all ranks"})
    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW learning rate (constant)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on the added marker rows)"})
    lora_alpha: int = 32


# ----------------------------------------------------------------------------------------------
# the algorithm: the latent token and its noise, the think span, the surrogate log-likelihood,
# straight-through rules, advantages, first-token selection, the loss

def gumbel(x):
    """Standard Gumbel noise -log(-log U) shaped like x."""
    return torch.distributions.Gumbel(x.new_zeros(()), x.new_ones(())).sample(x.shape)


def topk_mixture(scores, E, k, tau=1.0):
    """A vocabulary-superposition latent: top-k of `scores`, weights softmax(top-k / tau), vector
    sum_i w_i E[id_i]. Returns (vectors (N, d), ids (N, k), weights (N, k))."""
    top, ids = scores.float().topk(k, dim=-1)
    weights = (top / tau).softmax(-1)
    return torch.einsum("nk,nkd->nd", weights.to(E.dtype), E[ids]), ids, weights


def one_sided_latent(k, tau_g, noise_scale, end_id, one_sided=True, eps=1e-6):
    """The rollout's latent: noisy scores s = l + g, top-k of s, weights softmax(s_S / tau_g).
    Records the top-k ids and their scores s (the fixed targets of the surrogate)."""
    def latent(logits, E):
        l = logits.float().log_softmax(-1)
        g = gumbel(l).clamp(-1.5, 3.0)
        if one_sided:
            g = g + 1.5 + eps   # (3) eps = --noise_eps, the paper's small offset (1e-6; the authors' code uses 0)
        g = (noise_scale * g).masked_fill((l.argmax(-1) == end_id)[:, None], 0.0)  # never delay </think>
        s = l + g
        vec, ids, _ = topk_mixture(s, E, k, tau_g)
        return vec, ids[:, 0], {"ids": ids, "scores": s.gather(-1, ids)}
    return latent


def mixture_latent(k, noise_scale=0.0):
    """The latent of evaluation (the "mixture" mode eval.py runs, as latent_sft.py defines it): top-k
    of l = log_softmax(z), weights softmax over those k, recorded id the top-1; `noise_scale` > 0
    adds noise_scale * clamp(Gumbel, -1.5, 3) to l first (two-sided: sampled pass@k)."""
    def latent(logits, E):
        scores = logits.float().log_softmax(-1)
        if noise_scale > 0:
            scores = scores + noise_scale * gumbel(scores).clamp(-1.5, 3.0)
        vec, ids, _ = topk_mixture(scores, E, k)
        return vec, ids[:, 0], {}
    return latent


class ThinkStep:
    """The rollout step (common.rollout) of a prompt ending with <think>. While a row thinks,
    `latent(logits, E)` (E: the input-embedding table) gives (vectors (N, d), recorded ids (N,),
    record {name: (N, ...)}): the row is fed its vector, and the record is kept for the loss
    (`extras()` stacks it over steps; zeros where a row did not think). A row stops thinking when
    its recorded id is </think> (fed, and scored, as an ordinary token) or after
    `max_latent_steps` latents (</think> forced, not scored). Its answer tokens are then sampled
    at `temperature` and `top_p` (greedy at temperature 0)."""

    def __init__(self, model, latent, end_id, max_latent_steps, temperature=0.0, top_p=1.0):
        self.embedding = common.unwrap(model).get_input_embeddings()
        self.latent, self.end_id, self.max_latent_steps = latent, end_id, max_latent_steps
        self.temperature, self.top_p = temperature, top_p
        self.records, self.thinking, self.E = [], None, None

    def __call__(self, t, logits, hidden, done):
        if t == 0:  # .weight read once per rollout, in it: under FSDP2 it is the gathered table only
            # during the rollout; under LoRA a table with the trained rows of the added tokens, built per read
            self.records, self.thinking, self.E = [], torch.ones_like(done), self.embedding.weight
        vec, ids, record = self.latent(logits, self.E)
        ends = self.thinking & (ids == self.end_id)
        forced = self.thinking & ~ends & (t >= self.max_latent_steps)
        latent = self.thinking & ~ends & ~forced
        tokens = torch.where(latent | ends, ids, common.sample_token(logits, self.temperature, 0, self.top_p))
        tokens = tokens.masked_fill(forced, self.end_id)
        kinds = torch.full_like(tokens, common.TOKEN, dtype=torch.int8)
        kinds = kinds.masked_fill(latent, common.LATENT_STEP).masked_fill(forced, common.FORCED)
        self.records.append({k: v * latent.view(-1, *[1] * (v.dim() - 1)).to(v.dtype) for k, v in record.items()})
        self.thinking = latent
        return tokens, vec, kinds

    def extras(self):
        if not self.records or not self.records[0]:
            return {}
        return {k: torch.stack([r[k] for r in self.records], 1) for k in self.records[0]}


def think_prompts(tokenizer, cfg, questions):
    """The prompts as the checkpoint was trained with (latent_config.json), ending with <think>."""
    start = common.require_tokens(tokenizer, [START_THINK, END_THINK], "a latent (mixture) model")[0]
    chat = cfg.get("prompt_format") == "chat"
    return [common.encode_prompt(tokenizer, q, chat, cfg.get("system_prompt", "")) + [start] for q in questions]


def reasoning(model, tokenizer, cfg, temperature=0.0, top_p=1.0):
    """How this file's checkpoints reason in its evaluations ("mixture" mode, as eval.py runs them
    through latent_sft.py): (prompts(questions) -> token ids, the rollout step). Deterministic
    latents at temperature 0; at temperature > 0 Gumbel noise of scale cfg["noise_scale"] (1.0)."""
    end = common.require_tokens(tokenizer, [START_THINK, END_THINK], "a latent (mixture) model")[1]
    noise = cfg.get("noise_scale", 1.0) if temperature > 0 else 0.0
    step = ThinkStep(model, mixture_latent(cfg.get("top_k", 10), noise), end, cfg.get("max_latent_steps", 10 ** 9),
                     temperature, top_p)
    return functools.partial(think_prompts, tokenizer, cfg), step


def gumbel_logdensity(r):
    """f(r) = -r - exp(-r): the log-density of a standard Gumbel variable at r."""
    return -r - torch.exp(-r)


def latent_logprob(logp_S, scores, ste="paper", adv=None):
    """Surrogate log-likelihood of each latent token, (1/K) sum_i f(r_i) with r_i = s_i - l_i(theta).
    logp_S, scores: (..., K); adv broadcastable to (...,) (only the "code" rule reads it)."""
    r = scores - logp_S
    if ste == "paper":  # (2) the paper's rule by default: same forward value, negated gradient of the margin
        r = torch.where(r < 0, 2 * r.detach() - r, r)
    f = gumbel_logdensity(r)
    if ste == "code":   # crossed target and A <= 0: backward through f(-r) = r - exp(r) instead
        alt = gumbel_logdensity(-r)
        use = (r < 0) & (adv <= 0).unsqueeze(-1)
        f = torch.where(use, alt + (f - alt).detach(), f)
    return f.mean(-1)


def valid_group_advantages(rewards, valid, G, eps=1e-6, single_valid="reward", scale="group", batch_std=None):
    """Invalid-sample advantage masking: mean and std over the valid rollouts of each group only;
    invalid rollouts get 0; groups with no valid rollout or std 0 get 0 everywhere. A group with
    exactly one valid rollout: "reward" gives it A = R (mean 0, std 1, the authors' code), "zero"
    gives it 0 (the paper: no signal from fewer than two valid rollouts). `scale` (TRL's
    scale_rewards): divide R - mean by the group's std ("group"), by `batch_std` (the std over the
    batch's valid rollouts, "batch"; a lone valid rollout keeps A = R) or by nothing ("none")."""
    r, v = rewards.view(-1, G), valid.view(-1, G).float()
    n = v.sum(1, keepdim=True)
    mean = (r * v).sum(1, keepdim=True) / n.clamp(min=1)
    std = (((r - mean) ** 2 * v).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std
    if single_valid == "reward":  # (1) the authors' code by default; the paper gives a lone valid rollout 0
        mean, std = mean.masked_fill(n == 1, 0.0), std.masked_fill(n == 1, 1.0)
    if scale == "none":
        adv = (r - mean) * v
    else:
        denom = std if scale == "group" else torch.where(n == 1, std, batch_std)
        adv = (r - mean) / (denom + eps) * v
    return (adv * ((n >= 1) & (std > 0))).flatten()


def first_token_selection(adv_tokens, seq_score, correct, valid, G):
    """Zero the first-token advantage of every rollout but the best correct, valid one of its
    group (highest seq_score). Groups without a correct, valid rollout are left as they are."""
    out = adv_tokens.clone()
    ok = (correct & valid).view(-1, G)
    score = seq_score.view(-1, G).masked_fill(~ok, float("-inf"))
    best = score.argmax(1)
    for g in range(ok.shape[0]):
        if ok[g].any():
            rows = torch.arange(g * G, (g + 1) * G, device=out.device)
            out[rows[rows != g * G + best[g]], 0] = 0.0
    return out


def ppo_dual_clip_loss(logp, old_logp, adv, eps_low, eps_high, dual_clip):
    """max(-A rho, -A clip(rho)) per position, capped at -c A where A < 0 (dual clip)."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip > 0:
        loss = torch.where(adv < 0, torch.min(loss, -dual_clip * adv), loss)
    return loss, ratio


def clipped_tokens(ratio, loss_mask, eps_low, eps_high):
    """How many scored tokens have a ratio outside the clip range [1 - eps_low, 1 + eps_high] (clip_frac's count),
    whatever the advantage's sign (the dual clip is not counted)."""
    return (((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float() * loss_mask).sum().item()


def position_logprobs(model, r, rows, temperature, ste="none", adv_tokens=None):
    """Per generated position: the latent surrogate at latent tokens, log pi(token) at temperature
    for sampled tokens (returns (n, T)); also the fraction of latent targets crossed (r < 0). One
    forward; the log-probs are computed in chunks of positions, at the sampled token (temperature)
    and at the k stored ids (l = log_softmax(z), temperature 1): common.completion_logprobs, never
    the whole (n, T, vocabulary) logits."""
    ids = r.extras["ids"][rows] if "ids" in r.extras else None
    lp = common.completion_logprobs(model, r, rows, temperature, ids=ids, ids_temperature=1.0)
    tok_lp = lp.token
    is_latent = r.kinds[rows] == common.LATENT_STEP
    if ids is None:
        return tok_lp, 0.0
    logp_S = lp.ids   # l_i(theta) at the rollout's top-k ids
    scores = r.extras["scores"][rows]
    lat_lp = latent_logprob(logp_S, scores, ste, adv_tokens)
    n_lat = is_latent.sum().clamp(min=1)
    crossed = (((scores - logp_S) < 0).float().mean(-1) * is_latent).sum() / n_lat
    # (4) the </think> that ends a span is an ordinary token here: its log-prob at the answer temperature
    return torch.where(is_latent, lat_lp, tok_lp), crossed.item()


LOSS_TYPES = {"dapo": "dapo", "grpo": "grpo", "dr_grpo": "dr_grpo", "token-mean": "dapo", "seq-mean-token-mean": "grpo"}
SCALE_REWARDS = {"group": "group", "batch": "batch", "none": "none", "true": "group", "false": "none"}


def aggregate_loss(per_tok, loss_mask, loss_type, n_tokens, n_rows, max_len):
    """A micro-batch's share of its mini-batch's loss (TRL's loss types): "dapo" sums the masked
    per-token losses over n_tokens (the mini-batch's scored tokens), "grpo" sums each rollout's
    token mean over n_rows (the mini-batch's rollouts), "dr_grpo" sums the masked per-token losses
    over n_rows x max_len (max_completion_length). Per rank; gradients are averaged over ranks."""
    if loss_type == "grpo":
        return ((per_tok * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)).sum() / n_rows
    if loss_type == "dr_grpo":
        return (per_tok * loss_mask).sum() / (n_rows * max_len)
    return (per_tok * loss_mask).sum() / n_tokens


# ----------------------------------------------------------------------------------------------
# dynamic sampling: groups with signal are kept, rounds of rollouts are joined into one batch

@dataclass
class Group:
    """One prompt's G rollouts, as dynamic sampling keeps or drops them."""
    rollout: common.Rollout     # its G rows
    correct: torch.Tensor       # (G,) bool: the reward of each rollout
    advantages: torch.Tensor    # (G,)
    example: dict               # the question and its answer
    completion: str             # the first rollout's text (--log_completions)


def take_rows(r, rows):
    """The rollout `r` restricted to the rows `rows` (a list of indices)."""
    rows = torch.as_tensor(rows, dtype=torch.long, device=r.tokens.device)
    fields = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in vars(r).items() if k != "extras"}
    return common.Rollout(**fields, extras={k: v[rows] for k, v in r.extras.items()})


def valid_batch_std(rewards, valid, d):
    """--scale_rewards batch: the std of the valid rollouts' rewards on every rank."""
    every = common.all_gather(rewards, d)[common.all_gather(valid.float(), d) > 0]
    return every.std() if len(every) > 1 else rewards.new_ones(())


# ----------------------------------------------------------------------------------------------
# the model: frozen tables, the policy's and the reference's log-probs, evaluation

def embedding_tables(model):
    """The input embedding and LM head weights (a tied head once); FSDP2 replaces them when it wraps."""
    m = common.unwrap(model)
    ws = [mod.weight for mod in (m.get_input_embeddings(), m.get_output_embeddings()) if mod is not None]
    return [w for i, w in enumerate(ws) if all(w is not v for v in ws[:i])]


def policy_logprobs(model, ref, r, rows, args, reference=False, **kw):
    """position_logprobs of the policy, or of the KL reference: the frozen copy `ref`, or with LoRA
    (`ref` None) the policy with its adapters off (the start model)."""
    scorer, context = common.scoring_reference(model, ref) if reference else (model, contextlib.nullcontext())
    with context:
        return position_logprobs(scorer, r, rows, args.temperature, **kw)


def run_eval(model, tokenizer, test, cfg, args, d, logger, step):
    """Greedy pass@1 (deterministic mixture latents, as eval.py runs them) and #L, logged as eval_acc, eval_mean_L."""
    res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                          max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
    logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
    return res


def main(args):
    # ---- 0. setup: the start model, its prompts, the think markers, frozen tables, the KL reference
    loss_type, scale_rewards = LOSS_TYPES[args.loss_type], SCALE_REWARDS[args.scale_rewards]
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    common.check_start(cfg, (None, "cot", "mixture"), "latent_grpo.py")   # (8) a Latent-SFT model, or a plain/CoT one
    start_cfg = dict(cfg or {})
    train, test = common.load_train_eval(args, start_cfg)
    prompting = common.prompt_settings(args, start_cfg, train)   # (9) the start's prompts, or --chat_template
    cap = args.max_latent_steps if args.max_latent_steps >= 0 else start_cfg.get(
        "max_latent_steps", min(48, args.max_completion_length // 2))
    new_rows = []
    if start_cfg.get("mode") != "mixture":  # (8) no latent SFT: warned, capped, markers added as rows of their own
        if d.main:
            print(f"warning: {args.model_name_or_path} never saw latent SFT: Latent-GRPO's paper initialises from a "
                  f"Latent-SFT model (latent_sft.py); expect the latent span to start as noise (capped at {cap} "
                  "latent steps, --max_latent_steps, then </think> is forced)", file=sys.stderr)
        had = set(tokenizer.get_vocab())
        markers = common.add_special_tokens(model, tokenizer, [START_THINK, END_THINK], init_from=None)
        new_rows = [i for i, t in zip(markers, [START_THINK, END_THINK]) if t not in had]
        start_cfg["mode"] = "mixture"
    cfg = {**start_cfg, "top_k": args.top_k, **prompting, "max_latent_steps": cap}
    saved_cfg = {**cfg, "method": "latent_grpo", "base_model": args.model_name_or_path}
    end_think = common.require_tokens(tokenizer, [START_THINK, END_THINK], "Latent-GRPO")[1]
    bf16, stop = common.use_bf16(args.bf16, d.device), common.stop_ids(model, tokenizer)
    ref = common.reference_model(model, args, d, bf16)   # the KL reference (with LoRA: the adapters off)
    # frozen input embedding and LM head: the latent space stays the vocabulary's span. (8) Rows this
    # run added (<think>, </think> of a model without latent SFT) must learn all the same. With
    # --lora_r the tables are frozen with the rest of the base model and peft trains those rows
    # (trainable tokens). In full fine-tuning the tables keep requires_grad, and `mask_row_grads`
    # zeroes the gradient of every other row, so Adam (no weight decay on them) leaves those exactly
    # as they were.
    if not args.lora_r:
        for w in embedding_tables(model):
            w.requires_grad_(bool(new_rows))
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                              new_rows)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    model = common.wrap_model(model, d, args.distributed, bf16)
    if args.lora_r:  # the added rows: peft's trainable tokens
        row_params = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad]
    else:
        row_params = [w for w in embedding_tables(model) if w.requires_grad]
    body = [p for p in model.parameters() if p.requires_grad and all(p is not w for w in row_params)]
    param_groups = [{"params": body}] + ([{"params": row_params, "weight_decay": 0.0}] if row_params else [])
    optimizer = torch.optim.AdamW(param_groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    G, need = args.num_generations, args.train_batch_size // d.world  # groups per rank
    eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    rng = random.Random(args.seed + 1000 * d.rank)
    state = common.TrainState(args, d, {"model": model}, [optimizer], rngs=[rng])
    start_step, extra = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=start_step)
    longest_prompt = max(len(p) for p in think_prompts(tokenizer, cfg, [ex["question"] for ex in train[:1000]]))
    common.print_memory_plan(model, d, args, min(args.micro_batch_size, need * G),
                             longest_prompt + args.max_completion_length, args.generation_batch_size or need * G,
                             longest_prompt + args.max_completion_length, frozen=ref)
    if start_step:
        start = extra["start"]   # (kept in checkpoints)
    else:
        start = {k: v for k, v in run_eval(model, tokenizer, test, cfg, args, d, logger, 0).items() if k != "examples"}

    for step in tqdm(range(start_step + 1, args.max_steps + 1), desc="latent-grpo", disable=not d.main,
                     initial=start_step, total=args.max_steps):
        # ---- 1. rollouts and rewards, in rounds until `need` groups carry signal on every rank (dynamic sampling)
        times = {}
        model.eval()
        kept, dropped, seen = [], [], []
        with common.timer(times, "rollout_s"):
            for rounds in range(1, args.max_num_gen_batches + 1):
                batch = [train[i] for i in rng.sample(range(len(train)), need)]
                latent = one_sided_latent(args.top_k, args.tau_g, args.noise_scale, end_think, args.one_sided_noise,
                                          args.noise_eps)
                # in pieces of --generation_batch_size rollouts, a fresh step each
                make_step = functools.partial(ThinkStep, model, latent, end_think, cfg["max_latent_steps"],
                                              args.temperature, args.top_p)
                prompts = think_prompts(tokenizer, cfg, [ex["question"] for ex in batch])
                r = common.generate(model, prompts, make_step, args.max_completion_length, stop, tokenizer.pad_token_id,
                                    G, args.generation_batch_size)
                texts = [common.decode_completion(tokenizer, r, i) for i in range(len(r.tokens))]
                correct = torch.tensor([common.is_correct(t, batch[i // G]["answer"]) for i, t in enumerate(texts)],
                                       device=d.device)
                # ---- 2. advantages (design 1: over the valid rollouts only); groups with signal are kept
                valid = r.finished if args.mask_invalid else torch.ones_like(r.finished)
                std = valid_batch_std(correct.float(), valid, d) if scale_rewards == "batch" else None
                adv = valid_group_advantages(correct.float(), valid, G, single_valid=args.single_valid_advantage,
                                             scale=scale_rewards, batch_std=std)
                seen.append((r, correct))
                for g, ex in enumerate(batch):
                    rows = list(range(g * G, (g + 1) * G))
                    group = Group(take_rows(r, rows), correct[rows], adv[rows], ex, texts[g * G])
                    (kept if group.advantages.abs().sum() > 0 else dropped).append(group)
                if common.all_reduce(float(len(kept) >= need), d, "sum") == d.world:
                    break
        times["rollout_tok_per_s"] = sum(x.lengths.sum().item() for x, _ in seen) / times["rollout_s"]
        groups = (kept + dropped)[:need]   # (6) still short after the last round: dropped groups (A = 0) fill it
        r = common.concat_rollouts([g.rollout for g in groups], tokenizer.pad_token_id)
        correct, adv = torch.cat([g.correct for g in groups]), torch.cat([g.advantages for g in groups])
        valid = r.finished if args.mask_invalid else torch.ones_like(r.finished)
        # the positions the loss scores: latents and sampled tokens (not a forced </think>, not padding)
        loss_mask = (((r.kinds == common.TOKEN) | (r.kinds == common.LATENT_STEP)) & r.mask.bool()).float()
        N, micro = len(r.tokens), args.micro_batch_size
        with common.timer(times, "update_s"):
            # ---- 3. old log-probs, (5) recomputed by a forward pass of the rollout policy, and reference log-probs
            with torch.no_grad():
                old_logp = torch.cat([policy_logprobs(model, ref, r, slice(i, i + micro), args)[0]
                                      for i in range(0, N, micro)])
                ref_logp = None if args.beta <= 0 else torch.cat(
                    [policy_logprobs(model, ref, r, slice(i, i + micro), args, True)[0] for i in range(0, N, micro)])
            # design 3: the per-position advantages, the first latent's kept only for each group's best correct rollout
            adv_tok = adv[:, None].expand_as(loss_mask).clone()
            if args.first_token_selection:
                seq_score = (old_logp * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)
                adv_tok = first_token_selection(adv_tok, seq_score, correct.bool(), valid, G)
            # ---- 4. update: PPO dual clip (+ k3 KL) per position, mini-batches of whole groups, micro-batches of rows
            model.train()
            stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "crossed_frac": 0.0, "grad_norm": 0.0, "n": 0, "m": 0}
            rows_per_mini = args.mini_batch_size // d.world * G
            for _ in range(args.num_iterations):
                for m0 in range(0, N, rows_per_mini):
                    mini = range(m0, min(N, m0 + rows_per_mini))
                    n_tok = common.all_reduce(loss_mask[mini].sum().item(), d) or 1.0
                    for i in range(mini.start, mini.stop, micro):
                        rows = slice(i, min(i + micro, mini.stop))
                        logp, crossed = policy_logprobs(model, ref, r, rows, args, ste=args.ste,
                                                        adv_tokens=adv_tok[rows])
                        per_tok, ratio = ppo_dual_clip_loss(logp, old_logp[rows], adv_tok[rows], args.epsilon, eps_high,
                                                            args.dual_clip)
                        if ref_logp is not None:
                            d_ref = ref_logp[rows] - logp
                            kl = torch.exp(d_ref) - d_ref - 1
                            per_tok = per_tok + args.beta * kl
                            stats["kl"] += ((kl * loss_mask[rows]).sum() / n_tok).item()
                        loss = aggregate_loss(per_tok, loss_mask[rows], loss_type, n_tok, len(mini),
                                              args.max_completion_length)
                        loss.backward()
                        stats["loss"] += loss.item()
                        stats["clip_frac"] += clipped_tokens(ratio, loss_mask[rows], args.epsilon, eps_high) / n_tok
                        stats["crossed_frac"] += crossed
                        stats["m"] += 1
                    if new_rows and not args.lora_r:
                        common.mask_row_grads(model, new_rows)
                    stats["grad_norm"] += common.clip_grad_norm(model, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stats["n"] += 1
        # ---- 5. log, evaluate, save
        all_correct = torch.cat([c for _, c in seen]).float()
        all_finished = torch.cat([x.finished for x, _ in seen]).float()
        is_lat = ((r.kinds == common.LATENT_STEP) & r.mask.bool()).float()
        row = {"reward": all_correct.mean().item(), "valid_frac": all_finished.mean().item(),
               "frac_groups_kept": len(kept) / (len(seen) * need), "gen_rounds": rounds,
               "completion_length": r.mask.sum(1).float().mean().item(), "n_latents": is_lat.sum(1).mean().item(),
               "latent_frac": (is_lat.sum() / loss_mask.sum().clamp(min=1)).item(),
               "loss": stats["loss"] / stats["n"], "clip_frac": stats["clip_frac"] / stats["n"],
               "crossed_frac": stats["crossed_frac"] / max(1, stats["m"]), "grad_norm": stats["grad_norm"] / stats["n"],
               **times}
        if ref_logp is not None:
            row["kl"] = stats["kl"] / stats["n"]
        # times are rank 0's own; every other number is averaged over the processes
        logger.log({k: common.all_reduce(v, d) if k not in times else v for k, v in row.items()}, step)
        if args.log_completions:
            shown = [{"question": g.example["question"], "completion": g.completion, "reward": float(g.correct[0])}
                     for g in groups]
            common.write_completions(args.output_dir, step, shown, d)
        if step % args.eval_every == 0 and step != args.max_steps:
            run_eval(model, tokenizer, test, cfg, args, d, logger, step)
        state.maybe_save(step, tokenizer, saved_cfg, extra={"start": start})
    final = run_eval(model, tokenizer, test, cfg, args, d, logger, args.max_steps)
    common.finish(model, tokenizer, saved_cfg, args, d, final, start,
                  plot_keys=["reward", "eval_acc", "eval_mean_L", "completion_length", "latent_frac", "crossed_frac"])
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
