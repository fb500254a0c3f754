"""Coconut: chain of continuous thought, trained with its curriculum (stage 0 is plain CoT SFT).

Paper: "Training Large Language Models to Reason in a Continuous Latent Space", Hao et al. 2024,
arXiv 2412.06769 (code: github facebookresearch/coconut); step-wise and token-wise removal as
ablated in "Reinforcement Learning for Latent-Space Thinking in LLMs", arXiv 2512.11816.

Stage s replaces the first k = min(s, max_latent_stage) reasoning steps by c_thought latent slots
each; past max_latent_stage the remaining steps are dropped too. One training sequence is

    question <|start-latent|> [<|latent|>] * (c_thought * k) <|end-latent|> steps k+1.. ### answer EOS

The input at latent slot p is not an embedding but the last hidden state at position p - 1, so the
thoughts form a chain: n_latent + 1 forward passes over a KV cache, gradients through the whole
chain. The loss is cross-entropy on what follows <|end-latent|>:

    L = -(1 / #labelled tokens) * sum_{j after <|end-latent|>} log p(x_j | x_<j, h_1..h_n)

Each stage trains --epochs_per_stage epochs with a fresh AdamW, then evaluates greedily with the
stage's number of latents (pass@1 and #L, the latent slots plus reasoning tokens).

Usage:
    python coconut_sft.py                                           # toy: CoT checkpoint -> stages 1..4
    python coconut_sft.py --model toy --dataset toy:20000 --start_stage 0 --end_stage 0 --epochs_per_stage 2 \
        --learning_rate 3e-3 --lr_scheduler_type cosine --warmup_steps 30 --output_dir runs/cot   # toy CoT
    python coconut_sft.py --model runs/qwen-cot --dataset whynlp/gsm8k-aug-nl --learning_rate 1e-4 \
        --train_batch_size 128 --micro_batch_size 32 --bf16 true --gradient_checkpointing --output_dir runs/qwen-coconut

Docs: docs/coconut_sft.md
"""
import functools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from tqdm import tqdm
from transformers import DynamicCache, get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

import common
import toy

# Coconut's markers: the prompt ends with <|start-latent|>, each continuous thought sits in a
# <|latent|> slot, and <|end-latent|> closes the thoughts before the language part of the answer.
START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"


@dataclass
class Args(common.TrainArgs):
    # the method
    start_stage: int = field(default=-1, metadata={"help": "first stage; -1 = 1, or the one after a Coconut start's"})
    end_stage: int = field(default=-1, metadata={"help": "last stage (inclusive); -1 = max_latent_stage + 1"})
    max_latent_stage: int = field(default=3, metadata={"help": "stages past this one drop the steps left"})
    c_thought: int = field(default=2, metadata={"help": "latent slots per replaced step (or per --tokens_per_stage)"})
    epochs_per_stage: int = field(default=1, metadata={"help": "epochs of each stage"})
    removal: Literal["step", "token"] = field(default="step", metadata={"help": "remove whole steps or tokens"})
    tokens_per_stage: int = field(default=0, metadata={"help": "--removal token: tokens per stage; 0 = mean per step"})
    uniform_prob: float = field(default=0.0, metadata={"help": "probability of a stage drawn from 0..current"})
    no_curriculum: bool = field(default=False, metadata={"help": "train the last stage from the start (ablation)"})
    pause_as_thought: bool = field(default=False, metadata={"help": "feed the <|latent|> embedding itself (ablation)"})
    # the training loop
    micro_batch_size: int = field(default=64, metadata={"help": "examples per forward pass on one rank"})
    max_steps: int = field(default=-1, metadata={"help": "cap on optimizer steps per stage (-1 = none)"})
    lr_scheduler_type: Literal["constant", "cosine"] = field(default="constant", metadata={
        "help": "constant, or cosine to 0.1x (per stage)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (from 0) at each stage's start"})
    log_every: int = field(default=10, metadata={"help": "log a metrics row every N steps"})
    distributed: Literal["fsdp", "ddp"] = field(default="fsdp", metadata={"help": "under torchrun: FSDP2 or DDP"})
    # the flags every trainer shares (common.TrainArgs), with this method's defaults
    model_name_or_path: str = field(default=toy.COT, metadata={
        "help": "start: a causal LM (toy, folder, hub id), a CoT or a Coconut checkpoint"})
    output_dir: str = "runs/coconut_sft"
    train_batch_size: int = field(default=64, metadata={"help": "examples per optimizer step, all ranks together"})
    max_completion_length: int = field(default=64, metadata={"help": "generated positions per evaluation rollout"})
    max_eval_samples: int = field(default=200, metadata={"help": "evaluation questions after each stage (0 = all)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (1e-4 for real models)"})  # (11)
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning); marker rows trainable"})


