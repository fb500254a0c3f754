"""GRPO on latent (Coconut) and explicit (CoT) models.

Paper: seed 000, "Reinforcement Learning for Latent-Space Thinking in LLMs" (arXiv 2512.11816),
section on GRPO; GRPO itself from Shao et al. 2024 (DeepSeekMath), options as in TRL and verl.
Spec: ../shared/ALGORITHMS.md, "Shared pieces" and section 2.

Rollouts run the checkpoint's own reasoning: for a Coconut model, a fixed number of latent steps
(the last hidden state fed back), the forced <|end-latent|>, then sampled language tokens; for a
CoT (stage 0) model, sampled tokens only, which makes this plain GRPO, the language-space
baseline. Reward: 1 for a verified correct final answer, else 0. Group-normalised advantages, a
PPO-clipped token loss, an optional k3 KL to the frozen start model. The latent positions are
inputs only: they are excluded from the loss, and their vectors stored by the rollout are fed
back detached when log-probs are recomputed. So the policy gradient reaches the latents only
through the answer tokens' attention to them, which is seed 000's explanation of why GRPO does
not help the latent model.

Deviations and choices:
1. `--loss_type token-mean` (DAPO/verl, the default) or `seq-mean-token-mean` (the original GRPO).
2. `--scale_rewards false` drops the division by the group std (Dr. GRPO).
3. Defaults are sized for the toy task (learning rate 1e-4 on a 1M-parameter model, 16 prompts x
   8 rollouts, 60 steps); the real-model command below uses the usual 1e-6.
4. `--n_latents` overrides the number of latent steps of a Coconut checkpoint (seed 000 varied it
   from 2 to 64).

Commands:
    python grpo_latent.py                                        # toy Coconut checkpoint
    python grpo_latent.py --model checkpoints/toy-cot --output_dir runs/grpo_cot   # plain GRPO
    python grpo_latent.py --model runs/qwen-coconut --dataset openai/gsm8k --learning_rate 1e-6 \
        --train_batch_size 64 --mini_batch_size 16 --micro_batch_size 16 --max_completion_length 256 --beta 0.04
    torchrun --nproc_per_node 8 grpo_latent.py --model runs/qwen-coconut --dataset openai/gsm8k ...
"""
import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm
import common
from eval import evaluate


