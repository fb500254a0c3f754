"""Coconut: chain of continuous thought, trained with its curriculum.

Paper: Hao et al. 2024, "Training Large Language Models to Reason in a Continuous Latent Space"
(github facebookresearch/coconut), as used and ablated in seed 000 ("Reinforcement Learning for
Latent-Space Thinking in LLMs", arXiv 2512.11816). Spec: ../shared/ALGORITHMS.md, section 1.

Stage 0 is plain CoT SFT, the language-space baseline. Stage s replaces the first min(s,
max_latent_stage) reasoning steps by c_thought latent slots each; past max_latent_stage every step
is gone. A latent slot's input is the last hidden state of the position before it, computed with
n_latent + 1 forward passes over a KV cache, gradients flowing through the whole chain. The loss
is cross-entropy on what follows <|end-latent|>. The optimizer is reset at each stage and the
model is evaluated (greedy pass@1, #L) after each stage.

Deviations and choices (numbered, so the README can refer to them):
1. A run whose stages are all 0 (--end_stage 0) trains without latent markers: that is the CoT
   model every other file starts from. In a run with latent stages, stage-0 examples carry
   <|start-latent|><|end-latent|> with no latent between them, as in Coconut's code.
2. --removal token (seed 000's ablation) removes tokens_per_stage reasoning tokens per stage
   (default: the training set's mean tokens per step) and adds c_thought latents per stage.
3. --max_steps caps the optimizer steps of every stage (Coconut counts epochs only).
4. --no_curriculum trains the last stage from the start for the same number of epochs ("w/o
   curriculum"); --pause_as_thought feeds the learnable <|latent|> embedding instead of the hidden
   state (Coconut's "pause as thought" ablation); --uniform_prob p gives each example, with
   probability p, a stage drawn uniformly from 0..current, so one model handles any number of
   thoughts (Coconut's code calls it the same).
5. Defaults are sized for the toy task (learning rate 1e-3 for the tiny model); the seed's
   settings for real models are in the commands below (lr 1e-4, wd 0.01, 3 epochs per stage).
6. Starts: a plain model or a CoT checkpoint begins at stage 1 (--start_stage), a Coconut
   checkpoint is continued at the stage after its own, with the --c_thought, --removal and
   --pause_as_thought it was trained with; other methods' checkpoints are refused in one line.
7. Prompts: with --chat_template (kept from a start checkpoint trained so) the question goes into
   the tokenizer's chat template after a system turn (--system_prompt; auto asks for the answer
   after '####', which the checker reads like the '### answer' the targets teach), and each target
   ends with the token the template closes an assistant turn with (<|im_end|>, <|eot_id|>), not
   the tokenizer's EOS. latent_config.json records the format, the system prompt and the dataset,
   so eval.py and the RL scripts prompt as this run trained.
8. Precision: fp32 master weights; --bf16 (default: on for a bf16-capable GPU) computes the
   forward in bf16; the checkpoint is saved in the start model's published dtype (--save_dtype).
9. --lr_scheduler_type cosine is transformers' cosine to 0.1x of the learning rate (min_lr_rate
   0.1), per stage, after --warmup_steps of linear warm-up from 0 (as every transformers schedule).

Scale (real models): --bf16 true computes in bf16 on fp32 master weights; --gradient_checkpointing
recomputes each decoder layer in backward and keeps the KV cache the latent passes attend to (the
gradients are those without it); the loss never makes whole (rows, positions, vocabulary) logits
(lm_logprobs, in chunks: 151,936 entries a position at Qwen's vocabulary); --lora_r trains adapters
and the three markers' rows, and checkpoints are saved merged; --save_steps writes resumable
checkpoint-<step> folders (steps counted over all stages) and --resume_from_checkpoint latest
continues a stopped run exactly: its stage, that stage's optimizer and schedule, and its place in
the epoch's data order. Before the first step a line estimates the memory a device needs.

Commands:
    python coconut_sft.py                                    # toy: CoT checkpoint -> stages 1..4
    python coconut_sft.py --model toy --dataset toy:20000 --start_stage 0 --end_stage 0 --epochs_per_stage 2 \
        --learning_rate 3e-3 --lr_scheduler_type cosine --warmup_steps 30 --output_dir runs/cot   # toy CoT (~10 min)
    # one 80 GB GPU, Qwen2.5-1.5B on GSM8K-Aug (seed 000): stage 0 (CoT), then the latent stages
    python coconut_sft.py --model Qwen/Qwen2.5-1.5B --dataset whynlp/gsm8k-aug-nl --start_stage 0 --end_stage 0 \
        --learning_rate 1e-4 --epochs_per_stage 3 --train_batch_size 128 --micro_batch_size 32 --bf16 true \
        --gradient_checkpointing --save_steps 500 --save_total_limit 2 --output_dir runs/qwen-cot
    python coconut_sft.py --model runs/qwen-cot --dataset whynlp/gsm8k-aug-nl --learning_rate 1e-4 --epochs_per_stage 1 \
        --train_batch_size 128 --micro_batch_size 32 --bf16 true --gradient_checkpointing --save_steps 500 \
        --save_total_limit 2 --output_dir runs/qwen-coconut
    python coconut_sft.py ... --resume_from_checkpoint latest   # a stopped run: the same command, continued exactly
    python coconut_sft.py --model runs/qwen-coconut --dataset whynlp/gsm8k-aug-nl --learning_rate 1e-4 \
        --train_batch_size 128 --micro_batch_size 32 --bf16 true --output_dir runs/qwen-coconut-2   # continue: the next stage
    # 8 GPUs (FSDP2, 16 rows a GPU); Llama-3.2-1B-Instruct the same way, with its chat template
    torchrun --nproc_per_node 8 coconut_sft.py --model runs/qwen-cot --dataset whynlp/gsm8k-aug-nl --learning_rate 1e-4 \
        --epochs_per_stage 1 --train_batch_size 128 --micro_batch_size 16 --bf16 true --save_steps 500 \
        --save_total_limit 2 --output_dir runs/qwen-coconut
    torchrun --nproc_per_node 8 coconut_sft.py --model meta-llama/Llama-3.2-1B-Instruct --dataset whynlp/gsm8k-aug-nl \
        --chat_template --learning_rate 1e-4 --epochs_per_stage 1 --train_batch_size 128 --micro_batch_size 16 --bf16 true \
        --save_steps 500 --output_dir runs/llama-instruct-coconut   # an instruct model: its chat template, a system turn, <|eot_id|>
    # LoRA instead of full fine-tuning (adapters and the markers' rows; a larger learning rate)
    python coconut_sft.py --model runs/qwen-cot --dataset whynlp/gsm8k-aug-nl --lora_r 64 --lora_alpha 128 \
        --learning_rate 2e-4 --train_batch_size 128 --micro_batch_size 32 --bf16 true --save_steps 500 --output_dir runs/qwen-coconut-lora
"""
import functools
import math
import random
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from tqdm import tqdm
from transformers import DynamicCache, get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

