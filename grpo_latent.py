"""GRPO on latent (Coconut) and explicit (CoT) models.

Paper: "Reinforcement Learning for Latent-Space Thinking in LLMs", arXiv 2512.11816 (its GRPO on
Coconut models); GRPO from Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300; options as in TRL
and verl.

Rollouts run the checkpoint's own reasoning: a Coconut model feeds its last hidden state back for
a fixed number of latent steps, then <|end-latent|> is forced and language tokens are sampled; a
CoT model samples tokens only, which makes this plain GRPO, the language-space baseline.

    R_i   = 1 if rollout i's final answer is verified correct, else 0
    A_i   = (R_i - mean(R_group)) / (std(R_group) + 1e-4)                  (G rollouts per prompt)
    rho_t = exp(log pi(y_t) - log pi_old(y_t))
    L     = agg_t [ max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps_high)) + beta * KL_t ]
    KL_t  = exp(ref_t - log pi(y_t)) - (ref_t - log pi(y_t)) - 1           (k3, to the frozen start)

The latent positions are inputs only: they are excluded from the loss, and the vectors the rollout
stored are fed back detached when log-probs are recomputed. So the policy gradient reaches the
latents only through the answer tokens' attention to them, which is the paper's explanation of
why GRPO does not help the latent model.

Usage:
    python grpo_latent.py                                                 # the toy Coconut checkpoint
    python grpo_latent.py --model checkpoints/toy-cot --output_dir runs/grpo_cot   # plain GRPO
    python grpo_latent.py --model runs/qwen-coconut --dataset openai/gsm8k --learning_rate 1e-6 --beta 0.04 \
        --train_batch_size 64 --max_completion_length 256 --bf16 true --gradient_checkpointing

Docs: docs/grpo_latent.md
"""
import functools
import random
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from tqdm import tqdm

import common
import toy

# Coconut's markers (as coconut_sft.py writes them): prompts of a Coconut model end with
# <|start-latent|>, its thoughts are recorded as <|latent|>, <|end-latent|> closes them.
START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"
LOSS_TYPES = {"dapo": "dapo", "grpo": "grpo", "dr_grpo": "dr_grpo",            # TRL's names
              "token-mean": "dapo", "seq-mean-token-mean": "grpo"}              # verl's names for the first two


