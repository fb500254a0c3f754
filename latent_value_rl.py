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
cosine to 0.1x (transformers' get_cosine_with_min_lr_schedule_with_warmup, no warm-up). The seed reports oscillating losses and reward hacking (the model learns latents
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
5. AUC and F1 are logged only over rollouts of both kinds (correct and wrong): when the held-out
   rollouts (or a phase-2 batch, gathered over ranks) are all wrong, as on a small or weak start,
   AUC is undefined and F1 says nothing, so a note with the counts is printed instead.
6. The start must be a Coconut checkpoint with latents (coconut_sft.py makes one). It prompts as
   the checkpoint was trained (latent_config.json: chat template and system prompt) and rollouts
   stop at the tokenizer's EOS or the model's end-of-turn ids (<|im_end|>, <|eot_id|>).
7. Precision: fp32 master weights (the head is fp32 throughout); --bf16 (default: on for a
   bf16-capable GPU) computes the language model's forward in bf16; the checkpoint is saved in
   the start model's published dtype (--save_dtype).

Scale (real models): --bf16 true computes the language model in bf16 on fp32 master weights;
--generation_batch_size bounds the rollouts generated at once (phase 1 and 2); the recomputed
latent chain takes one row of logits per pass, never a prompt's; --gradient_checkpointing
recomputes each decoder layer in backward and keeps the chain's KV cache (the gradients are those
without it); --lora_r trains adapters (and the markers' rows) and checkpoints are saved merged;
--save_steps writes resumable checkpoint-<step> folders (value head and both optimizers included),
--resume_from_checkpoint latest continues a stopped run exactly without redoing phase 1. Before the
first step a line estimates the memory a device needs.

Commands:
    python latent_value_rl.py                                   # the toy Coconut checkpoint
    python latent_value_rl.py --freeze_value_head --output_dir runs/lvrl_frozen
    # one 80 GB GPU: a Qwen2.5-1.5B Coconut checkpoint (coconut_sft.py)
    python latent_value_rl.py --model runs/qwen-coconut --dataset openai/gsm8k --learning_rate 5e-6 \
        --value_learning_rate 5e-6 --train_batch_size 32 --max_completion_length 256 --bf16 true \
        --gradient_checkpointing --generation_batch_size 64 --save_steps 20 --output_dir runs/qwen-lvrl
    python latent_value_rl.py ... --resume_from_checkpoint latest   # a stopped run: the same command, continued exactly
    python latent_value_rl.py --model runs/llama-instruct-coconut --dataset openai/gsm8k --chat_template \
        --learning_rate 5e-6 --value_learning_rate 5e-6 --train_batch_size 32 --max_completion_length 256 --bf16 true
    # 8 GPUs (FSDP2): 8 prompts a GPU
    torchrun --nproc_per_node 8 latent_value_rl.py --model runs/qwen-coconut --dataset openai/gsm8k --learning_rate 5e-6 \
        --value_learning_rate 5e-6 --train_batch_size 64 --max_completion_length 256 --bf16 true --save_steps 20 \
        --output_dir runs/qwen-lvrl
    # LoRA on the language model (the head is trained whole)
    python latent_value_rl.py --model runs/qwen-coconut --dataset openai/gsm8k --lora_r 64 --lora_alpha 128 \
        --learning_rate 5e-5 --value_learning_rate 5e-6 --train_batch_size 32 --max_completion_length 256 --bf16 true \
        --save_steps 20 --output_dir runs/qwen-lvrl-lora
"""
import functools
import random
from dataclasses import dataclass, field
from typing import Optional

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
class Args:
    model_name_or_path: str = field(default=toy.COCONUT, metadata={"aliases": ["--model"], "help": "a Coconut checkpoint of this project (made by coconut_sft.py)"})
    dataset: str = field(default="", metadata={"help": "training data: a hub dataset, a local .jsonl/.parquet, or toy (the default only for the toy model)"})
    eval_dataset: str = field(default="", metadata={"help": "evaluation data; default: the test split of --dataset (a single file: a held-out tenth of it)"})
    output_dir: str = field(default="runs/latent_value_rl", metadata={"help": "where the checkpoint, value head, metrics.jsonl and plots go"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    chat_template: bool = field(default=False, metadata={"help": "format prompts with the tokenizer's chat template (kept from the checkpoint if it was trained so)"})
    system_prompt: str = field(default="auto", metadata={"help": "system turn with --chat_template; auto = the checkpoint's, else the answer format the reward checks"})
    pretrain_questions: int = field(default=1024, metadata={"help": "phase 1: training questions whose greedy rollouts give the head's (thought, correct) pairs"})
    pretrain_epochs: int = field(default=20, metadata={"help": "phase 1: epochs of head pretraining on those pairs"})
    pos_weight: float = field(default=20.0, metadata={"help": "BCE weight of the correct (rare) class"})
    train_batch_size: int = field(default=32, metadata={"help": "prompts per step, all ranks together"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the language model (policy), cosine to 0.1x over the steps; 5e-6 for real models"})
    value_learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the value head in phase 2, cosine to 0.1x (phase 1: a constant 1e-3)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (both optimizers)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping of the language model"})
    freeze_value_head: bool = field(default=False, metadata={"help": "keep the head fixed in phase 2 (the seed's ablation)"})
    max_completion_length: int = field(default=48, metadata={"help": "generated positions per rollout, latents included"})
    max_steps: int = field(default=60, metadata={"help": "phase 2 training steps"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N training rows (0 = all)"})
    max_eval_samples: int = field(default=200, metadata={"help": "evaluation questions (0 = all)"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank of the language model (0 = full fine-tuning); the Coconut markers' embedding rows stay trainable"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA target modules: all-linear, or comma-separated module names (q_proj,v_proj)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder layer's activations in backward (exact, the latent chain's KV cache kept): less memory, about a third more compute"})
    generation_batch_size: int = field(default=0, metadata={"help": "rollouts generated at once on a rank (0 = all of a step's rows at once; phase 1: 64)"})
    save_steps: int = field(default=0, metadata={"help": "write <output_dir>/checkpoint-<step> (resumable, value head included) every N phase-2 steps (0 = only the final save)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest N checkpoint-<step> folders (default: all)"})
    resume_from_checkpoint: str = field(default="", metadata={"help": "continue a stopped run exactly (phase 1 is not redone): a checkpoint-<step> folder, or latest (the newest in --output_dir); same arguments and process count"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "bf16 compute on fp32 master weights; default: on for a bf16-capable GPU, off on CPU"})
    save_dtype: str = field(default="auto", metadata={"help": "dtype of the saved weights: auto (the start model's published dtype) | float32 | bfloat16"})
    distributed: str = field(default="fsdp", metadata={"help": "under torchrun: fsdp (FSDP2) | ddp"})
    track: bool = field(default=False, metadata={"help": "log to Weights & Biases"})


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
    if n_pos == 0 or n_pos == len(correct):
        return {}
    return {f"{prefix}auc": roc_auc(pred, correct), f"{prefix}f1": f1_score((pred > 0.5).long(), correct.long())}


# ----------------------------------------------------------------------------------------------
# the latent states, recomputed with gradients through the Coconut chain

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
        logits, hidden = common.lm_forward(model, ids[:, -1:], mask, pos, cache, latent_mask=torch.ones_like(pos, dtype=torch.bool),
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
    r = common.generate(model, prompts, lambda: step, max_new_tokens, stop, tokenizer.pad_token_id, batch_size=batch_size)
    correct = torch.tensor([float(common.is_correct(common.decode_completion(tokenizer, r, i), ex["answer"]))
                            for i, ex in enumerate(batch)], device=r.tokens.device)
    n = cfg["n_latents"]
    return r.latents[:, :n].float(), correct, prompts, r


def main(args):
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    if args.pretrain_questions < max(2, d.world):
        common.die(f"--pretrain_questions must be at least {max(2, d.world)} (the head trains on some rollouts "
                   f"and is checked on others; got {args.pretrain_questions})")
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    if cfg is None:
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
    bf16, stop = common.use_bf16(args.bf16, d.device), common.stop_ids(model, tokenizer)
    head = ValueHead(model.config.hidden_size).to(d.device)   # fp32, outside the bf16 autocast
    # --lora_r: adapters on the language model, the markers' rows trainable as in full fine-tuning
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                              trainable_token_ids=tokenizer.convert_tokens_to_ids([START_LATENT, END_LATENT, LATENT]))
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)  # keeps the KV cache of latent_states' chain
    model = common.wrap_model(model, d, args.distributed, bf16)
    # phase 2's optimizers (phase 1 pretrains the head with its own); both cosine to 0.1x
    lm_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                               weight_decay=args.weight_decay)
    head_opt = torch.optim.AdamW(head.parameters(), lr=args.value_learning_rate, weight_decay=args.weight_decay)
    lm_sched = get_cosine_with_min_lr_schedule_with_warmup(lm_opt, 0, args.max_steps, min_lr_rate=0.1)
    head_sched = get_cosine_with_min_lr_schedule_with_warmup(head_opt, 0, args.max_steps, min_lr_rate=0.1)
    rng = random.Random(args.seed)
    state = common.TrainState(args, d, {"model": model, "value_head": head}, [lm_opt, head_opt], [lm_sched, head_sched], [rng])
    done, extra = state.resume()  # a resumed run skips phase 1: the head it trained is in the checkpoint
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=done)
    n = cfg["n_latents"]
    cfg = {**cfg, "method": "latent_value_rl", "base_model": args.model_name_or_path,
           "value_head": {"file": "value_head.safetensors", "dims": [common.unwrap(model).config.hidden_size, 128, 32, 8, 1]}}

    def run_eval(step):
        res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                              max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
        logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
        return {"pass@1": res["pass@1"], "mean_L": res["mean_L"]}

    per_rank = args.train_batch_size // d.world
    longest_prompt = max(len(p) for p in prompts_of([ex["question"] for ex in train[:256]]))
    common.print_memory_plan(model, d, args, per_rank, longest_prompt + n, args.generation_batch_size or max(64, per_rank),
                             longest_prompt + args.max_completion_length, extra_modules=[head])

    # ---- phase 1: collect (thought, correct) pairs and pretrain the head
    if not done:
        model.eval()
        picks = rng.sample(range(len(train)), min(args.pretrain_questions, len(train)))[d.rank::d.world]
        states, labels = [], []
        with torch.no_grad():
            for i in tqdm(range(0, len(picks), 64), desc="collect", disable=not d.main):
                h, c, _, _ = rollout_and_score(model, tokenizer, [train[j] for j in picks[i:i + 64]], cfg, args.max_completion_length,
                                               stop, args.generation_batch_size)
                states.append(h.reshape(-1, h.shape[-1]))
                labels.append(c.repeat_interleave(n))
        states, labels = torch.cat(states), torch.cat(labels)
        if d.world > 1:  # every rank trains its head copy on all pairs, so the heads stay identical
            everyone = [None] * d.world
            torch.distributed.all_gather_object(everyone, (states.cpu(), labels.cpu()))
            states, labels = torch.cat([s for s, _ in everyone]).to(d.device), torch.cat([l for _, l in everyone]).to(d.device)
        split = int(0.9 * len(states)) // n * n
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
        with torch.no_grad():
            held = torch.sigmoid(head(states[split:])).view(-1, n).mean(1)
            held_y = labels[split:].view(-1, n)[:, 0]
        n_pos = int(held_y.sum())
        scores = head_scores(held, held_y, "heldout_")
        if not scores and d.main:
            print(f"note: no held-out AUC/F1 for the head: its {len(held_y)} held-out rollouts are {n_pos} correct and "
                  f"{len(held_y) - n_pos} wrong, and both kinds are needed (more --pretrain_questions give more)", flush=True)
        logger.log({"pretrain_pairs": len(states), "pretrain_acc": labels.mean().item(),
                    **({"pretrain_loss": loss.item()} if loss is not None else {}),
                    "heldout_rollouts": len(held_y), "heldout_correct": n_pos, **scores}, 0)

    # ---- phase 2: the policy maximises the head's predictions, the head keeps learning
    start = extra["start"] if done else run_eval(0)  # a resumed run has its start evaluation in the checkpoint
    noted = extra.get("noted", False)
    for step in tqdm(range(done + 1, args.max_steps + 1), initial=done, total=args.max_steps, desc="latent rl", disable=not d.main):
        times = {}
        batch = [train[i] for i in rng.sample(range(len(train)), args.train_batch_size)[d.rank::d.world]]
        model.eval()
        with common.timer(times, "rollout_s"):
            _, correct, prompts, r = rollout_and_score(model, tokenizer, batch, cfg, args.max_completion_length, stop,
                                                       args.generation_batch_size)
        times["rollout_tok_per_s"] = r.lengths.sum().item() / max(1e-9, times["rollout_s"])  # this rank's positions, latents too
        with common.timer(times, "update_s"):
            model.train()
            h, anchor = latent_states(model, prompts, n, tokenizer.pad_token_id, d.device)   # (B, n, d), with gradients
            head.train()
            v, policy_loss, value_loss = backward_both(head, h, correct, args.pos_weight, not args.freeze_value_head, anchor)
            if not args.freeze_value_head:
                common.average_gradients([head], d)  # the head is replicated, outside the wrapper
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
                   "value_loss": value_loss.item(), "thought_norm": h.detach().norm(dim=-1).mean().item(),
                   "grad_norm": grad_norm}
            row = {k: common.all_mean(x, d) for k, x in row.items()}
            scores = head_scores(common.all_gather(pred, d), common.all_gather(correct, d))   # over the whole batch, the same on every rank
        if not scores and not noted and d.main:
            print("note: auc and f1 are left out of steps whose batch is all correct or all wrong (both are undefined then)", flush=True)
        noted = noted or not scores
        logger.log({**row, **scores, **times}, step)
        if step % args.eval_every == 0 and step != args.max_steps:
            run_eval(step)
        state.maybe_save(step, tokenizer, cfg, extra={"start": start, "noted": noted}, extra_modules={"value_head": head})
    final = run_eval(args.max_steps)
    common.finish(model, tokenizer, cfg, args, d, final, start, extra_modules={"value_head": head},
                  plot_keys=["acc", "mean_value", "value_loss", "policy_loss", "auc", "eval_acc"])
    return model, head


if __name__ == "__main__":
    main(common.parse_args(Args))
