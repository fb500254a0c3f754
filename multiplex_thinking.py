"""Multiplex Thinking: GRPO on rollouts that think in mixtures of K sampled tokens.

Paper: "Multiplex Thinking: Reasoning via Token-wise Branch-and-Merge", Yao Tang, Li Dong, Yaru Hao et al.
2026, arXiv 2601.08808 (code: github GMLR-Penn/Multiplex-Thinking, a fork of verl).
Docs: docs/multiplex_thinking.md

At each step of the think span, p = softmax(z / T) and K ids k_1..k_K are drawn from p, i.i.d. with
replacement. The next input is one continuous "multiplex" token
    c = sum_j w_j E[k_j],   w_j = p(k_j) / sum_j' p(k_j')   (--weighting uniform: w_j = 1/K)
which is an ordinary token when the K samples agree. The span ends when the first sample (the
authors' code; --stop_rule argmax: the argmax, the paper's appendix) ends thinking; that id is fed
as an ordinary token, and the answer is sampled one token a step. A think step's log-density is
    log pi(c) = sum_j log softmax(z / T)[k_j],
the weights being constants of the rollout. GRPO: A = (R - group mean) / (group std + 1e-6) at every
position and slot; per slot rho = exp(clamp(log pi - log pi_old, -20, 20)), PPO clip (0.8, 1.2) with
dual clip 3 for A < 0; a position sums its slots (K while thinking, 1 for an answer token); token mean.
K = 1 is plain GRPO on sampled tokens.

Where the span ends: at </think> on a model that has it as one token (DeepSeek-R1-Distill, as the
paper runs); otherwise, on this project's CoT models and prompts, at the answer marker "###" that ends
their reasoning (any token that begins it), so that a CoT model thinks where it reasons in words.

Usage:
    python multiplex_thinking.py                         # toy: from checkpoints/toy-cot -> runs/multiplex_thinking
    python multiplex_thinking.py --multiplex_k 1         # plain GRPO, for comparison
    python eval.py --model runs/multiplex_thinking --num_samples 8
    python eval.py --model checkpoints/toy-cot --mode multiplex      # training-free multiplex rollouts
"""
import contextlib
import functools
import random
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from tqdm import tqdm

import common
import toy

END_THINK = "</think>"


