"""Latent RL with a value head on the latent states (seed 000's own method).

Paper: seed 000, "Reinforcement Learning for Latent-Space Thinking in LLMs" (arXiv 2512.11816),
"Latent RL"; code github enesozeren/latent-space-thinking-model. Spec: ../shared/ALGORITHMS.md,
section 3.

GRPO cannot reach the latent steps of a Coconut model (they are inputs, not sampled actions).
This method supervises them directly: a small value head V (MLP d-128-32-8-1, ReLU, dropout 0.1)
reads each continuous thought h_t and predicts whether the rollout's answer will be correct.
Phase 1 pretrains V on collected (h_t, correct) pairs with BCE (pos_weight 20). Phase 2, at each
step: a greedy rollout; the latent states recomputed with gradients (the Coconut chain);
v_t = sigmoid(V(h_t)); the policy loss -mean_t v_t updates the language model only; the value
loss BCE(V(h_t), correct) updates the head only (on detached states); two AdamW optimizers,
cosine to 0.1x. The seed reports oscillating losses and reward hacking (the model learns latents
that V scores high without getting more answers right): the log shows mean predicted value next
to real accuracy, and the head's ROC-AUC and F1, so that is visible, not hidden.

Deviations and choices:
1. Phase 1's pairs come from greedy rollouts of --pretrain_questions training questions (the
   seed stores pairs from its own rollouts); 10% of them are held out to report AUC/F1 before
   phase 2.
2. The per-rollout prediction (for AUC, F1 and the mean predicted value) is the mean of v_t over
   that rollout's thoughts.
3. Defaults are sized for the toy task (lr 1e-4 for the 1M-parameter model instead of 5e-6).
4. --freeze_value_head keeps V fixed in phase 2 (the seed's ablation).

Commands:
    python latent_value_rl.py                                   # the toy Coconut checkpoint
    python latent_value_rl.py --freeze_value_head --output_dir runs/lvrl_frozen
    python latent_value_rl.py --model runs/qwen-coconut --dataset openai/gsm8k --learning_rate 5e-6 \
        --value_learning_rate 5e-6 --train_batch_size 32 --max_completion_length 256
    torchrun --nproc_per_node 8 latent_value_rl.py --model runs/qwen-coconut ...
"""
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache, HfArgumentParser

import common
from eval import evaluate


@dataclass
class Args:
    model_name_or_path: str = field(default=common.TOY_COCONUT, metadata={"aliases": ["--model"], "help": "a Coconut checkpoint of this project"})
    dataset: str = "toy"
    eval_dataset: str = ""
    output_dir: str = "runs/latent_value_rl"
    seed: int = 0
    pretrain_questions: int = 1024
    pretrain_epochs: int = 20
    pos_weight: float = 20.0
    train_batch_size: int = field(default=32, metadata={"help": "prompts per step, all ranks together"})
    learning_rate: float = field(default=1e-4, metadata={"help": "language model (policy)"})
    value_learning_rate: float = field(default=1e-4, metadata={"help": "value head"})
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    freeze_value_head: bool = False
    max_completion_length: int = 48
    max_steps: int = 60
    max_train_samples: int = 0
    max_eval_samples: int = 200
    eval_every: int = 20
    distributed: str = "fsdp"
    track: bool = False


# ----------------------------------------------------------------------------------------------
# the value head and the metrics that show whether it can be trusted

class ValueHead(nn.Module):
    """d -> 128 -> 32 -> 8 -> 1 with ReLU and dropout 0.1; returns a logit per latent state."""

    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 32), nn.ReLU(),
                                 nn.Dropout(0.1), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, h):
        return self.net(h.float()).squeeze(-1)


def value_bce(logits, correct, pos_weight):
    """BCE with the positive (correct) class weighted by pos_weight: correct answers are rare."""
    return F.binary_cross_entropy_with_logits(logits, correct, pos_weight=torch.tensor(pos_weight, device=logits.device))


def roc_auc(scores, labels):
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None]).float().mean()
    ties = (pos[:, None] == neg[None]).float().mean()
    return (greater + 0.5 * ties).item()


def f1_score(pred, labels):
    tp = ((pred == 1) & (labels == 1)).sum().item()
    fp = ((pred == 1) & (labels == 0)).sum().item()
    fn = ((pred == 0) & (labels == 1)).sum().item()
    return 2 * tp / max(1, 2 * tp + fp + fn)