@dataclass
class Args(common.TrainArgs):
    # the method
    n_latents: int = field(default=-1, metadata={"help": "latent steps per rollout; -1 = the checkpoint's own"})
    num_generations: int = field(default=8, metadata={"help": "G: rollouts per prompt"})
    num_iterations: int = field(default=1, metadata={"help": "passes over each batch (mu)"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range (lower; upper too unless --epsilon_high)"})
    epsilon_high: Optional[float] = field(default=None, metadata={"help": "upper clip range; default: --epsilon"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL coefficient to the frozen start model"})
    loss_type: Literal["dapo", "grpo", "dr_grpo", "token-mean", "seq-mean-token-mean"] = field(
        default="dapo", metadata={"help": "token aggregation (TRL's names; verl's token-mean = dapo, ...)"})
    scale_rewards: Literal["group", "batch", "none", "true", "false", "True", "False"] = field(
        default="group", metadata={"help": "divide advantages by the std of the group, the batch, or none"})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "leave completions without EOS out"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "rollout nucleus sampling"})
    # the training loop
    mini_batch_size: int = field(default=16, metadata={"help": "prompts per optimizer update"})
    micro_batch_size: int = field(default=64, metadata={"help": "rollouts per forward pass on one rank"})
    max_steps: int = field(default=60, metadata={"help": "training steps"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps"})
    log_completions: bool = field(default=False, metadata={"help": "write one completion per prompt and step"})
    generation_batch_size: int = field(default=0, metadata={
        "help": "rollouts generated at once on a rank, a multiple of G (0 = all at once)"})
    distributed: Literal["fsdp", "ddp"] = field(default="fsdp", metadata={"help": "under torchrun: FSDP2 or DDP"})
    # the flags every trainer shares (common.TrainArgs), with this method's defaults
    model_name_or_path: str = field(default=toy.COCONUT, metadata={
        "help": "a Coconut or CoT checkpoint of this project (or any causal LM: CoT)"})
    output_dir: str = "runs/grpo_latent"
    max_completion_length: int = 48
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (constant)"})  # (3)
    weight_decay: float = 0.0
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning); marker rows trainable"})


# ----------------------------------------------------------------------------------------------
# the algorithm: group advantages, the clipped surrogate, the KL, the aggregation

def group_advantages(rewards, G, scale_rewards="group", eps=1e-4, batch_rewards=None):
    """A_i = R_i - the mean of its group, divided by (std + eps) of the group's rewards ("group",
    GRPO), of the whole batch's rewards ("batch": `batch_rewards`, every rank's, default
    `rewards`), or not divided ("none", Dr. GRPO). All-equal groups give 0 (no signal)."""
    r = rewards.view(-1, G)
    adv = r - r.mean(1, keepdim=True)
    if scale_rewards == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif scale_rewards == "batch":  # (2) TRL's --scale_rewards: batch, and none (Dr. GRPO)
        adv = adv / ((rewards if batch_rewards is None else batch_rewards).std() + eps)
    elif scale_rewards != "none":
        common.die(f"--scale_rewards must be group, batch or none (or true/false; got {scale_rewards!r})")
    return adv.flatten()


def clipped_token_loss(logp, old_logp, adv, eps_low, eps_high):
    """PPO's pessimistic surrogate per token: max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high))."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    return torch.max(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high)), ratio


def clipped_mask(ratio, eps_low, eps_high):
    """1 where clip() changes the ratio, below 1 - eps_low or above 1 + eps_high, whatever A's sign."""
    return ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float()


def k3_kl(logp, ref_logp):
    """exp(ref - new) - (ref - new) - 1: non-negative, 0 where the policies agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, loss_mask, loss_type, n_tokens, n_seqs, max_completion_length=None):
    """Sum of this micro-batch's share of the mini-batch loss (TRL's loss types; verl's names too):
    dapo / token-mean: every token of the mini-batch weighs the same (n_tokens of them);
    grpo / seq-mean-token-mean: the mean over each sequence's tokens, then over the n_seqs sequences;
    dr_grpo: the token sum divided by n_seqs x max_completion_length (a constant: no length bias)."""
    kind = LOSS_TYPES.get(loss_type)
    if kind == "dapo":  # (1) the default: TRL's dapo, verl's token-mean
        return (per_token * loss_mask).sum() / n_tokens
    if kind == "grpo":
        return ((per_token * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)).sum() / n_seqs
    if kind == "dr_grpo":  # max_completion_length counts the latent positions too
        return (per_token * loss_mask).sum() / (n_seqs * max_completion_length)
    common.die(f"unknown --loss_type {loss_type!r} ({' | '.join(LOSS_TYPES)})")


# ----------------------------------------------------------------------------------------------
# the rollouts: the checkpoint's own reasoning (the same lines as coconut_sft.py's, which defines it)

def coconut_step(n_latents, latent_id, end_id, temperature=0.0, top_p=1.0):
    """A Coconut model's rollout step (its prompt ends with <|start-latent|>): for the first
    `n_latents` steps the last hidden state is fed back as the next input (recorded as <|latent|>,
    an input, not an action: no log-prob of it enters the loss), then <|end-latent|> is forced,
    then language tokens are sampled (greedy at temperature 0)."""
    def step(t, logits, hidden, done):
        def full(value, dtype=torch.long):
            return torch.full(done.shape, value, dtype=dtype, device=done.device)
        if t < n_latents:
            return full(latent_id), hidden, full(common.LATENT_STEP, torch.int8)
        if t == n_latents:
            return full(end_id), None, full(common.FORCED, torch.int8)
        return common.sample_token(logits, temperature, 0, top_p), None, full(common.TOKEN, torch.int8)
    return step


def reasoning(model, tokenizer, cfg, temperature=0.0, top_p=1.0):
    """(prompts(questions) -> token-id lists, rollout step) for a "cot" checkpoint (plain sampling:
    plain GRPO) or a "coconut" one (prompts end with <|start-latent|>, cfg["n_latents"] thoughts)."""
    chat, system = cfg.get("prompt_format") == "chat", cfg.get("system_prompt", "")
    if cfg["mode"] == "cot":
        start, step = None, common.sampling_step(temperature, top_p=top_p)
    elif cfg["mode"] == "coconut":
        start, end, latent = common.require_tokens(tokenizer, [START_LATENT, END_LATENT, LATENT], "a Coconut model")
        step = coconut_step(cfg["n_latents"], latent, end, temperature, top_p)
    else:
        common.die(f"grpo_latent.py trains cot and coconut checkpoints, not {cfg['mode']!r}")

    def prompts(questions):
        ids = [common.encode_prompt(tokenizer, q, chat, system) for q in questions]
        return ids if start is None else [p + [start] for p in ids]
    return prompts, step


def ref_logprobs(model, ref, r, rows, temperature):
    """The frozen start model's log-probs of rollout rows: a copy, or with LoRA the policy with its adapters off."""
    scorer, context = common.scoring_reference(model, ref)
    with context:
        return common.completion_logprobs(scorer, r, rows, temperature).token


def run_eval(model, tokenizer, test, cfg, args, d, logger, step):
    """Greedy pass@1 and #L on the evaluation questions, logged at `step`."""
    res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                          max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
    logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
    return {"pass@1": res["pass@1"], "mean_L": res["mean_L"]}


def main(args):
    # ---- 0. setup: the start checkpoint and its reasoning, the reference, optimizer, resume
    scale_rewards = {"true": "group", "false": "none"}.get(args.scale_rewards.lower(), args.scale_rewards.lower())
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    common.check_start(cfg, (None, "cot", "coconut"), "grpo_latent.py")
    cfg = dict(cfg or {"mode": "cot"})
    train, test = common.load_train_eval(args, cfg)
    cfg.update(common.prompt_settings(args, cfg, train))
    if args.n_latents >= 0:  # (4) another number of latent steps than the checkpoint's
        cfg.update(mode="coconut" if args.n_latents > 0 else cfg["mode"], n_latents=args.n_latents)
    prompts_of, step_fn = reasoning(model, tokenizer, cfg, args.temperature, args.top_p)  # one line if tokens lack
    bf16, stop = common.use_bf16(args.bf16, d.device), common.stop_ids(model, tokenizer)
    # --lora_r: adapters on the decoder; a Coconut model's marker rows stay trainable as in full fine-tuning
    markers = tokenizer.convert_tokens_to_ids([START_LATENT, END_LATENT, LATENT]) if cfg["mode"] == "coconut" else []
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                              trainable_token_ids=markers)
    ref = common.reference_model(model, args, d, bf16)   # the KL reference (with LoRA: the adapters off)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    model = common.wrap_model(model, d, args.distributed, bf16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    rng = random.Random(args.seed)
    state = common.TrainState(args, d, {"model": model}, [optimizer], rngs=[rng])
    done, extra = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=done)
    G, eps_high = args.num_generations, args.epsilon if args.epsilon_high is None else args.epsilon_high
    cfg.update(method="grpo_latent", base_model=args.model_name_or_path)
    evaluate = functools.partial(run_eval, model, tokenizer, test, cfg, args, d, logger)
    rows_per_rank = args.train_batch_size // d.world * G
    longest = max(len(p) for p in prompts_of([ex["question"] for ex in train[:256]])) + args.max_completion_length
    common.print_memory_plan(model, d, args, min(args.micro_batch_size, rows_per_rank), longest,
                             min(args.generation_batch_size or rows_per_rank, rows_per_rank), longest, frozen=ref)
    start = extra["start"] if done else evaluate(0)  # a resumed run has its start evaluation in the checkpoint

    for step in tqdm(range(done + 1, args.max_steps + 1), initial=done, total=args.max_steps, desc="grpo",
                     disable=not d.main):
        # ---- 1. rollout and reward: G completions per prompt from the checkpoint's own reasoning
        times = {}
        picks = rng.sample(range(len(train)), args.train_batch_size)[d.rank::d.world]
        batch = [train[i] for i in picks]
        model.eval()
        with common.timer(times, "rollout_s"):
            r = common.generate(model, prompts_of([ex["question"] for ex in batch]), lambda: step_fn,
                                args.max_completion_length, stop, tokenizer.pad_token_id, num_generations=G,
                                batch_size=args.generation_batch_size)
        times["rollout_tok_per_s"] = r.lengths.sum().item() / max(1e-9, times["rollout_s"])  # positions, latents too
        texts = [common.decode_completion(tokenizer, r, i) for i in range(len(r.tokens))]
        rewards = torch.tensor([float(common.is_correct(t, batch[i // G]["answer"])) for i, t in enumerate(texts)],
                               device=d.device)

        # ---- 2. advantages, and the positions the loss sees
        adv = group_advantages(rewards, G, scale_rewards,
                               batch_rewards=common.all_gather(rewards, d) if scale_rewards == "batch" else None)
        loss_mask = ((r.kinds == common.TOKEN) & r.mask.bool()).float()  # latents and forced markers: inputs only
        if args.mask_truncated_completions:
            loss_mask = loss_mask * r.finished[:, None].float()

        with common.timer(times, "update_s"):
            # ---- 3. old and reference log-probs (per position, never whole logits)
            N, micro = len(r.tokens), args.micro_batch_size
            chunks = [slice(i, i + micro) for i in range(0, N, micro)]
            old_logp = ref_logp = None
            off_policy = args.num_iterations > 1 or args.mini_batch_size < args.train_batch_size
            with torch.no_grad():
                if off_policy:
                    parts = [common.completion_logprobs(model, r, c, args.temperature).token for c in chunks]
                    old_logp = torch.cat(parts)
                if args.beta > 0:
                    ref_logp = torch.cat([ref_logprobs(model, ref, r, c, args.temperature) for c in chunks])

            # ---- 4. update: num_iterations passes, mini-batches of whole groups, micro-batches of rows
            model.train()
            stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "n": 0}
            rows_per_mini = args.mini_batch_size // d.world * G
            for _ in range(args.num_iterations):
                for m0 in range(0, N, rows_per_mini):
                    mini = range(m0, min(N, m0 + rows_per_mini))
                    n_tok = common.all_reduce(loss_mask[mini].sum().item(), d) or 1.0
                    for i in range(mini.start, mini.stop, micro):
                        rows = slice(i, min(i + micro, mini.stop))
                        logp = common.completion_logprobs(model, r, rows, args.temperature).token
                        old = old_logp[rows] if old_logp is not None else logp.detach()
                        per_tok, ratio = clipped_token_loss(logp, old, adv[rows], args.epsilon, eps_high)
                        if ref_logp is not None:
                            kl = k3_kl(logp, ref_logp[rows])
                            per_tok = per_tok + args.beta * kl
                            stats["kl"] += ((kl * loss_mask[rows]).sum() / n_tok).item()
                        loss = aggregate(per_tok, loss_mask[rows], args.loss_type, n_tok, len(mini),
                                         args.max_completion_length)
                        loss.backward()
                        stats["loss"] += loss.item()
                        clipped = clipped_mask(ratio, args.epsilon, eps_high)
                        stats["clip_frac"] += ((clipped * loss_mask[rows]).sum() / n_tok).item()
                    grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stats["grad_norm"] += grad_norm
                    stats["n"] += 1

        # ---- 5. log, evaluate, save
        groups = rewards.view(-1, G)
        n_latent = ((r.kinds == common.LATENT_STEP) & r.mask.bool()).sum(1).float()
        row = {"reward": rewards.mean().item(), "reward_std": groups.std(1).mean().item(),
               "frac_zero_std": (groups.std(1) == 0).float().mean().item(),
               "completion_length": (loss_mask.sum(1)).mean().item(), "n_latents": n_latent.mean().item(),
               "truncated": 1 - r.finished.float().mean().item(), "loss": stats["loss"] / stats["n"],
               "clip_frac": stats["clip_frac"] / stats["n"], "grad_norm": stats["grad_norm"] / stats["n"], **times}
        if ref_logp is not None:
            row["kl"] = stats["kl"] / stats["n"]
        logger.log({k: common.all_reduce(v, d) if k not in times else v for k, v in row.items()}, step)
        if args.log_completions:  # the first rollout of each group
            common.write_completions(args.output_dir, step, [
                {"question": batch[i // G]["question"], "completion": texts[i], "reward": rewards[i].item()}
                for i in range(0, len(texts), G)], d)
        if step % args.eval_every == 0 and step != args.max_steps:
            evaluate(step)
        state.maybe_save(step, tokenizer, cfg, extra={"start": start})
    final = evaluate(args.max_steps)
    common.finish(model, tokenizer, cfg, args, d, final, start,
                  plot_keys=["reward", "eval_acc", "completion_length", "kl", "clip_frac"])
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