# ----------------------------------------------------------------------------------------------
# the curriculum: which reasoning is replaced by how many latent slots at stage s

class Example(NamedTuple):
    """One training example at one stage; the sequence is prompt + tail."""
    prompt: list     # token ids of the question (+ <|start-latent|>)
    n_latent: int    # latent slots at the start of the tail
    tail: list       # [<|latent|>] * n_latent + [<|end-latent|>] + the reasoning left + "### answer" + end
    labels: list     # the tail's labels: -100 (no loss) on the latent slots and <|end-latent|>


def build_example(tokenizer, ex, stage, args, special, tokens_per_stage, markers=True, prompting=None, end_id=None):
    """The Example of one example at one stage: prompt + <|start-latent|>, then [<|latent|>] * n_latent
    + <|end-latent|> + the reasoning left + "### answer" + `end_id` (default EOS); the loss sees what
    follows <|end-latent|>. `prompting` (common.prompt_settings; default plain) formats the question."""
    start, end, latent = special
    prompting = prompting or {"prompt_format": "plain", "system_prompt": ""}
    # (12) with --chat_template: the chat template and a system turn; the target ends with end_id
    chat = prompting["prompt_format"] == "chat"
    prompt = common.encode_prompt(tokenizer, ex["question"], chat, prompting["system_prompt"])
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    steps = [tokenizer.encode(s + "\n", add_special_tokens=False) for s in ex["steps"]]
    answer = tokenizer.encode(f"{common.ANSWER_MARKER} {ex['answer']}", add_special_tokens=False) + [end_id]
    k = min(stage, args.max_latent_stage)
    if args.removal == "step":
        # (2) c_thought latents per step removed from this example (Coconut's code: c_thought * k for all)
        n_latent = args.c_thought * min(k, len(steps))
        kept = [] if stage > args.max_latent_stage else steps[k:]
        reasoning = [t for s in kept for t in s]
    else:  # (3) --removal token: tokens_per_stage tokens per stage, c_thought latents for each chunk
        flat = [t for s in steps for t in s]
        n_latent = args.c_thought * min(k, math.ceil(len(flat) / tokens_per_stage))
        reasoning = [] if stage > args.max_latent_stage else flat[k * tokens_per_stage:]
    if not markers:  # (1) a CoT-only run (--end_stage 0): no latent markers at all
        return Example(prompt, 0, reasoning + answer, reasoning + answer)
    tail = [end] + reasoning + answer
    labels = [-100] * (n_latent + 1) + reasoning + answer
    return Example(prompt + [start], n_latent, [latent] * n_latent + tail, labels)


def mean_tokens_per_step(tokenizer, train):
    """--removal token's default --tokens_per_stage: the mean tokens of a step (first 2000 rows)."""
    rows = train[:2000]
    n_tokens = sum(len(tokenizer.encode(s + "\n", add_special_tokens=False)) for ex in rows for s in ex["steps"])
    return max(1, round(n_tokens / max(1, sum(len(ex["steps"]) for ex in rows))))