@dataclass
class Args(common.TrainArgs):
    # the method: the multiplex token, the end of the span
    multiplex_k: int = field(default=3, metadata={"help": "K: token ids sampled per think step (1 = plain GRPO)"})
    weighting: Literal["weighted", "uniform"] = field(default="weighted", metadata={
        "help": "mixture weights: p(k_j) normalised over the K slots, or 1/K"})
    stop_rule: Literal["first", "argmax"] = field(default="first", metadata={
        "help": "the span ends when the first sample ends it (the authors' code) or the argmax does (the paper)"})
    temperature: float = field(default=1.0, metadata={"help": "T of p = softmax(z / T), thinking and answering"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus of the sampling (the paper: 1)"})
    # GRPO (TRL's names)
    num_generations: int = field(default=8, metadata={"help": "G: rollouts per prompt"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range (lower, and upper unless --epsilon_high)"})
    epsilon_high: Optional[float] = field(default=None, metadata={"help": "upper clip range (default: --epsilon)"})
    dual_clip: float = field(default=3.0, metadata={"help": "c of the dual clip for negative advantages (0 = off)"})
    loss_type: Literal["dapo", "grpo", "dr_grpo", "token-mean", "seq-mean-token-mean"] = field(
        default="dapo", metadata={"help": "loss aggregation: dapo (token mean), grpo (rollouts' token means), dr_grpo"})
    scale_rewards: Literal["group", "batch", "none", "true", "false"] = field(default="group", metadata={
        "help": "divide R - group mean by the group's std, the batch's, or none (true/false = group/none)"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL coefficient to the frozen start model (paper: 0)"})
    # the training loop
    mini_batch_size: int = field(default=16, metadata={"help": "prompts per optimizer update (the paper: one a batch)"})
    micro_batch_size: int = field(default=64, metadata={"help": "rollouts per forward pass on one rank"})
    max_steps: int = field(default=60, metadata={"help": "training steps"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps"})
    log_completions: bool = field(default=False, metadata={"help": "one completion per prompt to completions.jsonl"})
    generation_batch_size: int = field(default=0, metadata={
        "help": "rollouts generated at once on a rank, a multiple of --num_generations (0 = all at once)"})
    distributed: Literal["fsdp", "ddp"] = field(default="fsdp", metadata={"help": "under torchrun: FSDP2 or DDP"})
    # the flags every trainer shares (common.TrainArgs); (1) defaults sized for the toy task (the paper: lr 1e-6)
    model_name_or_path: str = field(default=toy.COT, metadata={
        "help": "a plain causal LM, a CoT checkpoint, or a multiplex checkpoint"})
    output_dir: str = "runs/multiplex_thinking"
    max_completion_length: int = 48
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (constant)"})


# ----------------------------------------------------------------------------------------------
# the algorithm: the multiplex token, the end of the span, the slot log-probs, advantages, the loss

@functools.lru_cache(maxsize=8)   # (reading a 150k vocabulary takes a second: once per tokenizer, not per evaluation)
def think_end_ids(tokenizer):
    """The ids that end the think span: </think> if the tokenizer has it as one token, else every token
    that begins the answer marker "###" ("#", "##", " ###", ... : its first piece, however it is split)."""
    if END_THINK in tokenizer.get_vocab():
        return [tokenizer.convert_tokens_to_ids(END_THINK)]
    marker = common.ANSWER_MARKER   # (4) on a model without </think>, a choice of this project
    pieces = [tokenizer.convert_tokens_to_string([t]).strip() for t in tokenizer.convert_ids_to_tokens(
        list(range(len(tokenizer))))]
    return [i for i, s in enumerate(pieces) if s and (marker.startswith(s) or s.startswith(marker))]


def multiplex_token(logits, K, T=1.0, top_p=1.0, weighting="weighted"):
    """K ids drawn i.i.d. from p = softmax(logits / T) (top-p truncated), and their weights: p(k_j)
    normalised over the K slots (a duplicate counts once per slot), or 1/K. Returns (ids, weights, p)."""
    p = (logits.float() / T).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = p.sort(-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p   # keep the smallest set reaching top_p
        p = p.masked_fill(drop.scatter(-1, order, drop), 0.0)
        p = p / p.sum(-1, keepdim=True)
    ids = torch.multinomial(p, K, replacement=True)
    w = p.gather(-1, ids)
    w = w / w.sum(-1, keepdim=True) if weighting == "weighted" else torch.full_like(w, 1.0 / K)
    return ids, w, p


class MultiplexStep:
    """The rollout step (common.rollout): while a row thinks it is fed sum_j w_j E[k_j] (recorded as a
    LATENT_STEP with the first sample as its id; `extras()` gives the K ids and weights); the step whose
    first sample (or argmax) is an end id is fed as that ordinary token, and from then on tokens are
    sampled at `answer_temperature` (greedy at 0). Think steps always sample at T: multiplex thinking
    has no greedy form."""

    def __init__(self, model, K, end_ids, T=1.0, top_p=1.0, weighting="weighted", stop_rule="first",
                 answer_temperature=None):
        self.embedding = common.unwrap(model).get_input_embeddings()
        self.K, self.T, self.top_p, self.weighting, self.stop_rule = K, T, top_p, weighting, stop_rule
        self.answer_temperature = T if answer_temperature is None else answer_temperature
        self.end_ids = torch.as_tensor(end_ids)
        self.records, self.thinking, self.E = [], None, None

    def __call__(self, t, logits, hidden, done):
        if t == 0:  # .weight read once per rollout, inside it (under FSDP2 the gathered table)
            self.records, self.thinking, self.E = [], torch.ones_like(done), self.embedding.weight
            self.end_ids = self.end_ids.to(done.device)
        ids, w, p = multiplex_token(logits, self.K, self.T, self.top_p, self.weighting)
        trigger = ids[:, 0] if self.stop_rule == "first" else p.argmax(-1)   # (2) the code's rule by default
        ends = self.thinking & torch.isin(trigger, self.end_ids)
        latent = self.thinking & ~ends
        answer = ids[:, 0]   # (5) after the span: one sample from p (so K = 1 draws as plain sampling does)
        if self.answer_temperature != self.T:  # an evaluation's greedy (or otherwise tempered) answer
            answer = common.sample_token(logits, self.answer_temperature, 0, self.top_p)
        tokens = torch.where(latent, ids[:, 0], torch.where(ends, trigger, answer))
        kinds = torch.full_like(tokens, common.TOKEN, dtype=torch.int8).masked_fill(latent, common.LATENT_STEP)
        vec = torch.einsum("nk,nkd->nd", w.to(self.E.dtype), self.E[ids])
        keep = latent[:, None]
        self.records.append((ids * keep, w * keep))
        self.thinking = latent
        return tokens, vec, kinds

    def extras(self):
        if not self.records:
            return {}
        ids, weights = zip(*self.records)
        return {"ids": torch.stack(ids, 1), "weights": torch.stack(weights, 1)}


def prompts_for(tokenizer, cfg, questions):
    """The prompts as the start checkpoint was trained with; a model with <think> gets it opened (unless
    its chat template already did), so that the response starts inside the span."""
    chat, system = cfg.get("prompt_format") == "chat", cfg.get("system_prompt", "")
    ids = [common.encode_prompt(tokenizer, q, chat, system) for q in questions]
    start = tokenizer.get_vocab().get("<think>") if END_THINK in tokenizer.get_vocab() else None
    return [p if start is None or start in p[-3:] else p + [start] for p in ids]


def reasoning(model, tokenizer, cfg, temperature=0.0, top_p=1.0):
    """How mode "multiplex" reasons in evaluations (this file's and eval.py's, also on any plain or CoT
    model: the paper's training-free multiplex baseline): (prompts(questions) -> token ids, the step).
    (3) Think steps sample their K ids at the checkpoint's T even when the answer is greedy."""
    step = MultiplexStep(model, cfg.get("multiplex_k", 3), think_end_ids(tokenizer), cfg.get("temperature", 1.0),
                         cfg.get("top_p", 1.0), cfg.get("weighting", "weighted"), cfg.get("stop_rule", "first"),
                         answer_temperature=temperature)
    return functools.partial(prompts_for, tokenizer, cfg), step


def slot_logprobs(model, r, rows, T):
    """(n, T, K) log softmax(z / T) of each slot, recomputed by `model` on the rollout's inputs (the
    multiplex tokens rebuilt from the stored ids and weights, so gradients reach the embedding rows),
    and the (n, T, K) mask of real slots: K at a think step, the first at an answer token."""
    prompt_ids, prompt_mask = r.prompt_ids[rows], r.prompt_mask[rows]
    ids, weights = r.extras["ids"][rows], r.extras["weights"][rows]
    think = (r.kinds[rows] == common.LATENT_STEP) & r.mask[rows].bool()
    input_ids = torch.cat([prompt_ids, r.tokens[rows]], 1)
    mask = torch.cat([prompt_mask, r.mask[rows]], 1)
    pad = ids.new_zeros(prompt_ids.shape + ids.shape[-1:])
    mix = (torch.cat([pad, ids], 1), torch.cat([pad.to(weights.dtype), weights], 1))
    latent_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), think], 1)
    # (6) log softmax(z / T) over the whole vocabulary, whatever --top_p the rollout sampled with
    lp, _ = common.lm_logprobs(model, input_ids, mask, common.positions(mask), r.tokens[rows], T, latent_mask, mix,
                               ids=ids)
    first = torch.zeros_like(weights, dtype=torch.bool)
    first[..., 0] = True
    slots = torch.where(think[..., None], torch.ones_like(first), first)
    return torch.where(think[..., None], lp.ids, lp.token[..., None] * first), slots.float()


LOSS_TYPES = {"dapo": "dapo", "grpo": "grpo", "dr_grpo": "dr_grpo", "token-mean": "dapo", "seq-mean-token-mean": "grpo"}
SCALE_REWARDS = {"group": "group", "batch": "batch", "none": "none", "true": "group", "false": "none"}


def group_advantages(rewards, G, scale="group", batch_rewards=None, eps=1e-6):
    """GRPO's advantages: R minus its group's mean, over the group's std ("group"), the whole batch's
    ("batch"; `batch_rewards`: every rank's), or nothing ("none")."""
    groups = rewards.view(-1, G)
    centred = groups - groups.mean(1, keepdim=True)
    if scale == "none":
        return centred.flatten()
    std = groups.std(1, keepdim=True) if scale == "group" else batch_rewards.std()
    return (centred / (std + eps)).flatten()


def multiplex_loss(logp, old_logp, adv, slots, eps_low, eps_high, dual_clip):
    """Per position: the sum over its real slots of the per-slot PPO loss max(-A rho, -A clip(rho)),
    capped at -c A where A < 0 (dual clip); rho = exp(clamp(log pi - log pi_old, -20, 20)). Returns
    ((n, T) losses, (n, T, K) ratios)."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    a = adv[:, None, None]
    loss = torch.max(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip > 0:
        loss = torch.where(a < 0, torch.min(loss, -dual_clip * a), loss)
    return (loss * slots).sum(-1), ratio


def aggregate_loss(per_tok, loss_mask, loss_type, n_tokens, n_rows, max_len):
    """A micro-batch's share of its mini-batch's loss (TRL's loss types; see soft_grpo.py)."""
    if loss_type == "grpo":
        return ((per_tok * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)).sum() / n_rows
    if loss_type == "dr_grpo":
        return (per_tok * loss_mask).sum() / (n_rows * max_len)
    return (per_tok * loss_mask).sum() / n_tokens


def policy_logprobs(model, ref, r, rows, T, reference=False):
    """slot_logprobs of the policy, or of the KL reference: the frozen copy `ref`, or with LoRA (`ref`
    None) the policy with its adapters off."""
    scorer, context = common.scoring_reference(model, ref) if reference else (model, contextlib.nullcontext())
    with context:
        return slot_logprobs(scorer, r, rows, T)


def run_eval(model, tokenizer, test, cfg, args, d, logger, step):
    """pass@1 (multiplex thinking, the answer greedy) and #L, logged as eval_acc and eval_mean_L."""
    res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                          max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
    logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
    return res


def main(args):
    # ---- 0. setup: the start model and its prompts, the end of the span, the KL reference, the optimizer
    if args.temperature <= 0 or args.multiplex_k < 1:
        common.die(f"--temperature must be positive and --multiplex_k at least 1 (got {args.temperature}, "
                   f"{args.multiplex_k})")
    loss_type, scale_rewards = LOSS_TYPES[args.loss_type], SCALE_REWARDS[args.scale_rewards]
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    common.check_start(cfg, (None, "cot", "multiplex"), "multiplex_thinking.py")
    start_cfg = dict(cfg or {})
    train, test = common.load_train_eval(args, start_cfg)
    prompting = common.prompt_settings(args, start_cfg, train)
    cfg = {**start_cfg, **prompting, "mode": "multiplex", "multiplex_k": args.multiplex_k, "weighting": args.weighting,
           "stop_rule": args.stop_rule, "temperature": args.temperature, "top_p": args.top_p}
    saved_cfg = {**cfg, "method": "multiplex_thinking", "base_model": args.model_name_or_path}
    end_ids = think_end_ids(tokenizer)
    if not end_ids:
        common.die(f"{args.model_name_or_path}: the tokenizer has neither {END_THINK} nor a token that begins "
                   f"{common.ANSWER_MARKER!r}: the think span could never end")
    bf16, stop = common.use_bf16(args.bf16, d.device), common.stop_ids(model, tokenizer)
    ref = common.reference_model(model, args, d, bf16)   # the KL reference (with LoRA: the adapters off)
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
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
    longest_prompt = max(len(p) for p in prompts_for(tokenizer, cfg, [ex["question"] for ex in train[:1000]]))
    common.print_memory_plan(model, d, args, min(args.micro_batch_size, per_rank * G),
                             longest_prompt + args.max_completion_length, args.generation_batch_size or per_rank * G,
                             longest_prompt + args.max_completion_length, frozen=ref)
    if start_step:
        start = extra["start"]   # (kept in checkpoints)
    else:
        start = {k: v for k, v in run_eval(model, tokenizer, test, cfg, args, d, logger, 0).items() if k != "examples"}

    for step in tqdm(range(start_step + 1, args.max_steps + 1), desc="multiplex", disable=not d.main,
                     initial=start_step, total=args.max_steps):
        # ---- 1. rollout (multiplex thinking, then words) and reward
        times = {}
        batch = [train[i] for i in rng.sample(range(len(train)), per_rank)]
        model.eval()
        with common.timer(times, "rollout_s"):  # in pieces of --generation_batch_size rollouts, a fresh step each
            make_step = functools.partial(MultiplexStep, model, args.multiplex_k, end_ids, args.temperature,
                                          args.top_p, args.weighting, args.stop_rule)
            r = common.generate(model, prompts_for(tokenizer, cfg, [ex["question"] for ex in batch]), make_step,
                                args.max_completion_length, stop, tokenizer.pad_token_id, G, args.generation_batch_size,
                                store_latents=False)   # (the multiplex tokens are rebuilt from ids and weights)
        times["rollout_tok_per_s"] = r.lengths.sum().item() / times["rollout_s"]
        texts = [common.decode_completion(tokenizer, r, i) for i in range(len(r.tokens))]
        rewards = torch.tensor([float(common.is_correct(t, batch[i // G]["answer"])) for i, t in enumerate(texts)],
                               device=d.device)
        # ---- 2. advantages: R minus its group's mean, over the group's (or the batch's) std
        groups = rewards.view(-1, G)
        every = common.all_gather(rewards, d) if scale_rewards == "batch" else None   # every rank's rewards
        adv = group_advantages(rewards, G, scale_rewards, every)
        loss_mask = r.mask.float()   # every generated position is sampled, think steps and answer tokens
        N, micro = len(r.tokens), args.micro_batch_size
        with common.timer(times, "update_s"):
            # ---- 3. old and reference log-probs of every slot, a forward pass of the rollout policy
            with torch.no_grad():
                old_logp = torch.cat([policy_logprobs(model, ref, r, slice(i, i + micro), args.temperature)[0]
                                      for i in range(0, N, micro)])
                ref_logp = None if args.beta <= 0 else torch.cat(
                    [policy_logprobs(model, ref, r, slice(i, i + micro), args.temperature, True)[0]
                     for i in range(0, N, micro)])
            # ---- 4. update: per-slot PPO dual clip (+ k3 KL), summed per position, token mean
            model.train()
            stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "n": 0}
            rows_per_mini = args.mini_batch_size // d.world * G
            for m0 in range(0, N, rows_per_mini):
                mini = range(m0, min(N, m0 + rows_per_mini))
                n_tok = common.all_reduce(loss_mask[mini].sum().item(), d) or 1.0
                for i in range(mini.start, mini.stop, micro):
                    rows = slice(i, min(i + micro, mini.stop))
                    logp, slots = policy_logprobs(model, ref, r, rows, args.temperature)
                    per_tok, ratio = multiplex_loss(logp, old_logp[rows], adv[rows], slots, eps_low, eps_high,
                                                    args.dual_clip)
                    if ref_logp is not None:
                        d_ref = ref_logp[rows] - logp
                        kl = ((torch.exp(d_ref) - d_ref - 1) * slots).sum(-1)
                        per_tok = per_tok + args.beta * kl
                        stats["kl"] += ((kl * loss_mask[rows]).sum() / n_tok).item()
                    loss = aggregate_loss(per_tok, loss_mask[rows], loss_type, n_tok, len(mini),
                                          args.max_completion_length)
                    loss.backward()
                    stats["loss"] += loss.item()
                    outside = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float() * slots
                    stats["clip_frac"] += ((outside.sum(-1) / slots.sum(-1)) * loss_mask[rows]).sum().item() / n_tok
                stats["grad_norm"] += common.clip_grad_norm(model, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["n"] += 1
        # ---- 5. log, evaluate, save
        think = ((r.kinds == common.LATENT_STEP) & r.mask.bool()).float()
        ids = r.extras["ids"]
        mixed = (ids != ids[..., :1]).any(-1).float() * think   # think steps whose K samples differ
        row = {"reward": rewards.mean().item(), "frac_zero_std": (groups.std(1) == 0).float().mean().item(),
               "valid_frac": r.finished.float().mean().item(), "completion_length": r.mask.sum(1).float().mean().item(),
               "think_length": think.sum(1).mean().item(),
               "mixed_frac": (mixed.sum() / think.sum().clamp(min=1)).item(),
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
                  plot_keys=["reward", "eval_acc", "eval_mean_L", "think_length", "mixed_frac"])
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
