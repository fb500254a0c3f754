"""Latent RL with a value head on the continuous thoughts of a Coconut model.

Paper: "Reinforcement Learning for Latent-Space Thinking in LLMs", arXiv 2512.11816 (its "Latent RL";
code: github enesozeren/latent-space-thinking-model).

GRPO cannot reach the latent steps of a Coconut model: they are inputs, not sampled actions. This
method supervises them directly. A small value head V (MLP d-128-32-8-1, ReLU, dropout 0.1) reads
each continuous thought h_t and predicts whether the rollout's answer will be correct.

    phase 1:  pretrain V on (h_t, correct) pairs of greedy rollouts:  BCE(V(h_t), correct), pos_weight 20
    phase 2, each step: a greedy rollout, its thoughts h_1..h_n recomputed with gradients, then
              v_t          = sigmoid(V(h_t))
              policy loss  = -mean_t v_t                  -> the language model only
              value loss   = BCE(V(sg(h_t)), correct)     -> the head only
    two AdamW optimizers, each with a cosine to 0.1x of its learning rate.

The paper reports oscillating losses and reward hacking (the model learns thoughts that V scores
high without answering better): the log puts the mean predicted value next to the real accuracy,
with the head's ROC-AUC and F1, so that is visible, not hidden.

Usage:
    python latent_value_rl.py                                   # the toy Coconut checkpoint
    python latent_value_rl.py --freeze_value_head --output_dir runs/lvrl_frozen
    python latent_value_rl.py --model runs/qwen-coconut --dataset openai/gsm8k --learning_rate 5e-6 \
        --value_learning_rate 5e-6 --train_batch_size 32 --max_completion_length 256 --bf16 true

Docs: docs/latent_value_rl.md
"""
import functools
import random
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache, get_cosine_with_min_lr_schedule_with_warmup

import common
import toy

# Coconut's markers (as coconut_sft.py writes them): prompts of a Coconut model end with
# <|start-latent|>, its thoughts are recorded as <|latent|>, <|end-latent|> closes them.
START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"


@dataclass
class Args(common.TrainArgs):
    # the method
    pretrain_questions: int = field(default=1024, metadata={"help": "phase 1: questions whose rollouts train V"})
    pretrain_epochs: int = field(default=20, metadata={"help": "phase 1: epochs of head pretraining"})
    pos_weight: float = field(default=20.0, metadata={"help": "BCE weight of the correct (rare) class"})
    value_learning_rate: float = field(default=1e-4, metadata={"help": "phase 2: the head's AdamW learning rate"})
    freeze_value_head: bool = field(default=False, metadata={"help": "keep the head fixed in phase 2 (ablation)"})
    # the training loop
    max_steps: int = field(default=60, metadata={"help": "phase 2 training steps"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps"})
    generation_batch_size: int = field(default=0, metadata={
        "help": "rollouts generated at once on a rank (0 = all at once; phase 1: 64)"})
    distributed: Literal["fsdp", "ddp"] = field(default="fsdp", metadata={"help": "under torchrun: FSDP2 or DDP"})
    # the flags every trainer shares (common.TrainArgs), with this method's defaults
    model_name_or_path: str = field(default=toy.COCONUT, metadata={
        "help": "a Coconut checkpoint of this project (made by coconut_sft.py)"})
    output_dir: str = field(default="runs/latent_value_rl", metadata={"help": "checkpoint, head, metrics, plots"})
    train_batch_size: int = 32
    max_completion_length: int = 48
    learning_rate: float = field(default=1e-4, metadata={"help": "the language model's AdamW learning rate"})  # (3)
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (both optimizers)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping of the language model"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning); marker rows trainable"})


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
    weight = torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, correct, pos_weight=weight)


def roc_auc(scores, labels):
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None]).float().mean()
    ties = (pos[:, None] == neg[None]).float().mean()
    return (greater + 0.5 * ties).item()


