"""Soft-GRPO: GRPO on soft-thinking (vocabulary-superposition) rollouts with Gumbel noise.

Paper: "SofT-GRPO: Surpassing Discrete-Token LLM Reinforcement Learning via Gumbel-Reparameterized
Soft-Thinking Policy Optimization", Zhi Zheng, Wee Sun Lee et al. 2025, arXiv 2511.06411 (code: github
zz1358m/SofT-GRPO-master); the latent baseline of Latent-GRPO (arXiv 2604.27998).
Docs: docs/soft_grpo.md

Inside the think span each step turns the logits z into a soft token:
    p~  = softmax(z / T) kept to its top-k (5) and top-p (0.95) entries, renormalised
    s_i = log(p~_i + 1e-6) + g_i,   g_i = clamp(Gumbel, -1.5, 3)   (two-sided noise)
    fed vector = sum_i softmax(s / tau_g)_i E[id_i] (tau_g 0.1: nearly Gumbel-max),  token = argmax s
The span ends when that token is </think>; the answer is then sampled as usual. The rollout stores
the ids, the scores s and the top-p set. A latent token's log-density under the current policy
recovers the noise each component must have had and takes its Gumbel log-density:
    r_i = s_i - log(p~_i(theta) + 1e-6),   log pi(latent) = mean_i f(r_i),   f(r) = -r - exp(-r)
Answer tokens use log softmax(z / T). Then GRPO: A = (R - group mean) / group std, per position
rho = exp(log pi - log pi_old), loss max(-A rho, -A clip(rho, 1 - 0.2, 1 + 0.2)) + 0.001 * k3 KL
to the start model, a token mean. Rollouts and training use the same T, k, top-p and tau_g.

Usage:
    python soft_grpo.py                               # toy: from checkpoints/toy-latent-sft -> runs/soft_grpo
    python eval.py --model runs/soft_grpo --num_samples 8 --noise_scale 1.0
    python soft_grpo.py --model runs/llama-latent-sft --dataset whynlp/gsm8k-aug --bf16 true --learning_rate 1e-6 \\
        --train_batch_size 64 --mini_batch_size 16 --micro_batch_size 32 --max_completion_length 128
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
    # the method: the soft token and its density
    temperature: float = field(default=0.6, metadata={"help": "T of p = softmax(z / T), in the span and after it"})
    top_k: int = field(default=5, metadata={"help": "k: vocabulary entries a soft token keeps before the top-p cut"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus of the soft token and of the answer sampling"})
    tau_g: float = field(default=0.1, metadata={"help": "temperature of the mixture weights softmax(s / tau_g)"})
    latent_density: Literal["code", "paper"] = field(default="code", metadata={
        "help": "a latent token's log-density: the authors' verl code, or the paper's formula read literally"})
    max_latent_steps: int = field(default=-1, metadata={
        "help": "cap on latent tokens, then </think> (-1: the checkpoint's, else min(48, half the completion))"})
    # GRPO (TRL's names)
    num_generations: int = field(default=8, metadata={"help": "G: rollouts per prompt"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range (lower, and upper unless --epsilon_high)"})
    epsilon_high: Optional[float] = field(default=None, metadata={"help": "upper clip range (default: --epsilon)"})
    loss_type: Literal["dapo", "grpo", "dr_grpo", "token-mean", "seq-mean-token-mean"] = field(
        default="dapo", metadata={"help": "loss aggregation: dapo (token mean), grpo (rollouts' token means), dr_grpo"})
    scale_rewards: Literal["group", "batch", "none", "true", "false"] = field(default="group", metadata={
        "help": "divide R - group mean by the group's std, the batch's, or none (true/false = group/none)"})
    beta: float = field(default=0.001, metadata={"help": "k3 KL coefficient to the frozen start model"})
    # the training loop
    mini_batch_size: int = field(default=8, metadata={"help": "prompts per optimizer update"})
    micro_batch_size: int = field(default=64, metadata={"help": "rollouts per forward pass on one rank"})
    max_steps: int = field(default=60, metadata={"help": "training steps"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps"})
    log_completions: bool = field(default=False, metadata={"help": "one completion per prompt to completions.jsonl"})
    generation_batch_size: int = field(default=0, metadata={
        "help": "rollouts generated at once on a rank, a multiple of --num_generations (0 = all at once)"})
    distributed: Literal["fsdp", "ddp"] = field(default="fsdp", metadata={"help": "under torchrun: FSDP2 or DDP"})
    # the flags every trainer shares (common.TrainArgs); (4) defaults sized for the toy task, from toy Latent-SFT
    model_name_or_path: str = field(default=toy.LATENT_SFT, metadata={
        "help": "a latent (mixture) checkpoint, or a plain model or CoT checkpoint (capped)"})
    output_dir: str = "runs/soft_grpo"
    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW learning rate (constant)"})
    weight_decay: float = 0.0
    lora_alpha: int = 32


# ----------------------------------------------------------------------------------------------
# the algorithm: the truncated soft token with two-sided Gumbel noise, the think span, the density

def gumbel(x):
    """Standard Gumbel noise -log(-log U) shaped like x."""
    return torch.distributions.Gumbel(x.new_zeros(()), x.new_ones(())).sample(x.shape)


def truncated_logprobs(lp_ids, keep):
    """log p~ at the stored ids: their log softmax(z / T) (`lp_ids`, (..., k)) renormalised over the
    entries where keep is 1."""
    return lp_ids - torch.logsumexp(lp_ids.masked_fill(keep == 0, float("-inf")), -1, keepdim=True)


def soft_gumbel_latent(T, k, top_p, tau_g):
    """The rollout's latent_fn: p~ = softmax(z / T) kept to its top-k / top-p entries and
    renormalised, s = log(p~ + 1e-6) + clamp(Gumbel, -1.5, 3) (a dropped entry scores log(1e-6) + g,
    as in the authors' sampler), weights softmax(s / tau_g); records ids, s and the kept mask."""
    def latent(logits, E):
        p, ids = (logits.float() / T).softmax(-1).topk(k, dim=-1)
        keep = ((p.cumsum(-1) - p) < top_p).float()              # smallest prefix reaching top_p
        p_t = p * keep / (p * keep).sum(-1, keepdim=True)
        s = torch.log(p_t + 1e-6) + gumbel(p_t).clamp(-1.5, 3.0)
        w = (s / tau_g).softmax(-1)
        vec = torch.einsum("nk,nkd->nd", w.to(E.dtype), E[ids])
        return vec, ids.gather(-1, s.argmax(-1, keepdim=True)).squeeze(-1), {"ids": ids, "scores": s, "keep": keep}
    return latent


def mixture_latent(k, noise_scale=0.0):
    """The latent of evaluation (the "mixture" mode eval.py runs, as latent_sft.py defines it): top-k
    of l = log_softmax(z), weights softmax over those k, recorded id the top-1; `noise_scale` > 0
    adds noise_scale * clamp(Gumbel, -1.5, 3) to l first (sampled pass@k)."""
    def latent(logits, E):
        scores = logits.float().log_softmax(-1)
        if noise_scale > 0:
            scores = scores + noise_scale * gumbel(scores).clamp(-1.5, 3.0)
        top, ids = scores.topk(k, dim=-1)
        vec = torch.einsum("nk,nkd->nd", top.softmax(-1).to(E.dtype), E[ids])
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


def soft_latent_logprob(log_pt, scores):
    """The authors' density (verl's logprobs_from_logits_topk_gumbel). log_pt: log p~ under the
    current policy, renormalised over all k stored components. The recovered noise
    r_i = clamp(s_i - log(p~_i + 1e-6), -1.5, 3) has zero gradient outside the bounds, where the
    rollout clamped the noise; the mean of f(r_i) runs over the components whose current
    log(p~_i + 1e-6) > -3 (the most likely one at least)."""
    lp = torch.log(log_pt.exp() + 1e-6)
    r = (scores - lp).clamp(-1.5, 3.0)
    use = ((lp > -3) | (lp == lp.max(-1, keepdim=True).values)).float()   # (6) the most likely one at least
    return (gumbel_logdensity(r) * use).sum(-1) / use.sum(-1)


def paper_latent_logprob(log_pt, scores, keep):
    """The paper's formula read literally (`--latent_density paper`): log_pt renormalised over the
    components the rollout kept (its top-p set), r_i = s_i - log p~_i unclamped, the mean of f(r_i)
    over those same components."""
    f = gumbel_logdensity(scores - log_pt) * keep
    return f.sum(-1) / keep.sum(-1).clamp(min=1)


def position_logprobs(model, r, rows, T, density="code"):
    """(n, T) log-probs: the Gumbel density at latent tokens, log pi(token) elsewhere. One forward;
    log softmax(z / T) is computed in chunks of positions, at the sampled token and at the k stored
    ids only (common.completion_logprobs: never the whole (n, T, vocabulary) logits)."""
    lp = common.completion_logprobs(model, r, rows, T, ids=r.extras["ids"][rows])   # lp.ids: log softmax(z / T)[ids]
    scores, keep = r.extras["scores"][rows], r.extras["keep"][rows]
    if density == "code":  # (1) the authors' code by default, not the paper's formula read literally
        lat_lp = soft_latent_logprob(truncated_logprobs(lp.ids, torch.ones_like(keep)), scores)
    else:
        keep = torch.where(keep.sum(-1, keepdim=True) > 0, keep, torch.ones_like(keep))  # outside the span: any value
        lat_lp = paper_latent_logprob(truncated_logprobs(lp.ids, keep), scores, keep)
    # (2) the </think> that ends a span is an ordinary token here: its log-prob at T
    return torch.where(r.kinds[rows] == common.LATENT_STEP, lat_lp, lp.token)


LOSS_TYPES = {"dapo": "dapo", "grpo": "grpo", "dr_grpo": "dr_grpo", "token-mean": "dapo", "seq-mean-token-mean": "grpo"}
SCALE_REWARDS = {"group": "group", "batch": "batch", "none": "none", "true": "group", "false": "none"}


def group_advantages(rewards, G, scale="group", batch_rewards=None, eps=1e-6):
    """GRPO's advantages (TRL's scale_rewards): R minus its group's mean, divided by the group's std
    ("group"), by the std of the whole batch's rewards ("batch"; `batch_rewards`: every rank's),
    or by nothing ("none")."""
    groups = rewards.view(-1, G)
    centred = groups - groups.mean(1, keepdim=True)
    if scale == "none":
        return centred.flatten()
    std = groups.std(1, keepdim=True) if scale == "group" else batch_rewards.std()
    return (centred / (std + eps)).flatten()


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


def clipped_tokens(ratio, loss_mask, eps_low, eps_high):
    """How many scored tokens have a ratio outside the clip range [1 - eps_low, 1 + eps_high] (clip_frac's count),
    whatever the advantage's sign."""
    return (((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float() * loss_mask).sum().item()


def policy_logprobs(model, ref, r, rows, args, reference=False):
    """position_logprobs of the policy, or of the KL reference: the frozen copy `ref`, or with LoRA
    (`ref` None) the policy with its adapters off (the start model)."""
    scorer, context = common.scoring_reference(model, ref) if reference else (model, contextlib.nullcontext())
    with context:
        return position_logprobs(scorer, r, rows, args.temperature, args.latent_density)


def run_eval(model, tokenizer, test, cfg, args, d, logger, step):
    """Greedy pass@1 (deterministic mixture latents, as eval.py runs them) and #L, logged as eval_acc, eval_mean_L."""
    res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                          max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
    logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
    return res


def main(args):
    # ---- 0. setup: the start model, its prompts, the think markers, the KL reference, the optimizer
    if args.temperature <= 0:
        common.die(f"--temperature must be positive (got {args.temperature})")
    loss_type, scale_rewards = LOSS_TYPES[args.loss_type], SCALE_REWARDS[args.scale_rewards]
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    common.check_start(cfg, (None, "cot", "mixture"), "soft_grpo.py")   # (5) a Latent-SFT model, or a plain/CoT one
    start_cfg = dict(cfg or {})
    train, test = common.load_train_eval(args, start_cfg)
    prompting = common.prompt_settings(args, start_cfg, train)   # (7) the start's prompts, or --chat_template
    cap = args.max_latent_steps if args.max_latent_steps >= 0 else start_cfg.get(
        "max_latent_steps", min(48, args.max_completion_length // 2))
    if start_cfg.get("mode") != "mixture":  # (5) no latent SFT: warned, capped, markers added; the whole model trains
        if d.main:  # a fresh </think> is rarely the top token: uncapped, the span would fill the budget
            print(f"warning: {args.model_name_or_path} never saw latent SFT (this file's toy runs start from "
                  f"latent_sft.py): its think span is capped at {cap} latent steps (--max_latent_steps), then "
                  "</think> is forced", file=sys.stderr)
        common.add_special_tokens(model, tokenizer, [START_THINK, END_THINK], init_from=None)
        start_cfg.update(mode="mixture", top_k=10)
    cfg = {**start_cfg, **prompting, "max_latent_steps": cap}
    saved_cfg = {**cfg, "method": "soft_grpo", "base_model": args.model_name_or_path}
    markers = common.require_tokens(tokenizer, [START_THINK, END_THINK], "Soft-GRPO")
    end_think = markers[1]
    bf16, stop = common.use_bf16(args.bf16, d.device), common.stop_ids(model, tokenizer)
    ref = common.reference_model(model, args, d, bf16)   # the KL reference (with LoRA: the adapters off)
    # --lora_r: adapters on every linear layer, the marker rows trainable (the whole model trains otherwise)
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, markers)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    model = common.wrap_model(model, d, args.distributed, bf16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    G, per_rank = args.num_generations, args.train_batch_size // d.world
    eps_low, eps_high = args.epsilon, args.epsilon if args.epsilon_high is None else args.epsilon_high
    rng = random.Random(args.seed + 1000 * d.rank)
    state = common.TrainState(args, d, {"model": model}, [optimizer], rngs=[rng])
    start_step, extra = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=start_step)
    longest_prompt = max(len(p) for p in think_prompts(tokenizer, cfg, [ex["question"] for ex in train[:1000]]))
    common.print_memory_plan(model, d, args, min(args.micro_batch_size, per_rank * G),
                             longest_prompt + args.max_completion_length, args.generation_batch_size or per_rank * G,
                             longest_prompt + args.max_completion_length, frozen=ref)
    if start_step:
        start = extra["start"]   # (kept in checkpoints)
    else:
        start = {k: v for k, v in run_eval(model, tokenizer, test, cfg, args, d, logger, 0).items() if k != "examples"}

    for step in tqdm(range(start_step + 1, args.max_steps + 1), desc="soft-grpo", disable=not d.main,
                     initial=start_step, total=args.max_steps):
        # ---- 1. rollout (soft thinking with two-sided Gumbel noise, then words) and reward
        times = {}
        batch = [train[i] for i in rng.sample(range(len(train)), per_rank)]
        model.eval()
        with common.timer(times, "rollout_s"):  # in pieces of --generation_batch_size rollouts, a fresh step each
            latent = soft_gumbel_latent(args.temperature, args.top_k, args.top_p, args.tau_g)
            make_step = functools.partial(ThinkStep, model, latent, end_think, cfg["max_latent_steps"],
                                          args.temperature, args.top_p)
            r = common.generate(model, think_prompts(tokenizer, cfg, [ex["question"] for ex in batch]), make_step,
                                args.max_completion_length, stop, tokenizer.pad_token_id, G, args.generation_batch_size)
        times["rollout_tok_per_s"] = r.lengths.sum().item() / times["rollout_s"]
        texts = [common.decode_completion(tokenizer, r, i) for i in range(len(r.tokens))]
        rewards = torch.tensor([float(common.is_correct(t, batch[i // G]["answer"])) for i, t in enumerate(texts)],
                               device=d.device)
        # ---- 2. advantages: R minus its group's mean, over the group's (or the batch's) std
        groups = rewards.view(-1, G)
        every = common.all_gather(rewards, d) if scale_rewards == "batch" else None   # every rank's rewards
        adv = group_advantages(rewards, G, scale_rewards, every)
        # the positions the loss scores: latents and sampled tokens (not a forced </think>, not padding)
        loss_mask = (((r.kinds == common.TOKEN) | (r.kinds == common.LATENT_STEP)) & r.mask.bool()).float()
        N, micro = len(r.tokens), args.micro_batch_size
        with common.timer(times, "update_s"):
            # ---- 3. old and reference log-probs: (3) a forward pass of the rollout policy, as verl does
            with torch.no_grad():
                old_logp = torch.cat([policy_logprobs(model, ref, r, slice(i, i + micro), args)
                                      for i in range(0, N, micro)])
                ref_logp = None if args.beta <= 0 else torch.cat(
                    [policy_logprobs(model, ref, r, slice(i, i + micro), args, True) for i in range(0, N, micro)])
            # ---- 4. update: PPO clip (+ k3 KL) per position, mini-batches of whole groups, micro-batches of rows
            model.train()
            stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "n": 0}
            rows_per_mini = args.mini_batch_size // d.world * G
            for m0 in range(0, N, rows_per_mini):
                mini = range(m0, min(N, m0 + rows_per_mini))
                n_tok = common.all_reduce(loss_mask[mini].sum().item(), d) or 1.0
                for i in range(mini.start, mini.stop, micro):
                    rows = slice(i, min(i + micro, mini.stop))
                    logp = policy_logprobs(model, ref, r, rows, args)
                    ratio = torch.exp(logp - old_logp[rows])
                    a = adv[rows, None]
                    per_tok = torch.max(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high))
                    if ref_logp is not None:
                        d_ref = ref_logp[rows] - logp
                        kl = torch.exp(d_ref) - d_ref - 1
                        per_tok = per_tok + args.beta * kl
                        stats["kl"] += ((kl * loss_mask[rows]).sum() / n_tok).item()
                    loss = aggregate_loss(per_tok, loss_mask[rows], loss_type, n_tok, len(mini),
                                          args.max_completion_length)
                    loss.backward()
                    stats["loss"] += loss.item()
                    stats["clip_frac"] += clipped_tokens(ratio, loss_mask[rows], eps_low, eps_high) / n_tok
                stats["grad_norm"] += common.clip_grad_norm(model, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["n"] += 1
        # ---- 5. log, evaluate, save
        is_lat = ((r.kinds == common.LATENT_STEP) & r.mask.bool()).float()
        row = {"reward": rewards.mean().item(), "frac_zero_std": (groups.std(1) == 0).float().mean().item(),
               "valid_frac": r.finished.float().mean().item(), "completion_length": r.mask.sum(1).float().mean().item(),
               "n_latents": is_lat.sum(1).mean().item(),
               "latent_frac": (is_lat.sum() / loss_mask.sum().clamp(min=1)).item(),
               "loss": stats["loss"] / stats["n"], "clip_frac": stats["clip_frac"] / stats["n"],
               "grad_norm": stats["grad_norm"] / stats["n"], **times}
        if ref_logp is not None:
            row["kl"] = stats["kl"] / stats["n"]
        # times are rank 0's own; every other number is averaged over the processes
        logger.log({k: common.all_reduce(v, d) if k not in times else v for k, v in row.items()}, step)
        if args.log_completions:
            shown = [{"question": ex["question"], "completion": texts[j * G], "reward": rewards[j * G].item()}
                     for j, ex in enumerate(batch)]
            common.write_completions(args.output_dir, step, shown, d)
        if step % args.eval_every == 0 and step != args.max_steps:
            run_eval(model, tokenizer, test, cfg, args, d, logger, step)
        state.maybe_save(step, tokenizer, saved_cfg, extra={"start": start})
    final = run_eval(model, tokenizer, test, cfg, args, d, logger, args.max_steps)
    common.finish(model, tokenizer, saved_cfg, args, d, final, start,
                  plot_keys=["reward", "eval_acc", "eval_mean_L", "completion_length", "kl"])
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