def collate(examples, pad_id, device):
    """Left-pad the prompts (so every latent slot of the batch sits in the same columns) and
    right-pad the tails. Returns ids, attention mask, labels, n_latent and the first latent column."""
    prompts, n_latent, tails, labels = zip(*examples)
    left, lmask = common.pad_left(prompts, pad_id)
    width = max(len(t) for t in tails)
    right = torch.full((len(tails), width), pad_id)
    rmask = torch.zeros((len(tails), width), dtype=torch.long)
    lab = torch.full((len(tails), left.shape[1] + width), -100)
    for i, (t, y) in enumerate(zip(tails, labels)):
        right[i, :len(t)], rmask[i, :len(t)] = torch.tensor(t), 1
        lab[i, left.shape[1]:left.shape[1] + len(y)] = torch.tensor(y)
    ids, mask = torch.cat([left, right], 1), torch.cat([lmask, rmask], 1)
    return ids.to(device), mask.to(device), lab.to(device), torch.tensor(n_latent, device=device), left.shape[1]


def coconut_forward(model, ids, mask, n_latent, c0, pause_as_thought=False):
    """Coconut's forward: latent slot c0+k (rows with k < n_latent) takes as input the final hidden
    state at column c0+k-1. Pass 0 covers columns [0, c0), pass k (1..n-1) column c0+k-1, the last
    pass the rest, over one KV cache: n_latent + 1 passes, gradients through the chain. Returns
    logp (B, L-1), logp[:, j] = log p(ids[:, j+1] | columns <= j) (0 on the prompt), and the thoughts
    fed, as (vectors (B, d), rows that take them (B,)). No pass makes whole (B, L, V) logits: the
    last scores its positions in chunks (lm_logprobs), each earlier one keeps its last position's."""
    pos = common.positions(mask)
    n_max = common.all_reduce(int(n_latent.max()), None, "max")  # the same number of passes on every rank
    if n_max == 0 or pause_as_thought:  # pause as thought: the <|latent|> embedding itself is the input
        return common.lm_logprobs(model, ids, mask, pos, ids[:, 1:])[0].token, []

    def next_logprob(logits, b):  # log p(ids[:, b]) from the logits of column b-1 (B, 1, V)
        return logits[:, -1].float().log_softmax(-1).gather(-1, ids[:, b, None])

    cache = DynamicCache(config=common.unwrap(model).config)
    logits, hidden = common.lm_forward(model, ids[:, :c0], mask[:, :c0], pos[:, :c0], cache, logits_to_keep=1)
    chunks, thoughts = [torch.zeros((ids.shape[0], c0 - 1), device=ids.device), next_logprob(logits, c0)], []
    for k in range(n_max):
        a, b = c0 + k, (c0 + k + 1 if k < n_max - 1 else ids.shape[1])
        is_latent = torch.zeros((ids.shape[0], b - a), dtype=torch.bool, device=ids.device)
        is_latent[:, 0] = k < n_latent
        thought = hidden[:, -1]                        # (B, d): fed at column c0+k where is_latent
        thoughts.append((thought, is_latent[:, 0]))
        latent = dict(latent_mask=is_latent, latent_vectors=thought[:, None].expand(-1, b - a, -1))
        if b < ids.shape[1]:
            logits, hidden = common.lm_forward(model, ids[:, a:b], mask[:, :b], pos[:, a:b], cache,
                                               logits_to_keep=1, **latent)
            chunks.append(next_logprob(logits, b))
        else:
            lp, _ = common.lm_logprobs(model, ids[:, a:b], mask[:, :b], pos[:, a:b], ids[:, a + 1:b],
                                       past_key_values=cache, **latent)
            chunks.append(lp.token)
    return torch.cat(chunks, 1), thoughts