# ----------------------------------------------------------------------------------------------
# the latent states, recomputed with gradients through the Coconut chain

def latent_states(model, prompts, n_latents, pad_id, device):
    """The n continuous thoughts of each prompt (prompt ends with <|start-latent|>): h_1 is the
    last hidden state of the prompt, h_{t+1} the hidden state at the slot fed h_t. (B, n, d)."""
    ids, mask = common.pad_left(prompts, pad_id, device)
    cache = DynamicCache(config=common.unwrap(model).config)
    pos = common.positions(mask)
    _, hidden = common.lm_forward(model, ids, mask, pos, cache)
    states = [hidden[:, -1]]
    for t in range(1, n_latents):
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
        pos = pos[:, -1:] + 1
        _, hidden = common.lm_forward(model, ids[:, -1:], mask, pos, cache, latent_mask=torch.ones_like(pos, dtype=torch.bool),
                                      latent_vectors=states[-1][:, None])
        states.append(hidden[:, -1])
    return torch.stack(states, 1)


def backward_both(head, h, correct, pos_weight, train_head=True):
    """Phase 2's two losses, each sent only where it belongs:
    policy loss -mean_t sigmoid(V(h_t)) -> the language model (through h), never the head;
    value loss BCE(V(h_t), correct) on detached h -> the head, never the language model.
    Returns (v (B, n), policy loss, value loss) after calling backward on both."""
    head.requires_grad_(False)
    v = torch.sigmoid(head(h))
    policy_loss = -v.mean()
    policy_loss.backward()
    head.requires_grad_(train_head)
    value_loss = value_bce(head(h.detach()), correct[:, None].expand(-1, h.shape[1]), pos_weight)
    if train_head:
        value_loss.backward()
    return v.detach(), policy_loss.detach(), value_loss.detach()


def rollout_and_score(model, tokenizer, batch, cfg, max_new_tokens):
    """Greedy Coconut rollouts; returns (stored thoughts (B, n, d), correct (B,))."""
    prompts = common.reasoning_prompts(tokenizer, [ex["question"] for ex in batch], cfg)
    r = common.rollout(model, prompts, common.reasoning_step(cfg, tokenizer, 0.0), max_new_tokens,
                       tokenizer.eos_token_id, tokenizer.pad_token_id)
    correct = torch.tensor([float(common.is_correct(common.decode_completion(tokenizer, r, i), ex["answer"]))
                            for i, ex in enumerate(batch)], device=r.tokens.device)
    n = cfg["n_latents"]
    return r.latents[:, :n].float(), correct, prompts