import common
import toy

# Coconut's markers: the prompt ends with <|start-latent|>, each continuous thought sits in a
# <|latent|> slot, and <|end-latent|> closes the thoughts before the language part of the answer.
START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"


@dataclass
class Args:
    model_name_or_path: str = field(default=toy.COT, metadata={"aliases": ["--model"], "help": "start model: a plain causal LM (toy, a folder, a hub id or a .gguf file), a CoT checkpoint of this project, or a Coconut checkpoint (continued)"})
    dataset: str = field(default="", metadata={"help": "training data: whynlp/gsm8k-aug(-nl), openai/gsm8k, a local .jsonl/.parquet, or toy (the default only for the toy model)"})
    eval_dataset: str = field(default="", metadata={"help": "evaluation data; default: the test split of --dataset (a single file: a held-out tenth of it)"})
    output_dir: str = field(default="runs/coconut_sft", metadata={"help": "where the checkpoint, metrics.jsonl and plots go"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    chat_template: bool = field(default=False, metadata={"help": "format prompts with the tokenizer's chat template (kept from the start checkpoint if it was trained so)"})
    system_prompt: str = field(default="auto", metadata={"help": "system turn with --chat_template; auto = the start checkpoint's, else the answer format the data's answers need"})
    start_stage: int = field(default=-1, metadata={"help": "first stage; -1 = 1, or the stage after a Coconut start checkpoint's own (continuing its curriculum)"})
    end_stage: int = field(default=-1, metadata={"help": "last stage (inclusive); -1 = max_latent_stage + 1 (all steps latent)"})
    max_latent_stage: int = field(default=3, metadata={"help": "stages past this one replace no more steps by latents (they drop the rest)"})
    c_thought: int = field(default=2, metadata={"help": "latent slots per replaced step (or per --tokens_per_stage tokens)"})
    epochs_per_stage: int = field(default=1, metadata={"help": "epochs of each stage"})
    removal: str = field(default="step", metadata={"help": "step | token (seed 000's ablation)"})
    tokens_per_stage: int = field(default=0, metadata={"help": "--removal token: tokens removed per stage; 0 = mean tokens per step"})
    uniform_prob: float = field(default=0.0, metadata={"help": "probability that an example gets a stage drawn uniformly from 0..current"})
    no_curriculum: bool = field(default=False, metadata={"help": "train the last stage from the start (the w/o curriculum ablation)"})
    pause_as_thought: bool = field(default=False, metadata={"help": "feed the learnable <|latent|> embedding instead of the hidden state (ablation)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (1e-3 suits the toy model; 1e-4 for real ones)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "constant | cosine (to 0.1x, per stage; transformers' get_cosine_with_min_lr_schedule_with_warmup)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (from 0) at the start of each stage"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    train_batch_size: int = field(default=64, metadata={"help": "examples per optimizer step, all ranks together"})
    micro_batch_size: int = field(default=64, metadata={"help": "examples per forward pass on one rank"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N training rows (0 = all)"})
    max_eval_samples: int = field(default=200, metadata={"help": "evaluation questions after each stage (0 = all)"})
    max_completion_length: int = field(default=64, metadata={"help": "generated positions per evaluation rollout, latents included"})
    max_steps: int = field(default=-1, metadata={"help": "cap on optimizer steps per stage (-1 = none)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning); the Coconut markers' embedding rows stay trainable"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA target modules: all-linear, or comma-separated module names (q_proj,v_proj)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder layer's activations in backward (exact, KV cache of the latent passes kept): less memory, about a third more compute"})
    save_steps: int = field(default=0, metadata={"help": "write <output_dir>/checkpoint-<step> (resumable) every N optimizer steps, counted over all stages (0 = only the final save)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest N checkpoint-<step> folders (default: all)"})
    resume_from_checkpoint: str = field(default="", metadata={"help": "continue a stopped run exactly: a checkpoint-<step> folder, or latest (the newest in --output_dir); same arguments and process count"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "bf16 compute on fp32 master weights; default: on for a bf16-capable GPU, off on CPU"})
    save_dtype: str = field(default="auto", metadata={"help": "dtype of the saved weights: auto (the start model's published dtype) | float32 | bfloat16"})
    distributed: str = field(default="fsdp", metadata={"help": "under torchrun: fsdp (FSDP2) | ddp"})
    track: bool = field(default=False, metadata={"help": "log to Weights & Biases"})
    log_every: int = field(default=10, metadata={"help": "log a metrics row every N steps"})


# ----------------------------------------------------------------------------------------------
# the curriculum: which reasoning is replaced by how many latent slots at stage s

class Example(NamedTuple):
    """One training example at one stage; the sequence is prompt + tail."""
    prompt: list     # token ids of the question (+ <|start-latent|>)
    n_latent: int    # latent slots at the start of the tail
    tail: list       # [<|latent|>] * n_latent + [<|end-latent|>] + the reasoning left + "### answer" + end
    labels: list     # the tail's labels: -100 (no loss) on the latent slots and <|end-latent|>


def build_example(tokenizer, ex, stage, args, special, tokens_per_stage, markers=True, prompting=None, end_id=None):
    """The Example (prompt ids, n_latent, tail ids, tail labels) of one example at one stage.

    The full sequence is prompt + [<|start-latent|>] + [<|latent|>] * n_latent + [<|end-latent|>] + tail;
    tail = the reasoning left + "### answer" + `end_id` (default EOS), which is all the loss sees.
    `prompting` ({"prompt_format", "system_prompt"}, from common.prompt_settings; default plain)
    says how the question is formatted."""
    start, end, latent = special
    prompting = prompting or {"prompt_format": "plain", "system_prompt": ""}
    prompt = common.encode_prompt(tokenizer, ex["question"], prompting["prompt_format"] == "chat", prompting["system_prompt"])
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    steps = [tokenizer.encode(s + "\n", add_special_tokens=False) for s in ex["steps"]]
    answer = tokenizer.encode(f"{common.ANSWER_MARKER} {ex['answer']}", add_special_tokens=False) + [end_id]
    k = min(stage, args.max_latent_stage)
    if args.removal == "step":
        n_latent = args.c_thought * min(k, len(steps))
        kept = [] if stage > args.max_latent_stage else steps[k:]
        reasoning = [t for s in kept for t in s]
    else:
        flat = [t for s in steps for t in s]
        n_latent = args.c_thought * min(k, math.ceil(len(flat) / tokens_per_stage))
        reasoning = [] if stage > args.max_latent_stage else flat[k * tokens_per_stage:]
    if not markers:
        return Example(prompt, 0, reasoning + answer, reasoning + answer)
    tail = [end] + reasoning + answer
    return Example(prompt + [start], n_latent, [latent] * n_latent + tail, [-100] * (n_latent + 1) + reasoning + answer)


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
    """Coconut's forward: latent slot c0+k (for rows with k < n_latent) takes as input the final
    hidden state at column c0+k-1. Pass 0 covers columns [0, c0); pass k (1..n-1) the single column
    c0+k-1; the last pass the rest, reusing the KV cache, so n_latent + 1 passes in all, with
    gradients through the chain. Returns logp (B, L-1), logp[:, j] = log p(ids[:, j+1] | columns
    <= j) (0 at the prompt's own positions, which predict no label), and the continuous thoughts
    fed, as a list of (vectors (B, d), rows that take them (B,)).

    No pass makes whole (B, L, V) logits: the last pass scores its positions with lm_logprobs (in
    chunks), and each earlier pass needs only its last position's logits (B, 1, V), which predict
    the next pass's first column (a label for rows with fewer latents than the batch's most)."""
    pos = common.positions(mask)
    n_max = common.global_max(n_latent.max())  # the same number of passes on every rank
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
            logits, hidden = common.lm_forward(model, ids[:, a:b], mask[:, :b], pos[:, a:b], cache, logits_to_keep=1, **latent)
            chunks.append(next_logprob(logits, b))
        else:
            lp, _ = common.lm_logprobs(model, ids[:, a:b], mask[:, :b], pos[:, a:b], ids[:, a + 1:b], past_key_values=cache, **latent)
            chunks.append(lp.token)
    return torch.cat(chunks, 1), thoughts


def stage_schedule(args, start_cfg=None):
    """The stage of each round: start_stage..end_stage (end_stage throughout with --no_curriculum).
    --start_stage -1 starts a plain or CoT model at stage 1 and continues a Coconut checkpoint's
    curriculum at the stage after its own (never past end_stage; stage 1 if it has none, as
    after grpo_latent.py --n_latents on a CoT model)."""
    end = args.max_latent_stage + 1 if args.end_stage < 0 else args.end_stage
    start = args.start_stage
    if start == -1:
        after = start_cfg.get("stage", 0) + 1 if (start_cfg or {}).get("mode") == "coconut" else 1
        start = min(after, end)
    if start < 0 or end < start:
        common.die(f"stages must satisfy 0 <= start_stage <= end_stage (got {start}..{end})")
    stages = list(range(start, end + 1))
    return [end] * len(stages) if args.no_curriculum else stages


def lr_schedule(optimizer, args, total):
    """A stage's learning rates: --warmup_steps of linear warm-up from 0, then constant, or cosine
    down to 0.1x of --learning_rate at the stage's last step (`total` steps)."""
    if args.lr_scheduler_type == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.warmup_steps, total, min_lr_rate=0.1)
    return get_constant_schedule_with_warmup(optimizer, args.warmup_steps)


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
    """The rollout step of a Coconut model whose prompt ends with <|start-latent|>: for the first
    `n_latents` steps the last hidden state is fed back as the next input (recorded as <|latent|>),
    then <|end-latent|> is forced, then language tokens are sampled (greedy at temperature 0)."""
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
    """(prompts(questions) -> token-id lists, rollout step) of a checkpoint of mode "cot" (plain
    language sampling) or "coconut" (prompts end with <|start-latent|>; cfg["n_latents"] thoughts,
    then <|end-latent|>, then language). Prompts are formatted as latent_config.json says."""
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
    if args.c_thought < 1:
        common.die(f"--c_thought must be at least 1 (got {args.c_thought})")
    if args.max_latent_stage < 0:
        common.die(f"--max_latent_stage must be >= 0 (got {args.max_latent_stage})")
    if args.removal not in ("step", "token"):
        common.die(f"--removal must be step or token (got {args.removal!r})")
    if args.lr_scheduler_type not in ("constant", "cosine"):
        common.die(f"--lr_scheduler_type must be constant or cosine (got {args.lr_scheduler_type!r})")
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
    cot_only = max(stages) == 0
    special = common.add_special_tokens(model, tokenizer, [START_LATENT, END_LATENT, LATENT],
                                        init_from="<<")  # as Coconut's code does
    bf16, end_id = common.use_bf16(args.bf16, d.device), common.answer_end_id(tokenizer, prompting, common.stop_ids(model, tokenizer))
    tokens_per_stage = args.tokens_per_stage or max(1, round(
        sum(len(tokenizer.encode(s + "\n", add_special_tokens=False)) for ex in train[:2000] for s in ex["steps"])
        / max(1, sum(len(ex["steps"]) for ex in train[:2000]))))
    if args.removal == "token" and d.main:
        print(f"token-wise removal: {tokens_per_stage} tokens per stage")
    steps_per_epoch = len(train) // args.train_batch_size
    if steps_per_epoch == 0:
        common.die(f"the training set ({len(train)} examples) is smaller than one batch ({args.train_batch_size})")
    per_stage = steps_per_epoch * args.epochs_per_stage   # optimizer steps of every stage
    per_stage = per_stage if args.max_steps < 0 else min(args.max_steps, per_stage)
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

    def new_optimizer():  # reset at every stage, as Coconut does
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        return optimizer, lr_schedule(optimizer, args, per_stage)

    def stage_cfg(stage):  # latent_config.json of a checkpoint made in `stage`
        cfg = ({"mode": "cot"} if cot_only else
               {"mode": "coconut", "n_latents": args.c_thought * min(stage, args.max_latent_stage), "c_thought": args.c_thought,
                "stage": stage, "removal": args.removal, "pause_as_thought": args.pause_as_thought})
        return {**cfg, **prompting, "method": "coconut_sft", "base_model": args.model_name_or_path, "dataset": data_cfg["dataset"]}

    def epoch_order(si, epoch):  # the data order of one epoch of one stage (a resumed run finds its place in it)
        order = list(range(len(train)))
        random.Random(args.seed * 1000 + si * 100 + epoch).shuffle(order)
        return order

    # --resume_from_checkpoint: step s belongs to stage (s - 1) // per_stage, whose optimizer the
    # checkpoint holds; that stage's optimizer is made first, resume() fills it in
    state = common.TrainState(args, d, {"model": model}, rngs=[rng])
    _, saved = state.checkpoint()
    first = (saved - 1) // per_stage if saved else 0
    optimizer, scheduler = new_optimizer()
    state.optimizers, state.schedulers = [optimizer], [scheduler]
    done, extra = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=done)
    res = extra.get("eval")  # the last stage evaluation, if the checkpoint was at the end of a stage
    example = lambda ex, s: build_example(tokenizer, ex, s, args, special, tokens_per_stage, not cot_only, prompting, end_id)  # noqa: E731
    sample = [example(ex, s) for ex in train[:256] for s in sorted(set(stages))]
    longest_prompt = max(len(e.prompt) for e in sample)
    common.print_memory_plan(model, d, args, micro, longest_prompt + max(len(e.tail) for e in sample),
                             min(64, -(-len(test) // d.world)), longest_prompt + args.max_completion_length)
    for si in range(first, len(stages)):
        stage = stages[si]
        if si > first:
            optimizer, scheduler = new_optimizer()
            state.optimizers, state.schedulers = [optimizer], [scheduler]
        cfg = stage_cfg(stage)
        model.train()
        i0 = max(0, done - si * per_stage)  # steps of this stage already done (by the resumed run)
        bar = tqdm(total=per_stage, initial=i0, desc=f"stage {stage}", disable=not d.main)
        t0, seen_tokens, since_log = time.time(), 0, 0
        for i in range(i0, per_stage):
            epoch, b = divmod(i, steps_per_epoch)
            if i == i0 or b == 0:
                order = epoch_order(si, epoch)
            step = si * per_stage + i + 1
            batch = order[b * args.train_batch_size:(b + 1) * args.train_batch_size][d.rank::d.world]
            sizes = [rng.randint(0, stage) if rng.random() < args.uniform_prob else stage for _ in batch]
            exs = [example(train[j], s) for j, s in zip(batch, sizes)]
            # every labelled token of the global batch weighs the same, however it is split into
            # ranks and micro-batches (the gradients are averaged over ranks, hence * world)
            n_tokens = common.all_sum(sum(sum(y != -100 for y in ex.labels) for ex in exs), d)
            stats = {"loss": 0.0, "thought_norm": 0.0, "n_thoughts": 0}
            for m in range(0, len(exs), micro):
                ids, mask, labels, n_latent, c0 = collate(exs[m:m + micro], tokenizer.pad_token_id, d.device)
                logp, thoughts = coconut_forward(model, ids, mask, n_latent, c0, args.pause_as_thought)
                loss_sum = -logp[labels[:, 1:] != -100].sum()   # cross-entropy on what follows <|end-latent|>
                (loss_sum * d.world / n_tokens).backward()
                stats["loss"] += loss_sum.item() / n_tokens
                if thoughts:
                    all_t = torch.cat([v[rows] for v, rows in thoughts]).detach()
                    stats["thought_norm"] += all_t.norm(dim=-1).sum().item()
                    stats["n_thoughts"] += len(all_t)
            grad_norm = common.clip_grad_norm(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            seen_tokens, since_log = seen_tokens + n_tokens, since_log + 1
            if (i + 1) % args.log_every == 0 or i + 1 == per_stage:
                elapsed = max(1e-9, time.time() - t0)
                row = {"stage": stage, "loss": common.all_sum(stats["loss"], d), "grad_norm": grad_norm,
                       "lr": scheduler.get_last_lr()[0], "step_s": elapsed / since_log, "tok_per_s": seen_tokens / elapsed}
                if stats["n_thoughts"]:
                    row["thought_norm"] = stats["thought_norm"] / stats["n_thoughts"]
                logger.log(row, step)
                t0, seen_tokens, since_log = time.time(), 0, 0
            if i + 1 == per_stage:  # evaluation after each stage, with the number of latents this stage uses
                with torch.no_grad():
                    out = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                                          max_new_tokens=args.max_completion_length, d=d)
                res = {"pass@1": out["pass@1"], "mean_L": out["mean_L"]}
                logger.log({"stage": stage, "eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
                if d.main:
                    print(f"stage {stage}: pass@1 {res['pass@1']:.3f}  #L {res['mean_L']:.1f}  ({len(test)} test questions)")
                model.train()
            state.maybe_save(step, tokenizer, cfg, extra={"eval": res})
        bar.close()
    common.finish(model, tokenizer, stage_cfg(stages[-1]), args, d, res,
                  plot_keys=["loss", "thought_norm", "eval_acc", "eval_mean_L"])
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