@dataclass
class Args:
    model_name_or_path: str = field(default=common.TOY_COCONUT, metadata={"aliases": ["--model"], "help": "a checkpoint of this project (or any causal LM: language CoT)"})
    dataset: str = field(default="", metadata={"help": "training data: a hub dataset, a local .jsonl/.parquet, or toy (the default only for the toy model)"})
    eval_dataset: str = field(default="", metadata={"help": "evaluation data; default: the test split of --dataset (a single file: a held-out tenth of it)"})
    output_dir: str = field(default="runs/grpo_latent", metadata={"help": "where the checkpoint, metrics.jsonl and plots go"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    chat_template: bool = field(default=False, metadata={"help": "format prompts with the tokenizer's chat template (kept from the checkpoint if it was trained so)"})
    system_prompt: str = field(default="auto", metadata={"help": "system turn with --chat_template; auto = the checkpoint's, else the answer format the reward checks"})
    n_latents: int = field(default=-1, metadata={"help": "latent steps per rollout; -1 = the checkpoint's own"})
    num_generations: int = field(default=8, metadata={"help": "G: rollouts per prompt"})
    train_batch_size: int = field(default=16, metadata={"help": "prompts per step, all ranks together"})
    mini_batch_size: int = field(default=16, metadata={"help": "prompts per optimizer update"})
    micro_batch_size: int = field(default=64, metadata={"help": "rollouts per forward pass on one rank"})
    num_iterations: int = field(default=1, metadata={"help": "passes over each batch (mu)"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range (lower, and upper unless --epsilon_high)"})
    epsilon_high: float = field(default=-1.0, metadata={"help": "upper clip; -1 = epsilon"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL coefficient to the frozen start model"})
    loss_type: str = field(default="token-mean", metadata={"help": "token-mean | seq-mean-token-mean"})
    scale_rewards: bool = field(default=True, metadata={"help": "divide advantages by the group std (false: Dr. GRPO)"})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "leave completions without EOS out of the loss"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "rollout nucleus sampling"})
    max_completion_length: int = field(default=48, metadata={"help": "generated positions per rollout, latents included"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (constant)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    max_steps: int = field(default=60, metadata={"help": "training steps"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N training rows (0 = all)"})
    max_eval_samples: int = field(default=200, metadata={"help": "evaluation questions (0 = all)"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps"})
    log_completions: bool = field(default=False, metadata={"help": "write one completion per prompt to completions.jsonl"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "bf16 compute on fp32 master weights; default: on for a bf16-capable GPU, off on CPU"})
    save_dtype: str = field(default="auto", metadata={"help": "dtype of the saved weights: auto (the start model's published dtype) | float32 | bfloat16"})
    distributed: str = field(default="fsdp", metadata={"help": "under torchrun: fsdp (FSDP2) | ddp"})
    track: bool = field(default=False, metadata={"help": "log to Weights & Biases"})


# ----------------------------------------------------------------------------------------------
# the algorithm: group advantages, the clipped surrogate, the KL, the aggregation

def group_advantages(rewards, G, scale_rewards=True, eps=1e-4):
    """A_i = (R_i - mean_group) / (std_group + eps); all-equal groups give 0 (no signal)."""
    r = rewards.view(-1, G)
    adv = r - r.mean(1, keepdim=True)
    if scale_rewards:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.flatten()


def clipped_token_loss(logp, old_logp, adv, eps_low, eps_high):
    """PPO's pessimistic surrogate per token: max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high))."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    return torch.max(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high)), ratio


def k3_kl(logp, ref_logp):
    """exp(ref - new) - (ref - new) - 1: non-negative, 0 where the policies agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, loss_type, n_tokens, n_seqs):
    """Sum of this micro-batch's share of the mini-batch loss. token-mean: every token of the
    mini-batch weighs the same (n_tokens of them); seq-mean-token-mean: mean per sequence, then
    mean over the n_seqs sequences."""
    if loss_type == "token-mean":
        return (per_token * mask).sum() / n_tokens
    if loss_type == "seq-mean-token-mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    common.die(f"unknown --loss_type {loss_type!r} (token-mean | seq-mean-token-mean)")


def main(args):
    if args.num_generations < 2:
        common.die(f"--num_generations must be at least 2: GRPO compares rollouts within a group (got {args.num_generations})")
    if args.loss_type not in ("token-mean", "seq-mean-token-mean"):
        common.die(f"unknown --loss_type {args.loss_type!r} (token-mean | seq-mean-token-mean)")
    d = common.setup_distributed()
    common.seed_everything(args.seed, d.rank)
    if args.train_batch_size % args.mini_batch_size or args.mini_batch_size % d.world:
        common.die(f"--train_batch_size {args.train_batch_size} must be a multiple of --mini_batch_size "
                   f"{args.mini_batch_size}, itself a multiple of the {d.world} processes")
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    common.check_start(cfg, (None, "cot", "coconut"), "grpo_latent.py")
    cfg = dict(cfg or {"mode": "cot"})
    train, test = common.load_train_eval(args, cfg)
    cfg.update(common.prompt_settings(args, cfg, train))
    if args.n_latents >= 0:
        cfg.update(mode="coconut" if args.n_latents > 0 else cfg["mode"], n_latents=args.n_latents)
    common.reasoning_prompts(tokenizer, ["check"], cfg)  # one-line error if a latent mode lacks its tokens
    bf16, stop = common.use_bf16(args.bf16, d.device), common.stop_ids(model, tokenizer)
    ref = None
    if args.beta > 0:  # frozen: kept in bf16 when computing in bf16
        ref = copy.deepcopy(model).to(torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
        if args.distributed == "fsdp":  # sharded like the policy; under DDP a frozen copy needs no wrapper
            ref = common.wrap_model(ref, d, "fsdp")
    model = common.wrap_model(model, d, args.distributed, bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    logger = common.Logger(args.output_dir, args, d, args.track)
    step_fn = common.reasoning_step(cfg, tokenizer, args.temperature, top_p=args.top_p, model=model)
    G, eps_high = args.num_generations, args.epsilon if args.epsilon_high < 0 else args.epsilon_high
    prompts_per_rank = args.train_batch_size // d.world
    rng = random.Random(args.seed)
    completions_file = Path(args.output_dir) / "completions.jsonl"

    def run_eval(step):
        res = evaluate(model, tokenizer, test, cfg,
                       max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
        logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
        return res

    start = run_eval(0)
    for step in tqdm(range(1, args.max_steps + 1), desc="grpo", disable=not d.main):
        times = {}
        # ---- rollout: G completions per prompt from the checkpoint's own reasoning mode
        picks = rng.sample(range(len(train)), args.train_batch_size)[d.rank::d.world]
        batch = [train[i] for i in picks]
        model.eval()
        with common.timer(times, "rollout_s"):
            prompts = common.reasoning_prompts(tokenizer, [ex["question"] for ex in batch], cfg)
            r = common.rollout(model, prompts, step_fn, args.max_completion_length, stop, tokenizer.pad_token_id,
                               num_generations=G)
        texts = [common.decode_completion(tokenizer, r, i) for i in range(len(r.tokens))]
        rewards = torch.tensor([float(common.is_correct(t, batch[i // G]["answer"])) for i, t in enumerate(texts)], device=d.device)
        adv = group_advantages(rewards, G, args.scale_rewards)
        loss_mask = ((r.kinds == common.TOKEN) & r.mask.bool()).float()  # latents and forced markers: inputs only
        if args.mask_truncated_completions:
            loss_mask = loss_mask * r.finished[:, None].float()
        # ---- the log-probs the ratio and the KL start from
        with common.timer(times, "update_s"):
            N, micro = len(r.tokens), args.micro_batch_size
            old_logp = ref_logp = None
            off_policy = args.num_iterations > 1 or args.mini_batch_size < args.train_batch_size
            with torch.no_grad():
                if off_policy:
                    old_logp = torch.cat([common.gather_logprobs(common.completion_logits(model, r, slice(i, i + micro), args.temperature),
                                                                 r.tokens[i:i + micro]) for i in range(0, N, micro)])
                if ref is not None:
                    ref_logp = torch.cat([common.gather_logprobs(common.completion_logits(ref, r, slice(i, i + micro), args.temperature),
                                                                 r.tokens[i:i + micro]) for i in range(0, N, micro)])
            # ---- the update: num_iterations passes, mini-batches of whole groups, micro-batches of rows
            model.train()
            stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "n": 0}
            rows_per_mini = args.mini_batch_size // d.world * G
            for _ in range(args.num_iterations):
                for m0 in range(0, N, rows_per_mini):
                    mini = range(m0, min(N, m0 + rows_per_mini))
                    n_tok = common.all_mean(loss_mask[mini].sum().item(), d) or 1.0
                    for i in range(mini.start, mini.stop, micro):
                        rows = slice(i, min(i + micro, mini.stop))
                        logp = common.gather_logprobs(common.completion_logits(model, r, rows, args.temperature), r.tokens[rows])
                        old = old_logp[rows] if old_logp is not None else logp.detach()
                        per_tok, ratio = clipped_token_loss(logp, old, adv[rows], args.epsilon, eps_high)
                        if ref_logp is not None:
                            kl = k3_kl(logp, ref_logp[rows])
                            per_tok = per_tok + args.beta * kl
                            stats["kl"] += ((kl * loss_mask[rows]).sum() / n_tok).item()
                        loss = aggregate(per_tok, loss_mask[rows], args.loss_type, n_tok, len(mini))
                        loss.backward()
                        stats["loss"] += loss.item()
                        clipped = ((ratio - 1).abs() > args.epsilon).float()
                        stats["clip_frac"] += ((clipped * loss_mask[rows]).sum() / n_tok).item()
                    grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stats["grad_norm"] += grad_norm
                    stats["n"] += 1
        # ---- logging
        groups = rewards.view(-1, G)
        n_latent = ((r.kinds == common.LATENT_STEP) & r.mask.bool()).sum(1).float()
        row = {"reward": rewards.mean().item(), "reward_std": groups.std(1).mean().item(),
               "frac_zero_std": (groups.std(1) == 0).float().mean().item(),
               "completion_length": (loss_mask.sum(1)).mean().item(), "n_latents": n_latent.mean().item(),
               "truncated": 1 - r.finished.float().mean().item(), "loss": stats["loss"] / stats["n"],
               "clip_frac": stats["clip_frac"] / stats["n"], "grad_norm": stats["grad_norm"] / stats["n"], **times}
        if ref is not None:
            row["kl"] = stats["kl"] / stats["n"]
        logger.log({k: common.all_mean(v, d) if k not in times else v for k, v in row.items()}, step)
        if args.log_completions and d.main:
            with completions_file.open("a") as f:
                for i in range(0, len(texts), G):
                    f.write(json.dumps({"step": step, "question": batch[i // G]["question"], "completion": texts[i],
                                        "reward": rewards[i].item()}) + "\n")
            tqdm.write(f"  e.g. {texts[0]!r} -> reward {rewards[0].item():.0f}")
        if step % args.eval_every == 0 and step != args.max_steps:
            run_eval(step)
    final = run_eval(args.max_steps)
    cfg.update(method="grpo_latent", base_model=args.model_name_or_path)
    common.save_checkpoint(model, tokenizer, args.output_dir, cfg, d=d, save_dtype=args.save_dtype)
    if d.main:
        common.plot_metrics(args.output_dir, ["reward", "eval_acc", "completion_length", "kl", "clip_frac"])
        print(f"pass@1 {start['pass@1']:.3f} -> {final['pass@1']:.3f}   #L {start['mean_L']:.1f} -> {final['mean_L']:.1f}"
              f"   saved {args.output_dir}")
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