def main(args):
    d = common.setup_distributed()
    common.seed_everything(args.seed, d.rank)
    if args.train_batch_size % d.world:
        common.die(f"--train_batch_size {args.train_batch_size} is not divisible by {d.world} processes")
    cfg = common.require_latent_config(args.model_name_or_path, "latent_value_rl.py (a Coconut model)")
    if cfg["mode"] != "coconut" or cfg.get("n_latents", 0) < 1:
        common.die(f"{args.model_name_or_path!r} reasons in mode {cfg['mode']!r}; latent_value_rl.py needs a Coconut model with latents")
    train = common.load_data(args.dataset, "train", args.max_train_samples or None, args.seed)
    test = common.load_data(args.eval_dataset or args.dataset, "test", args.max_eval_samples or None, args.seed)
    model, tokenizer, _ = common.load_model(args.model_name_or_path, d.device, torch.float32 if d.device.type == "cpu" else None)
    head = ValueHead(model.config.hidden_size).to(d.device)
    model = common.wrap_model(model, d, args.distributed)
    logger = common.Logger(args.output_dir, args, d, args.track)
    rng = random.Random(args.seed)
    n = cfg["n_latents"]

    def run_eval(step):
        res = evaluate(model, tokenizer, test, cfg,
                       max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
        logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
        return res

    # ---- phase 1: collect (thought, correct) pairs and pretrain the head
    model.eval()
    picks = rng.sample(range(len(train)), min(args.pretrain_questions, len(train)))[d.rank::d.world]
    states, labels = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(picks), 64), desc="collect", disable=not d.main):
            h, c, _ = rollout_and_score(model, tokenizer, [train[j] for j in picks[i:i + 64]], cfg, args.max_completion_length)
            states.append(h.reshape(-1, h.shape[-1]))
            labels.append(c.repeat_interleave(n))
    states, labels = torch.cat(states), torch.cat(labels)
    if d.world > 1:  # every rank trains its head copy on all pairs, so the heads stay identical
        everyone = [None] * d.world
        torch.distributed.all_gather_object(everyone, (states.cpu(), labels.cpu()))
        states, labels = torch.cat([s for s, _ in everyone]).to(d.device), torch.cat([l for _, l in everyone]).to(d.device)
    split = int(0.9 * len(states)) // n * n
    head_opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=args.weight_decay)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in tqdm(range(args.pretrain_epochs), desc="pretrain head", disable=not d.main):
        head.train()
        for idx in torch.randperm(split, generator=g).split(256):
            loss = value_bce(head(states[idx]), labels[idx], args.pos_weight)
            head_opt.zero_grad()
            loss.backward()
            head_opt.step()
    head.eval()
    with torch.no_grad():
        held = torch.sigmoid(head(states[split:])).view(-1, n).mean(1)
        held_y = labels[split:].view(-1, n)[:, 0]
    logger.log({"pretrain_pairs": len(states), "pretrain_acc": labels.mean().item(), "pretrain_loss": loss.item(),
                "heldout_auc": roc_auc(held, held_y), "heldout_f1": f1_score((held > 0.5).long(), held_y.long())}, 0)

    # ---- phase 2: the policy maximises the head's predictions, the head keeps learning
    lm_opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    head_opt = torch.optim.AdamW(head.parameters(), lr=args.value_learning_rate, weight_decay=args.weight_decay)
    cosine = lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / args.max_steps))  # noqa: E731
    lm_sched = torch.optim.lr_scheduler.LambdaLR(lm_opt, cosine)
    head_sched = torch.optim.lr_scheduler.LambdaLR(head_opt, cosine)
    start = run_eval(0)
    for step in tqdm(range(1, args.max_steps + 1), desc="latent rl", disable=not d.main):
        batch = [train[i] for i in rng.sample(range(len(train)), args.train_batch_size)[d.rank::d.world]]
        model.eval()
        _, correct, prompts = rollout_and_score(model, tokenizer, batch, cfg, args.max_completion_length)
        model.train()
        h = latent_states(model, prompts, n, tokenizer.pad_token_id, d.device)   # (B, n, d), with gradients
        head.train()
        v, policy_loss, value_loss = backward_both(head, h, correct, args.pos_weight, not args.freeze_value_head)
        if not args.freeze_value_head:
            if d.world > 1:  # the head is replicated: average its gradients by hand
                for p in head.parameters():
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= d.world
            head_opt.step()
            head_opt.zero_grad(set_to_none=True)
        grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
        lm_opt.step()
        lm_opt.zero_grad(set_to_none=True)
        lm_sched.step()
        head_sched.step()
        with torch.no_grad():
            pred = v.mean(1)
            row = {"acc": correct.mean().item(), "mean_value": pred.mean().item(), "policy_loss": policy_loss.item(),
                   "value_loss": value_loss.item(), "auc": roc_auc(pred, correct), "f1": f1_score((pred > 0.5).long(), correct.long()),
                   "thought_norm": h.detach().norm(dim=-1).mean().item(),
                   "grad_norm": grad_norm}
        logger.log({k: common.all_mean(x, d) for k, x in row.items()}, step)
        if step % args.eval_every == 0 and step != args.max_steps:
            run_eval(step)
    final = run_eval(args.max_steps)
    cfg = {**cfg, "method": "latent_value_rl", "base_model": args.model_name_or_path,
           "value_head": {"file": "value_head.safetensors", "dims": [common.unwrap(model).config.hidden_size, 128, 32, 8, 1]}}
    common.save_checkpoint(model, tokenizer, args.output_dir, cfg, extra_modules={"value_head": head}, d=d)
    if d.main:
        common.plot_metrics(args.output_dir, ["acc", "mean_value", "value_loss", "policy_loss", "auc", "eval_acc"])
        print(f"pass@1 {start['pass@1']:.3f} -> {final['pass@1']:.3f}   saved {args.output_dir}")
    return model, head


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