def stage_schedule(args, start_cfg=None):
    """The stage of each round: start_stage..end_stage (end_stage throughout with --no_curriculum).
    --start_stage -1: stage 1 for a plain or CoT model, the stage after a Coconut checkpoint's own
    (never past end_stage; 1 if it records none, as after grpo_latent.py --n_latents)."""
    # (5) one round of --epochs_per_stage per stage, up to max_latent_stage + 1 by default
    end = args.max_latent_stage + 1 if args.end_stage < 0 else args.end_stage
    start = args.start_stage
    if start == -1:  # (6) a CoT start skips stage 0; a Coconut checkpoint goes on from its own stage
        after = start_cfg.get("stage", 0) + 1 if (start_cfg or {}).get("mode") == "coconut" else 1
        start = min(after, end)
    if start < 0 or end < start:
        common.die(f"stages must satisfy 0 <= start_stage <= end_stage (got {start}..{end})")
    stages = list(range(start, end + 1))
    return [end] * len(stages) if args.no_curriculum else stages


def lr_schedule(optimizer, args, total):
    """A stage's learning rates: --warmup_steps of linear warm-up from 0, then constant, or cosine
    down to 0.1x of --learning_rate at the stage's last step (`total` steps)."""
    if args.lr_scheduler_type == "cosine":  # (14) an option; Coconut's code uses a constant rate
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.warmup_steps, total, min_lr_rate=0.1)
    return get_constant_schedule_with_warmup(optimizer, args.warmup_steps)


def new_optimizer(params, args, per_stage):
    """A fresh AdamW and its schedule: made at every stage, as Coconut does."""
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    return optimizer, lr_schedule(optimizer, args, per_stage)


def epoch_order(n, seed, si, epoch):
    """The data order of one epoch of one stage (a resumed run finds its place in it)."""
    order = list(range(n))
    random.Random(seed * 1000 + si * 100 + epoch).shuffle(order)
    return order


def stage_cfg(args, stage, cot_only, prompting, dataset):
    """latent_config.json of a checkpoint made in `stage`: how eval.py and the RL files run it."""
    cfg = ({"mode": "cot"} if cot_only else
           {"mode": "coconut", "n_latents": args.c_thought * min(stage, args.max_latent_stage),
            "c_thought": args.c_thought, "stage": stage, "removal": args.removal,
            "pause_as_thought": args.pause_as_thought})
    return {**cfg, **prompting, "method": "coconut_sft", "base_model": args.model_name_or_path, "dataset": dataset}


def check_continuing(args, start_cfg):
    """A Coconut checkpoint is continued with the latent settings it was trained with."""
    if (start_cfg or {}).get("mode") != "coconut":
        return
    for key in ("c_thought", "removal", "pause_as_thought"):
        if key in start_cfg and start_cfg[key] != getattr(args, key):
            common.die(f"{args.model_name_or_path!r} is a Coconut checkpoint trained with --{key} {start_cfg[key]}; "
                       f"continuing it needs the same (got {getattr(args, key)})")


# ----------------------------------------------------------------------------------------------
# inference: how a checkpoint of this file reasons (this file's evaluation, eval.py, and the RL
# files that write the same few lines for their own rollouts)