def f1_score(pred, labels):
    """F1 of the positive (correct) class."""
    tp = ((pred == 1) & (labels == 1)).sum().item()
    fp = ((pred == 1) & (labels == 0)).sum().item()
    fn = ((pred == 0) & (labels == 1)).sum().item()
    return 2 * tp / max(1, 2 * tp + fp + fn)


def head_scores(pred, correct, prefix=""):
    """{auc, f1} of per-rollout predictions against correctness, or {} when the rollouts are all
    correct or all wrong: ROC-AUC is then undefined (a nan in the log says nothing) and F1 is 0
    or 1 whatever the head does."""
    n_pos = int(correct.sum())
    if n_pos == 0 or n_pos == len(correct):  # (5) only over rollouts of both kinds
        return {}
    return {f"{prefix}auc": roc_auc(pred, correct), f"{prefix}f1": f1_score((pred > 0.5).long(), correct.long())}


# ----------------------------------------------------------------------------------------------
# the latent states, recomputed with gradients through the Coconut chain, and the two losses

def latent_states(model, prompts, n_latents, pad_id, device):
    """The n continuous thoughts of each prompt (prompt ends with <|start-latent|>): h_1 is the
    last hidden state of the prompt, h_{t+1} the hidden state at the slot fed h_t. (B, n, d).

    Also returns `anchor`: 0 x the logits of every pass, to add to the loss. It changes no
    gradient's value, but the backward pass then goes through the model's output, where FSDP2
    hangs its backward hooks (a loss reached only through the hidden state, which lm_forward
    takes from inside the model, crashed FSDP2 runs), and every parameter gets a gradient (DDP
    needs that of an untied LM head). One row of logits per pass, not the prompt's (B x prompt x
    vocabulary: gigabytes at Qwen's 152k vocabulary)."""
    ids, mask = common.pad_left(prompts, pad_id, device)
    cache = DynamicCache(config=common.unwrap(model).config)
    pos = common.positions(mask)
    logits, hidden = common.lm_forward(model, ids, mask, pos, cache, logits_to_keep=1)
    states, anchor = [hidden[:, -1]], 0 * logits.float().sum()
    for t in range(1, n_latents):
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
        pos = pos[:, -1:] + 1
        logits, hidden = common.lm_forward(model, ids[:, -1:], mask, pos, cache,
                                           latent_mask=torch.ones_like(pos, dtype=torch.bool),
                                           latent_vectors=states[-1][:, None], logits_to_keep=1)
        states.append(hidden[:, -1])
        anchor = anchor + 0 * logits.float().sum()
    return torch.stack(states, 1), anchor


def backward_both(head, h, correct, pos_weight, train_head=True, anchor=0.0):
    """Phase 2's two losses, each sent only where it belongs:
    policy loss -mean_t sigmoid(V(h_t)) -> the language model (through h), never the head;
    value loss BCE(V(h_t), correct) on detached h -> the head, never the language model.
    (`anchor`: see latent_states.) A frozen head (train_head False) only reports its value loss.
    Returns (v (B, n), policy loss, value loss) after calling backward on both. The head is left
    with requires_grad on, as it came, frozen or not (so a checkpoint's training state holds it)."""
    head.requires_grad_(False)
    v = torch.sigmoid(head(h))
    policy_loss = -v.mean()
    (policy_loss + anchor).backward()
    head.requires_grad_(True)
    with torch.set_grad_enabled(train_head):
        value_loss = value_bce(head(h.detach()), correct[:, None].expand(-1, h.shape[1]), pos_weight)
    if train_head:
        value_loss.backward()
    return v.detach(), policy_loss.detach(), value_loss.detach()


# ----------------------------------------------------------------------------------------------
# the rollouts: the Coconut model's own reasoning (the same lines as coconut_sft.py's, which defines it)