def coconut_step(n_latents, latent_id, end_id, temperature=0.0, top_p=1.0):
    """A Coconut model's rollout step (its prompt ends with <|start-latent|>): `n_latents` steps feed
    the last hidden state back (recorded as <|latent|>), then <|end-latent|> is forced, then tokens
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
    """(prompts(questions) -> token-id lists, rollout step) of a "cot" checkpoint (plain sampling) or
    a "coconut" one (cfg["n_latents"] thoughts), prompted as its latent_config.json says."""
    chat, system = cfg.get("prompt_format") == "chat", cfg.get("system_prompt", "")
    if cfg["mode"] == "cot":
        start, step = None, common.sampling_step(temperature, top_p=top_p)
    elif cfg["mode"] == "coconut":
        start, end, latent = common.require_tokens(tokenizer, [START_LATENT, END_LATENT, LATENT], "a Coconut model")
        step = coconut_step(cfg["n_latents"], latent, end, temperature, top_p)
    else:
        common.die(f"coconut_sft.py defines the modes cot and coconut, not {cfg['mode']!r}")

    def prompts(questions):
        ids = [common.encode_prompt(tokenizer, q, chat, system) for q in questions]
        return ids if start is None else [p + [start] for p in ids]
    return prompts, step


def main(args):
    # ---- 0. setup: checks, model and markers, data, the stages, optimizer, resume
    if args.c_thought < 1:
        common.die(f"--c_thought must be at least 1 (got {args.c_thought})")
    if args.max_latent_stage < 0:
        common.die(f"--max_latent_stage must be >= 0 (got {args.max_latent_stage})")
    if args.max_steps == 0 or args.max_steps < -1:
        common.die(f"--max_steps must be -1 (no cap) or at least 1 (got {args.max_steps})")
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    model, tokenizer, start_cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    common.check_start(start_cfg, (None, "cot", "coconut"), "coconut_sft.py")
    check_continuing(args, start_cfg)
    stages = stage_schedule(args, start_cfg)
    data_cfg = dict(start_cfg or {})
    train, test = common.load_train_eval(args, data_cfg)
    prompting = common.prompt_settings(args, start_cfg, train)   # recorded in latent_config.json
    cot_only = max(stages) == 0  # (1)
    # the markers' rows start as copies of "<<"'s, as in Coconut's code
    special = common.add_special_tokens(model, tokenizer, [START_LATENT, END_LATENT, LATENT], init_from="<<")
    # (13) fp32 master weights, bf16 compute with --bf16 (Coconut's code casts the weights to bf16)
    bf16 = common.use_bf16(args.bf16, d.device)
    end_id = common.answer_end_id(tokenizer, prompting, common.stop_ids(model, tokenizer))  # (12)
    tokens_per_stage = args.tokens_per_stage or mean_tokens_per_step(tokenizer, train)  # (3)
    if args.removal == "token" and d.main:
        print(f"token-wise removal: {tokens_per_stage} tokens per stage")
    steps_per_epoch = len(train) // args.train_batch_size
    if steps_per_epoch == 0:
        common.die(f"the training set ({len(train)} examples) is smaller than one batch ({args.train_batch_size})")
    per_stage = steps_per_epoch * args.epochs_per_stage   # optimizer steps of every stage
    per_stage = per_stage if args.max_steps < 0 else min(args.max_steps, per_stage)  # (4) Coconut counts epochs
    # --lora_r: adapters on the decoder, the markers' rows trainable (their embeddings are new)
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                              trainable_token_ids=special)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)  # keeps the KV cache the latent passes attend to
    model = common.wrap_model(model, d, args.distributed, bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    per_rank = args.train_batch_size // d.world
    micro = min(args.micro_batch_size, per_rank)
    rng = random.Random(args.seed)
    # --resume_from_checkpoint: step s belongs to stage (s - 1) // per_stage, whose optimizer the
    # checkpoint holds; that stage's optimizer is made first, resume() fills it in
    state = common.TrainState(args, d, {"model": model}, rngs=[rng])
    _, saved = state.checkpoint()
    first = (saved - 1) // per_stage if saved else 0
    optimizer, scheduler = new_optimizer(params, args, per_stage)
    state.optimizers, state.schedulers = [optimizer], [scheduler]
    done, extra = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=done)
    res = extra.get("eval")  # the last stage evaluation, if the checkpoint was at the end of a stage
    example = functools.partial(build_example, tokenizer, args=args, special=special, tokens_per_stage=tokens_per_stage,
                                markers=not cot_only, prompting=prompting, end_id=end_id)
    sample = [example(ex, s) for ex in train[:256] for s in sorted(set(stages))]
    longest_prompt = max(len(e.prompt) for e in sample)
    common.print_memory_plan(model, d, args, micro, longest_prompt + max(len(e.tail) for e in sample),
                             min(64, -(-len(test) // d.world)), longest_prompt + args.max_completion_length)

    for si in range(first, len(stages)):
        # ---- 1. a stage: a fresh optimizer (as Coconut), the number of latents it trains
        stage = stages[si]
        if si > first:
            optimizer, scheduler = new_optimizer(params, args, per_stage)
            state.optimizers, state.schedulers = [optimizer], [scheduler]
        cfg = stage_cfg(args, stage, cot_only, prompting, data_cfg["dataset"])
        model.train()
        i0 = max(0, done - si * per_stage)  # steps of this stage already done (by the resumed run)
        bar = tqdm(total=per_stage, initial=i0, desc=f"stage {stage}", disable=not d.main)
        t0, seen_tokens, since_log = time.time(), 0, 0
        for i in range(i0, per_stage):
            # ---- 2. the batch: this rank's examples, each at the stage's layout
            epoch, b = divmod(i, steps_per_epoch)
            if i == i0 or b == 0:
                order = epoch_order(len(train), args.seed, si, epoch)
            step = si * per_stage + i + 1
            batch = order[b * args.train_batch_size:(b + 1) * args.train_batch_size][d.rank::d.world]
            # (7) --uniform_prob: a stage from 0..current (Coconut's code: 0..the example's step count)
            sizes = [rng.randint(0, stage) if rng.random() < args.uniform_prob else stage for _ in batch]
            exs = [example(train[j], s) for j, s in zip(batch, sizes)]
            # (8) every labelled token of the global batch weighs the same, however it is split into
            # ranks and micro-batches (the gradients are averaged over ranks, hence * world)
            n_tokens = common.all_reduce(sum(sum(y != -100 for y in ex.labels) for ex in exs), d, "sum")

            # ---- 3. forward through the latent chain, cross-entropy after <|end-latent|>, backward
            stats = {"loss": 0.0, "thought_norm": 0.0, "n_thoughts": 0}
            for m in range(0, len(exs), micro):
                ids, mask, labels, n_latent, c0 = collate(exs[m:m + micro], tokenizer.pad_token_id, d.device)
                logp, thoughts = coconut_forward(model, ids, mask, n_latent, c0, args.pause_as_thought)
                loss_sum = -logp[labels[:, 1:] != -100].sum()
                (loss_sum * d.world / n_tokens).backward()
                stats["loss"] += loss_sum.item() / n_tokens
                if thoughts:
                    all_t = torch.cat([v[rows] for v, rows in thoughts]).detach()
                    stats["thought_norm"] += all_t.norm(dim=-1).sum().item()
                    stats["n_thoughts"] += len(all_t)

            # ---- 4. update
            grad_norm = common.clip_grad_norm(params, args.max_grad_norm)  # (9) Coconut's code does not clip
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            seen_tokens, since_log = seen_tokens + n_tokens, since_log + 1

            # ---- 5. log, evaluate at the stage's end, save
            if (i + 1) % args.log_every == 0 or i + 1 == per_stage:
                elapsed = max(1e-9, time.time() - t0)
                row = {"stage": stage, "loss": common.all_reduce(stats["loss"], d, "sum"), "grad_norm": grad_norm,
                       "lr": scheduler.get_last_lr()[0], "step_s": elapsed / since_log,
                       "tok_per_s": seen_tokens / elapsed}
                if stats["n_thoughts"]:
                    row["thought_norm"] = stats["thought_norm"] / stats["n_thoughts"]
                logger.log(row, step)
                t0, seen_tokens, since_log = time.time(), 0, 0
            if i + 1 == per_stage:  # (10) after each stage (Coconut's code: after every epoch)
                with torch.no_grad():
                    out = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                                          max_new_tokens=args.max_completion_length, d=d)
                res = {"pass@1": out["pass@1"], "mean_L": out["mean_L"]}
                logger.log({"stage": stage, "eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
                if d.main:
                    print(f"stage {stage}: pass@1 {res['pass@1']:.3f}  #L {res['mean_L']:.1f}  "
                          f"({len(test)} test questions)")
                model.train()
            state.maybe_save(step, tokenizer, cfg, extra={"eval": res})
        bar.close()
    common.finish(model, tokenizer, stage_cfg(args, stages[-1], cot_only, prompting, data_cfg["dataset"]), args, d, res,
                  plot_keys=["loss", "thought_norm", "eval_acc", "eval_mean_L"])
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