def coconut_step(n_latents, latent_id, end_id, temperature=0.0, top_p=1.0):
    """A Coconut model's rollout step (its prompt ends with <|start-latent|>): for the first
    `n_latents` steps the last hidden state is fed back as the next input (recorded as <|latent|>:
    these are the thoughts the head reads), then <|end-latent|> is forced, then language tokens
    are sampled (greedy at temperature 0)."""
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
    """(prompts(questions) -> token-id lists ending with <|start-latent|>, rollout step) of a
    Coconut checkpoint with cfg["n_latents"] thoughts, prompted as latent_config.json says."""
    if cfg["mode"] != "coconut":
        common.die(f"latent_value_rl.py trains coconut checkpoints, not {cfg['mode']!r}")
    chat, system = cfg.get("prompt_format") == "chat", cfg.get("system_prompt", "")
    start, end, latent = common.require_tokens(tokenizer, [START_LATENT, END_LATENT, LATENT], "a Coconut model")

    def prompts(questions):
        return [common.encode_prompt(tokenizer, q, chat, system) + [start] for q in questions]
    return prompts, coconut_step(cfg["n_latents"], latent, end, temperature, top_p)


def rollout_and_score(model, tokenizer, batch, cfg, max_new_tokens, stop, batch_size=0):
    """Greedy Coconut rollouts that end at any id of `stop` (common.stop_ids), `batch_size` rows at
    a time (0 = all); returns (stored thoughts (B, n, d), correct (B,), prompts, the rollout)."""
    prompts_of, step = reasoning(model, tokenizer, cfg)
    prompts = prompts_of([ex["question"] for ex in batch])
    r = common.generate(model, prompts, lambda: step, max_new_tokens, stop, tokenizer.pad_token_id,
                        batch_size=batch_size)
    correct = torch.tensor([float(common.is_correct(common.decode_completion(tokenizer, r, i), ex["answer"]))
                            for i, ex in enumerate(batch)], device=r.tokens.device)
    n = cfg["n_latents"]
    return r.latents[:, :n].float(), correct, prompts, r


def pretrain_head(model, tokenizer, head, train, cfg, args, d, rng, stop, logger):
    """Phase 1: greedy rollouts of --pretrain_questions training questions give (thought, correct)
    pairs, every thought of a rollout labelled by its answer; the head trains on 90% of them with
    BCE and reports held-out AUC and F1 on the rest (the per-rollout score: the mean of its v_t)."""
    n = cfg["n_latents"]
    model.eval()
    # (1) the pairs come from this run's own greedy rollouts
    picks = rng.sample(range(len(train)), min(args.pretrain_questions, len(train)))[d.rank::d.world]
    states, labels = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(picks), 64), desc="collect", disable=not d.main):
            h, c, _, _ = rollout_and_score(model, tokenizer, [train[j] for j in picks[i:i + 64]], cfg,
                                           args.max_completion_length, stop, args.generation_batch_size)
            states.append(h.reshape(-1, h.shape[-1]))
            labels.append(c.repeat_interleave(n))
    states, labels = torch.cat(states), torch.cat(labels)
    if d.world > 1:  # every rank trains its head copy on all pairs, so the heads stay identical
        everyone = [None] * d.world
        torch.distributed.all_gather_object(everyone, (states.cpu(), labels.cpu()))
        states = torch.cat([s for s, _ in everyone]).to(d.device)
        labels = torch.cat([y for _, y in everyone]).to(d.device)
    split = int(0.9 * len(states)) // n * n
    # (6) phase 1's optimizer: AdamW at a constant 1e-3, batches of 256 pairs
    pretrain_opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=args.weight_decay)
    g, loss = torch.Generator().manual_seed(args.seed), None
    for epoch in tqdm(range(args.pretrain_epochs), desc="pretrain head", disable=not d.main):
        head.train()
        for idx in torch.randperm(split, generator=g).split(256):
            loss = value_bce(head(states[idx]), labels[idx], args.pos_weight)
            pretrain_opt.zero_grad()
            loss.backward()
            pretrain_opt.step()
    head.eval()
    with torch.no_grad():  # (2) a rollout's prediction: the mean of v_t over its thoughts
        held = torch.sigmoid(head(states[split:])).view(-1, n).mean(1)
        held_y = labels[split:].view(-1, n)[:, 0]
    n_pos = int(held_y.sum())
    scores = head_scores(held, held_y, "heldout_")
    if not scores and d.main:
        print(f"note: no held-out AUC/F1 for the head: its {len(held_y)} held-out rollouts are {n_pos} correct and "
              f"{len(held_y) - n_pos} wrong, and both kinds are needed (more --pretrain_questions give more)",
              flush=True)
    logger.log({"pretrain_pairs": len(states), "pretrain_acc": labels.mean().item(),
                **({"pretrain_loss": loss.item()} if loss is not None else {}),
                "heldout_rollouts": len(held_y), "heldout_correct": n_pos, **scores}, 0)


def run_eval(model, tokenizer, test, cfg, args, d, logger, step):
    """Greedy pass@1 and #L on the evaluation questions, logged at `step`."""
    res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                          max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
    logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
    return {"pass@1": res["pass@1"], "mean_L": res["mean_L"]}


def main(args):
    # ---- 0. setup: the Coconut start, the head, two optimizers and schedules, resume
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    if args.pretrain_questions < max(2, d.world):
        common.die(f"--pretrain_questions must be at least {max(2, d.world)} (the head trains on some rollouts "
                   f"and is checked on others; got {args.pretrain_questions})")
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    if cfg is None:  # (7) the start must be a Coconut checkpoint with latents
        common.die(f"{args.model_name_or_path!r} is not a latent-rl checkpoint (no {common.LATENT_CONFIG}); "
                   "latent_value_rl.py needs a Coconut model: make one with coconut_sft.py")
    if cfg.get("mode") == "cot" or (cfg.get("mode") == "coconut" and cfg.get("n_latents", 0) < 1):
        common.die(f"{args.model_name_or_path!r} reasons in mode {cfg['mode']!r} without latents; latent_value_rl.py "
                   "needs a Coconut model with latents (make one with coconut_sft.py)")
    common.check_start(cfg, ("coconut",), "latent_value_rl.py")
    cfg = dict(cfg)
    train, test = common.load_train_eval(args, cfg)
    cfg.update(common.prompt_settings(args, cfg, train))
    prompts_of, _ = reasoning(model, tokenizer, cfg)  # one line if the markers are missing
    bf16, stop = common.use_bf16(args.bf16, d.device), common.stop_ids(model, tokenizer)  # (9)
    head = ValueHead(model.config.hidden_size).to(d.device)   # fp32, outside the bf16 autocast
    # --lora_r: adapters on the language model, the markers' rows trainable as in full fine-tuning
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                              trainable_token_ids=tokenizer.convert_tokens_to_ids([START_LATENT, END_LATENT, LATENT]))
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)  # keeps the KV cache of latent_states' chain
    model = common.wrap_model(model, d, args.distributed, bf16)
    # phase 2's optimizers (phase 1 pretrains the head with its own); (8) both cosine to 0.1x, no warm-up
    lm_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                               weight_decay=args.weight_decay)
    head_opt = torch.optim.AdamW(head.parameters(), lr=args.value_learning_rate, weight_decay=args.weight_decay)
    lm_sched = get_cosine_with_min_lr_schedule_with_warmup(lm_opt, 0, args.max_steps, min_lr_rate=0.1)
    head_sched = get_cosine_with_min_lr_schedule_with_warmup(head_opt, 0, args.max_steps, min_lr_rate=0.1)
    rng = random.Random(args.seed)
    state = common.TrainState(args, d, {"model": model, "value_head": head}, [lm_opt, head_opt],
                              [lm_sched, head_sched], [rng])
    done, extra = state.resume()  # a resumed run skips phase 1: the head it trained is in the checkpoint
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=done)
    n = cfg["n_latents"]
    cfg = {**cfg, "method": "latent_value_rl", "base_model": args.model_name_or_path,
           "value_head": {"file": "value_head.safetensors",
                          "dims": [common.unwrap(model).config.hidden_size, 128, 32, 8, 1]}}
    evaluate = functools.partial(run_eval, model, tokenizer, test, cfg, args, d, logger)
    per_rank = args.train_batch_size // d.world
    longest_prompt = max(len(p) for p in prompts_of([ex["question"] for ex in train[:256]]))
    common.print_memory_plan(model, d, args, per_rank, longest_prompt + n,
                             args.generation_batch_size or max(64, per_rank),
                             longest_prompt + args.max_completion_length, extra_modules=[head])

    # ---- phase 1: collect (thought, correct) pairs and pretrain the head
    if not done:
        pretrain_head(model, tokenizer, head, train, cfg, args, d, rng, stop, logger)

    # ---- phase 2: the policy maximises the head's predictions, the head keeps learning
    start = extra["start"] if done else evaluate(0)  # a resumed run has its start evaluation in the checkpoint
    noted = extra.get("noted", False)
    for step in tqdm(range(done + 1, args.max_steps + 1), initial=done, total=args.max_steps, desc="latent rl",
                     disable=not d.main):
        # ---- 1. rollout and reward: greedy, the answer's correctness
        times = {}
        batch = [train[i] for i in rng.sample(range(len(train)), args.train_batch_size)[d.rank::d.world]]
        model.eval()
        with common.timer(times, "rollout_s"):
            _, correct, prompts, r = rollout_and_score(model, tokenizer, batch, cfg, args.max_completion_length, stop,
                                                       args.generation_batch_size)
        times["rollout_tok_per_s"] = r.lengths.sum().item() / max(1e-9, times["rollout_s"])  # positions, latents too
        with common.timer(times, "update_s"):
            # ---- 2. the thoughts again, with gradients through the Coconut chain
            model.train()
            h, anchor = latent_states(model, prompts, n, tokenizer.pad_token_id, d.device)   # (B, n, d)
            # ---- 3. the two losses: -mean v_t to the language model, BCE to the head
            head.train()
            v, policy_loss, value_loss = backward_both(head, h, correct, args.pos_weight, not args.freeze_value_head,
                                                       anchor)
            # ---- 4. update: the head (unless frozen: (4)), the language model, both schedules
            if not args.freeze_value_head:
                common.average_gradients([head], d)  # the head is replicated, outside the wrapper
                head_opt.step()
                head_opt.zero_grad(set_to_none=True)
            grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
            lm_opt.step()
            lm_opt.zero_grad(set_to_none=True)
            lm_sched.step()
            head_sched.step()

        # ---- 5. log (predicted value next to real accuracy), evaluate, save
        with torch.no_grad():
            pred = v.mean(1)  # (2)
            row = {"acc": correct.mean().item(), "mean_value": pred.mean().item(), "policy_loss": policy_loss.item(),
                   "value_loss": value_loss.item(), "thought_norm": h.detach().norm(dim=-1).mean().item(),
                   "grad_norm": grad_norm}
            row = {k: common.all_reduce(x, d) for k, x in row.items()}
            # over the whole batch, the same on every rank
            scores = head_scores(common.all_gather(pred, d), common.all_gather(correct, d))
        if not scores and not noted and d.main:
            print("note: auc and f1 are left out of steps whose batch is all correct or all wrong "
                  "(both are undefined then)", flush=True)
        noted = noted or not scores
        logger.log({**row, **scores, **times}, step)
        if step % args.eval_every == 0 and step != args.max_steps:
            evaluate(step)
        state.maybe_save(step, tokenizer, cfg, extra={"start": start, "noted": noted},
                         extra_modules={"value_head": head})
    final = evaluate(args.max_steps)
    common.finish(model, tokenizer, cfg, args, d, final, start, extra_modules={"value_head": head},
                  plot_keys=["acc", "mean_value", "value_loss", "policy_loss", "auc", "eval_acc"])
    return model, head


if __name__ == "__main__":
    main(common.parse_args(Args))
