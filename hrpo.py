"""HRPO: hybrid latent reasoning policy optimisation.

Paper: seed 002, Yue et al. 2025, "Hybrid Latent Reasoning via Reinforcement Learning" (NeurIPS 2025,
arXiv 2505.18454); code github Yueeeeeeee/HRPO. Spec: ../shared/ALGORITHMS.md, "Shared pieces" and
section 7.

Inside the reasoning span (until the answer marker appears), the input at each step is not the
sampled token's embedding alone but a gated mix of it and a projection of the previous step's
output distribution. With logits z and p = softmax(z / tau):

    x ~ p                                           the sampled token (tau = 0.5)
    h~ = (sum_v p_v E_v) / ||p||_2                  probability-weighted embedding, normalised
    e = E[x]
    r = sigmoid(W_r e + b_r),  i = sigmoid(W_i e + b_i)
    a = exp(-c * softplus(-Lambda) * r)             c = 8, per dimension
    next input = a * e + sqrt(1 - a^2 + 1e-8) * (i * h~)

Lambda starts at -log(u^(-1/c) - 1) with u ~ U(r_min, r_max), so a = u^r starts near 1: the
model starts out reading almost plain token embeddings and RL decides how much of h~ to let in.
The hidden ratio, mean(1 - a), is what the paper tracks. After the marker, decoding is plain.

Training is REINFORCE: reward 1 for a correct final answer as eval.py checks it (the paper also
demands exactly one answer marker: --strict_format, deviation 1); group advantage A = (R - mean) /
(std + 1e-4); loss -A * log pi(token) (no ratio, no clipping: strictly on-policy, one update per
batch, because the hybrid inputs depend on the current weights) plus beta * k3 KL to the frozen
base model (adapters off, no gate, plain token inputs), averaged over each completion's tokens,
then over completions. The rollout stores h~ and the span; the training forward recomputes the
gates from the stored h~ (and the token embeddings), so the gradient reaches W_r, W_i and Lambda
through every later token's log-prob. The language model trains through LoRA (peft, r 32, alpha 64,
all linear layers: --lora_r, --lora_alpha, --lora_target_modules) or fully (--lora_r 0); the gate
and Lambda always train fully, each at its own learning rate.

Where the code lives: everything of mode "hybrid" is here: the gate, h~, the span, the hybrid
rollout step, and `reasoning` and `load_extras`, which eval.py calls to run a saved HRPO
checkpoint (the gate is gate.safetensors beside the weights). The hybrid input is applied by a
forward hook on the input embedding (HybridInput), armed once per forward: the same code mixes
the inputs in the KV-cached rollout (one position per step) and in the training forward (the
whole completion), and the hook sees the embedding output itself, so gradients and FSDP behave as
in an ordinary forward.

Deviations and choices:
1. The answer marker is this project's "###" (GSM8K's "####" contains it, and the default system
   prompt of --chat_template asks for "#### <number>"). A token's input is hybrid while the text up
   to and including that token has no marker yet (with \\boxed{} answers there is no marker: the
   whole completion is hybrid). The reward is `common.is_correct`, eval.py's checker, whatever the
   format: "The answer is 20." earns 1, so a model never trained on this project's format gets a
   signal, and the training reward means what eval's pass@1 means. --strict_format restores the
   paper's rule (0 unless the completion has exactly one "###"; off by default).
2. The KL and the log-probs use T = 1 (as the code); sampling and h~ use tau (--temperature).
3. Lambda gets no weight decay (the others get --weight_decay 0.1): with decay, AdamW would pull
   Lambda toward 0 and raise the hidden ratio by itself, and a rising hidden ratio is the finding.
4. Gradient clipping (--max_grad_norm 0.1) is done separately for the language model and for the
   gate (a sharded model and a replicated gate do not share one norm under FSDP2).
5. LoRA dropout (--lora_dropout) is 0 so that the training forward reproduces the rollout's log-probs exactly.
6. --no_gate is the paper's "interpolation, no gating" ablation as this file reads it: the input
   is (1 - w) e + w h~ with a fixed w (--interp_weight 0.5), no W_r, W_i or Lambda.
7. Distributed: DDP (the default) or FSDP2 (--distributed fsdp), with LoRA or full fine-tuning.
   The gate is replicated and its gradient averaged by hand.
8. Defaults are sized for the toy task (60 steps of 16 prompts x 8; LoRA learning rate 1e-4, and
   gate 1e-2 and Lambda 5e-2, large enough for the hidden ratio to be free to move in 60 steps;
   LoRA at 1e-3 lost half the reward within 20 steps); the real-model command uses the paper's
   5e-6 / 1e-4 / 1e-3.
9. Saved checkpoints hold merged weights (LoRA folded into the base), so plain transformers loads
   them, in the start model's published dtype (--save_dtype); the gate is gate.safetensors (fp32)
   and latent_config.json says {"mode": "hybrid", ...}. --save_steps N also writes such a
   checkpoint-<step> folder every N steps (with training_state/: adapters or weights, gate, AdamW,
   data order, random states), and --resume_from_checkpoint latest continues the run from the
   newest one exactly as if it had not stopped (with as many processes).
10. Real models: starts are a plain causal LM, a CoT checkpoint, or an HRPO checkpoint (training
    continues with its gate); --dataset is required off the toy model (a single local file gives a
    tenth of its rows, held out, to evaluation). --chat_template and --system_prompt set the prompt,
    saved in latent_config.json so that eval.py prompts the same way. Rollouts end at any stop id
    (the tokenizer's eos and the generation config's, e.g. <|im_end|>). --bf16 (default on a bf16
    GPU) computes in bf16 over fp32 master weights; the frozen reference of full fine-tuning is a
    bf16 copy.
11. --loss_type and --scale_rewards are TRL's knobs with TRL's values; the defaults are the
    paper's: "grpo" (each completion's token mean, then the mean over completions) and "group"
    (A = (R - group mean) / (group std + 1e-4)). "dapo" averages over every token of the batch,
    "dr_grpo" divides the token sum by rows x --max_completion_length; "batch" divides by the std
    of the whole batch's rewards, "none" by nothing.
12. At scale: the log-probs are computed a chunk of positions at a time (never whole
    vocabulary-sized logits), --gradient_checkpointing recomputes each decoder layer in backward,
    and --generation_batch_size bounds the rows generated at once on a rank (their KV cache and
    stored h~); a memory plan per device is printed before the first step.

Commands:
    python hrpo.py                                                   # toy CoT checkpoint, LoRA
    python hrpo.py --lora_r 0 --learning_rate 1e-4 --output_dir runs/hrpo_full
    python hrpo.py --no_gate --output_dir runs/hrpo_no_gate         # the ablation
    python hrpo.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset openai/gsm8k --chat_template --bf16 true --gradient_checkpointing \\
        --learning_rate 5e-6 --gate_learning_rate 1e-4 --lambda_learning_rate 1e-3 --train_batch_size 32 --num_generations 8 \\
        --micro_batch_size 8 --generation_batch_size 128 --max_completion_length 1024 --max_steps 1000 --save_steps 100 \\
        --output_dir runs/hrpo-qwen                                 # one 80 GB GPU
    torchrun --nproc_per_node 8 hrpo.py --model Qwen/Qwen2.5-3B-Instruct --dataset openai/gsm8k --chat_template --bf16 true \\
        --gradient_checkpointing --learning_rate 5e-6 --gate_learning_rate 1e-4 --lambda_learning_rate 1e-3 \\
        --train_batch_size 64 --num_generations 8 --micro_batch_size 8 --generation_batch_size 64 \\
        --max_completion_length 1024 --max_steps 1000 --save_steps 100 --output_dir runs/hrpo-qwen3b
    python eval.py --model runs/hrpo
    python eval.py --model runs/hrpo-qwen --dataset openai/gsm8k --max_completion_length 1024
A stopped run continues with its own command plus --resume_from_checkpoint latest.
"""
import copy
import functools
import random
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import toy


@dataclass
class Args:
    model_name_or_path: str = field(default=toy.COT, metadata={"aliases": ["--model"], "help": "a plain causal LM, a CoT checkpoint, or an HRPO checkpoint (training continues with its gate)"})
    dataset: str = field(default="", metadata={"help": "training data: a hub dataset, a local .jsonl/.parquet, or toy (the default only for the toy model)"})
    eval_dataset: str = field(default="", metadata={"help": "evaluation data; default: the test split of --dataset (a single file: a held-out tenth of it)"})
    output_dir: str = field(default="runs/hrpo", metadata={"help": "where the checkpoint, metrics.jsonl and plots go"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    chat_template: bool = field(default=False, metadata={"help": "format prompts with the tokenizer's chat template (kept from the checkpoint if it was trained so)"})
    system_prompt: str = field(default="auto", metadata={"help": "system turn with --chat_template; auto = the checkpoint's, else the answer format the reward checks"})
    strict_format: bool = field(default=False, metadata={"help": "the paper's reward: 1 only with exactly one answer marker (###; GSM8K's #### counts once) and a correct answer; default: correct as eval.py checks it"})
    num_generations: int = field(default=8, metadata={"help": "G: rollouts per prompt"})
    train_batch_size: int = field(default=16, metadata={"help": "prompts per step, all ranks together"})
    micro_batch_size: int = field(default=64, metadata={"help": "rollouts per forward pass on one rank"})
    beta: float = field(default=0.005, metadata={"help": "k3 KL coefficient to the frozen base model"})
    loss_type: str = field(default="grpo", metadata={"help": "how per-token losses are averaged (TRL's names): grpo = each completion's token mean, then the mean over completions (the paper's); dapo = the mean over every token of the batch; dr_grpo = token sum / (completions x max_completion_length); verl's seq-mean-token-mean and token-mean are grpo and dapo"})
    scale_rewards: str = field(default="group", metadata={"help": "advantage scaling (TRL's): group = (R - group mean) / (group std + 1e-4) (the paper's); batch = the same baseline over the std of the whole batch's rewards; none = R - group mean; true/false = group/none"})
    temperature: float = field(default=0.5, metadata={"help": "tau: sampling temperature and the sharpness of h~"})
    max_completion_length: int = field(default=48, metadata={"help": "generated tokens per rollout"})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (peft; the paper's 32); 0 = full fine-tuning"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (scaling alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0: the training forward reproduces the rollout's log-probs)"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA targets: all-linear (every linear layer of the decoder) or comma-separated module names"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder layer's activations in backward (less memory, about a third more compute)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "language model (LoRA or full)"})
    gate_learning_rate: float = field(default=1e-2, metadata={"help": "W_r, W_i and their biases"})
    lambda_learning_rate: float = field(default=5e-2, metadata={"help": "Lambda"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on Lambda)"})
    max_grad_norm: float = field(default=0.1, metadata={"help": "gradient clipping, the language model and the gate each"})
    c: float = field(default=8.0, metadata={"help": "the gate's scale c in a = exp(-c softplus(-Lambda) r)"})
    r_min: float = field(default=0.99, metadata={"help": "a starts as u^r with u ~ U(r_min, r_max)"})
    r_max: float = field(default=0.999, metadata={"help": "see --r_min"})
    no_gate: bool = field(default=False, metadata={"help": "ablation: plain interpolation (1-w) e + w h~, no gate"})
    interp_weight: float = field(default=0.5, metadata={"help": "w of --no_gate"})
    max_steps: int = field(default=60, metadata={"help": "training steps"})
    generation_batch_size: int = field(default=0, metadata={"help": "rollouts generated at once on one rank, a multiple of --num_generations (0 = all of a step's)"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N training rows (0 = all)"})
    max_eval_samples: int = field(default=200, metadata={"help": "evaluation questions (0 = all)"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps"})
    log_completions: bool = field(default=False, metadata={"help": "write one completion per prompt to completions.jsonl"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "bf16 compute on fp32 master weights; default: on for a bf16-capable GPU, off on CPU"})
    save_dtype: str = field(default="auto", metadata={"help": "dtype of the saved weights: auto (the start model's published dtype) | float32 | bfloat16"})
    save_steps: int = field(default=0, metadata={"help": "write <output_dir>/checkpoint-<step> (merged weights, gate, training state) every N steps (0 = only the final save)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest N checkpoint-<step> folders (default: all)"})
    resume_from_checkpoint: str = field(default="", metadata={"help": "continue a run from a checkpoint-<step> folder, or latest (the newest in --output_dir)"})
    distributed: str = field(default="ddp", metadata={"help": "under torchrun: ddp | fsdp (FSDP2), with LoRA or full fine-tuning"})
    track: bool = field(default=False, metadata={"help": "log to Weights & Biases"})


# ----------------------------------------------------------------------------------------------
# the hybrid input: h~, the gate, and the hook that feeds their mix in place of token embeddings

def hidden_representation(logits, embedding_weight, tau):
    """h~ = (sum_v p_v E_v) / ||p||_2 with p = softmax(z / tau) over the whole vocabulary. (N, d)"""
    p = (logits.float() / tau).softmax(-1)
    return (p.to(embedding_weight.dtype) @ embedding_weight).float() / p.norm(dim=-1, keepdim=True)


def lambda_init(u, c):
    """Lambda such that softplus(-Lambda) = -log(u) / c, i.e. a = u^r."""
    return -torch.log(u ** (-1.0 / c) - 1.0)


class Gate(nn.Module):
    """e, h~ -> a * e + sqrt(1 - a^2 + 1e-8) * (i * h~), with r, i from e and a = exp(-c softplus(-Lambda) r).
    With `interp_weight` set (the --no_gate ablation): (1 - w) e + w h~, and a = 1 - w."""

    def __init__(self, d, c=8.0, r_min=0.99, r_max=0.999, interp_weight=None):
        super().__init__()
        self.c, self.interp_weight = c, interp_weight
        self.W_r = nn.Linear(d, d)
        self.W_i = nn.Linear(d, d)
        self.Lambda = nn.Parameter(lambda_init(torch.empty(d).uniform_(r_min, r_max), c))

    def forward(self, e, h):
        """(mixed input, a), both float32 and shaped like e."""
        e, h = e.float(), h.float()
        if self.interp_weight is not None:
            w = self.interp_weight
            return (1 - w) * e + w * h, torch.full_like(e, 1 - w)
        r = torch.sigmoid(self.W_r(e))
        i = torch.sigmoid(self.W_i(e))
        a = torch.exp(-self.c * F.softplus(-self.Lambda) * r)
        return a * e + torch.sqrt(1 - a * a + 1e-8) * (i * h), a


class HybridInput:
    """A forward hook on the input embedding. `arm(ids, h, span)` prepares the next forward: if its
    input ids are `ids` (compared where `span` is True: the rollout loop pads finished rows), the
    embedding e becomes gate(e, h) wherever `span` is True. Armed for one forward only (the next
    one disarms it, whatever it is), so a rollout that ends after arming leaves nothing behind for
    the next model call. Also accumulates the hidden ratio mean(1 - a) over the positions it mixed
    (reset with `reset_stats`)."""

    def __init__(self, model, gate):
        self.gate, self.armed = gate, None
        self.reset_stats()
        emb = common.unwrap(model).get_input_embeddings()
        emb.register_forward_hook(self._hook)
        emb._hybrid_input = self

    def arm(self, ids, h, span):
        self.armed = (ids, h, span)

    def reset_stats(self):
        self.ratio_sum, self.ratio_n = 0.0, 0.0

    @property
    def hidden_ratio(self):
        return float(self.ratio_sum / self.ratio_n) if self.ratio_n else float("nan")

    def _hook(self, module, args, out):
        armed, self.armed = self.armed, None
        if armed is None:
            return out
        ids, h, span = armed
        if args[0].shape != ids.shape or not span.any() or not torch.equal(args[0][span], ids[span]):
            return out
        mixed, a = self.gate(out, h)
        ratio = (1 - a.detach()).mean(-1)
        self.ratio_sum = self.ratio_sum + (ratio * span).sum()
        self.ratio_n = self.ratio_n + span.sum()
        return torch.where(span.unsqueeze(-1), mixed.to(out.dtype), out)


def load_extras(model, folder, cfg):
    """eval.py: the checkpoint's gate (gate.safetensors beside the weights), hooked into `model`."""
    emb = common.unwrap(model).get_input_embeddings()
    g = cfg["gate"]
    gate = Gate(emb.weight.shape[1], g["c"], interp_weight=g.get("interp_weight"))
    common.load_extra_module(folder, "gate", gate)
    HybridInput(model, gate.to(emb.weight.device).eval().requires_grad_(False))


def hybrid_input(model):
    """The model's HybridInput (hooked in by hrpo.py's training or by `load_extras`)."""
    hyb = getattr(common.unwrap(model).get_input_embeddings(), "_hybrid_input", None)
    if hyb is None:
        common.die("a hybrid (HRPO) model needs its gate: load it with hrpo.load_extras (eval.py does)")
    return hyb


def encode_prompts(tokenizer, questions, cfg):
    """The prompts of a hybrid model: the question, plain or in the chat template with the system
    turn it was trained with. No marker opens the span: it is hybrid from the first token."""
    chat = cfg.get("prompt_format") == "chat"
    return [common.encode_prompt(tokenizer, q, chat, cfg.get("system_prompt", "")) for q in questions]


def hybrid_step(model, tokenizer, cfg, temperature=0.0, top_p=1.0, store=False):
    """The rollout step_fn of mode "hybrid": sample a token (greedy at temperature 0), compute h~ at
    the checkpoint's tau, and arm the hook so the next forward feeds the gated mix for rows still in
    their reasoning span. With `store`, the lists step.hs (N, d) and step.spans (N,) keep, per step,
    what training needs, and step.extras() stacks them ((N, T, d) and (N, T): common.generate puts
    them in r.extras)."""
    hyb = hybrid_input(model)
    emb = common.unwrap(model).get_input_embeddings()
    marker, tau = cfg.get("answer_marker", common.ANSWER_MARKER), cfg["tau"]
    pieces = {}  # token id -> its text

    def step(t, logits, hidden, done):
        if t == 0:
            step.tails, step.answered, step.hs, step.spans = [""] * len(done), [False] * len(done), [], []
        tok = common.sample_token(logits, temperature, top_p=top_p)
        h = hidden_representation(logits, emb.weight, tau)
        for b, i in enumerate(tok.tolist()):  # has the answer marker appeared, this token included?
            if not step.answered[b] and not done[b]:
                if i not in pieces:
                    pieces[i] = tokenizer.decode([i])
                step.tails[b] = (step.tails[b] + pieces[i])[-4 * len(marker):]
                step.answered[b] = marker in step.tails[b]
        span = ~torch.tensor(step.answered, device=done.device) & ~done
        hyb.arm(tok[:, None], h[:, None], span[:, None])
        if store:
            step.hs.append(h)
            step.spans.append(span)
        return tok, None, torch.full_like(done, common.TOKEN, dtype=torch.int8)

    if store:
        step.extras = lambda: {"h": torch.stack(step.hs, 1), "span": torch.stack(step.spans, 1)}
    return step


def reasoning(model, tokenizer, cfg, temperature=0.0, top_p=1.0):
    """How a hybrid checkpoint reasons, for evaluation (this file's and eval.py's): (prompts(questions)
    -> token ids, the hybrid rollout step at `temperature`)."""
    return functools.partial(encode_prompts, tokenizer, cfg=cfg), hybrid_step(model, tokenizer, cfg, temperature, top_p)


# ----------------------------------------------------------------------------------------------
# the algorithm: reward, group advantages, REINFORCE with a k3 KL

def reward(text, gold, strict_format=False):
    """1 for a correct final answer as eval.py checks it (`common.is_correct`), else 0. With
    `strict_format` (the paper's rule), also 0 unless the text has exactly one answer marker."""
    if strict_format and text.count(common.ANSWER_MARKER) != 1:
        return 0.0
    return float(common.is_correct(text, gold))


SCALE_REWARDS = {"group": "group", "batch": "batch", "none": "none", "true": "group", "false": "none"}  # TRL's values
LOSS_TYPES = {"grpo": "grpo", "dapo": "dapo", "dr_grpo": "dr_grpo",
              "seq-mean-token-mean": "grpo", "token-mean": "dapo"}                     # TRL's, and verl's aliases


def group_advantages(rewards, G, scale_rewards="group", batch_rewards=None, eps=1e-4):
    """A_i = (R_i - mean_group) / (std + eps) with the group's std ("group"), the std of
    `batch_rewards` (the whole batch, all ranks; default `rewards`: "batch"), or no division
    ("none"). All-equal groups give 0."""
    r = rewards.view(-1, G)
    centered = r - r.mean(1, keepdim=True)
    if scale_rewards == "none":
        return centered.flatten()
    std = r.std(1, keepdim=True) if scale_rewards == "group" else (rewards if batch_rewards is None else batch_rewards).std()
    return (centered / (std + eps)).flatten()


def k3_kl(logp, ref_logp):
    """exp(ref - new) - (ref - new) - 1: non-negative, 0 where the policies agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def reinforce_loss(logp, ref_logp, adv, loss_mask, beta, n_seqs, loss_type="grpo", n_tokens=None, max_len=None):
    """Per token -A log pi + beta k3, this micro-batch's share of the batch's loss. "grpo" (the
    paper's): the mean over each completion's tokens, summed / n_seqs (the batch's completions);
    "dapo": the token sum / n_tokens (the batch's tokens); "dr_grpo": the token sum / (n_seqs x
    max_len). Returns (loss, summed per-sequence KL)."""
    per_tok = -adv[:, None] * logp
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_tok = (per_tok + beta * kl) * loss_mask
    n_tok = loss_mask.sum(1).clamp(min=1)
    if loss_type == "dapo":
        loss = per_tok.sum() / n_tokens
    elif loss_type == "dr_grpo":
        loss = per_tok.sum() / (n_seqs * max_len)
    else:
        loss = (per_tok.sum(1) / n_tok).sum() / n_seqs
    return loss, ((kl * loss_mask).sum(1) / n_tok).sum().detach()


def hybrid_rollout(model, tokenizer, cfg, questions, num_generations, max_new_tokens, temperature, batch_size=0):
    """`num_generations` hybrid completions per question, sampled at tau, each ending at any stop id
    (`common.stop_ids`: an instruct model ends its turn with <|im_end|> or <|eot_id|>, not only the
    tokenizer's eos), generated `batch_size` rows at a time (0 = all). The h~ and span of every step
    are stored in r.extras for the training forward."""
    r = common.generate(model, encode_prompts(tokenizer, questions, cfg),
                        lambda: hybrid_step(model, tokenizer, cfg, temperature, store=True), max_new_tokens,
                        common.stop_ids(model, tokenizer), tokenizer.pad_token_id, num_generations, batch_size)
    r.extras["span"] = r.extras["span"] & r.mask.bool()
    return r


def completion_logprobs(model, r, rows, hyb=None):
    """log pi(token) at T = 1 of rollout rows `rows`, from one forward over prompt + completion
    (computed in chunks of positions: never whole logits). With `hyb`, the stored h~ and span are
    fed back through the gate (recomputed, with gradients); without, plain token inputs (the
    reference model)."""
    ids, mask, _, _ = r.inputs(rows)
    P = r.prompt_ids.shape[1]
    if hyb is not None:
        h, span = r.extras["h"][rows], r.extras["span"][rows]
        n = h.shape[0]
        hyb.arm(ids, torch.cat([h.new_zeros(n, P, h.shape[2]), h], 1),
                torch.cat([span.new_zeros(n, P), span], 1))
    return common.lm_logprobs(model, ids, mask, common.positions(mask), r.tokens[rows])[0].token


def main(args):
    if not 0 < args.r_min <= args.r_max < 1:
        common.die(f"need 0 < --r_min <= --r_max < 1 (got {args.r_min}, {args.r_max})")
    if args.temperature <= 0:
        common.die(f"--temperature (tau) must be > 0: rollouts sample and h~ divides by it (got {args.temperature})")
    if args.distributed not in ("ddp", "fsdp"):
        common.die(f"unknown --distributed {args.distributed!r} (ddp | fsdp)")
    if args.loss_type not in LOSS_TYPES:
        common.die(f"unknown --loss_type {args.loss_type!r} ({' | '.join(LOSS_TYPES)})")
    if args.scale_rewards not in SCALE_REWARDS:
        common.die(f"unknown --scale_rewards {args.scale_rewards!r} ({' | '.join(SCALE_REWARDS)})")
    loss_type, scale_rewards = LOSS_TYPES[args.loss_type], SCALE_REWARDS[args.scale_rewards]
    d = common.setup_distributed(args.seed)   # seeds python, numpy and torch with seed + rank
    common.check_args(args, d)
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)  # fp32 master weights
    common.check_start(cfg, (None, "cot", "hybrid"), "hrpo.py")  # HRPO starts from language reasoning (or continues)
    cfg = dict(cfg or {"mode": "cot"})
    train, test = common.load_train_eval(args, cfg)
    cfg.update(common.prompt_settings(args, cfg, train))  # chat template and system turn: saved, so eval.py prompts the same
    bf16 = common.use_bf16(args.bf16, d.device)
    d_model = model.get_input_embeddings().weight.shape[1]
    # ---- the reference (base model, no gate), the gate, the adapters: the same on every rank
    torch.manual_seed(args.seed)
    ref = None
    if args.beta > 0 and args.lora_r == 0:  # with LoRA the reference is the policy with its adapters off
        ref = copy.deepcopy(model).to(torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
        if args.distributed == "fsdp":
            ref = common.wrap_model(ref, d, "fsdp")
    gate = Gate(d_model, args.c, args.r_min, args.r_max, args.interp_weight if args.no_gate else None).to(d.device)
    if cfg["mode"] == "hybrid":  # continue training an HRPO checkpoint: its own gate
        common.load_extra_module(args.model_name_or_path, "gate", gate)
    hyb = HybridInput(model, gate)
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    torch.manual_seed(args.seed + d.rank)     # back to this rank's own stream for the rollouts
    model = common.wrap_model(model, d, args.distributed, bf16)
    gate_params = [p for n, p in gate.named_parameters() if n != "Lambda"]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": args.learning_rate},
        {"params": gate_params, "lr": args.gate_learning_rate},
        {"params": [gate.Lambda], "lr": args.lambda_learning_rate, "weight_decay": 0.0},
    ], lr=args.learning_rate, weight_decay=args.weight_decay)
    cfg.update(mode="hybrid", tau=args.temperature, answer_marker=common.ANSWER_MARKER,
               gate={"c": args.c, "interp_weight": args.interp_weight if args.no_gate else None},
               method="hrpo", base_model=args.model_name_or_path, lora_r=args.lora_r)
    G = args.num_generations
    rng = random.Random(args.seed)
    # ---- intermediate checkpoints (--save_steps) and --resume_from_checkpoint: the model (its
    # adapters with LoRA), the gate, AdamW, the data order and every random state
    state = common.TrainState(args, d, {"model": model, "gate": gate}, [optimizer], rngs=[rng])
    start_step, extra = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=start_step)
    n_rows = args.train_batch_size // d.world * G          # rollouts per step on this rank
    seq_len = max(len(p) for p in encode_prompts(tokenizer, [ex["question"] for ex in train[:1000]], cfg)) + args.max_completion_length
    common.print_memory_plan(model, d, args, min(args.micro_batch_size, n_rows), seq_len, args.generation_batch_size or n_rows,
                             seq_len, frozen=ref, extra_modules=[gate])

    def run_eval(step):
        hyb.reset_stats()
        res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                              max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
        logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"],
                    "eval_hidden_ratio": common.all_mean(hyb.hidden_ratio, d)}, step)
        return {"pass@1": res["pass@1"], "mean_L": res["mean_L"]}

    start = extra["start"] if start_step else run_eval(0)   # a resumed run has it from its checkpoint
    hidden_ratio = extra.get("hidden_ratio", float("nan"))
    for step in tqdm(range(start_step + 1, args.max_steps + 1), desc="hrpo", initial=start_step, total=args.max_steps,
                     disable=not d.main):
        times = {}
        # ---- rollout: G hybrid completions per prompt, sampled at tau, h~ and the span stored
        picks = rng.sample(range(len(train)), args.train_batch_size)[d.rank::d.world]
        batch = [train[i] for i in picks]
        model.eval()
        hyb.reset_stats()
        with common.timer(times, "rollout_s"):
            r = hybrid_rollout(model, tokenizer, cfg, [ex["question"] for ex in batch], G, args.max_completion_length,
                               args.temperature, args.generation_batch_size)
        times["rollout_tok_per_s"] = r.lengths.sum().item() / times["rollout_s"]
        hidden_ratio = hyb.hidden_ratio
        texts = [common.decode_completion(tokenizer, r, i) for i in range(len(r.tokens))]
        rewards = torch.tensor([reward(t, batch[i // G]["answer"], args.strict_format) for i, t in enumerate(texts)],
                               device=d.device)
        adv = group_advantages(rewards, G, scale_rewards, common.all_gather(rewards, d) if scale_rewards == "batch" else None)
        loss_mask = r.mask.float()  # every generated position is a sampled token
        # ---- the reference log-probs: the base model, no gate, plain token inputs
        with common.timer(times, "update_s"):
            N, micro = len(r.tokens), args.micro_batch_size
            n_tokens = common.all_sum(loss_mask.sum().item(), d) / d.world  # "dapo": DDP's mean over ranks makes it the global token mean
            ref_logp = None
            if args.beta > 0:
                with torch.no_grad():
                    if ref is not None:
                        ref_logp = torch.cat([completion_logprobs(ref, r, slice(i, i + micro)) for i in range(0, N, micro)])
                    else:
                        with common.unwrap(model).disable_adapter():
                            ref_logp = torch.cat([completion_logprobs(common.unwrap(model), r, slice(i, i + micro))
                                                  for i in range(0, N, micro)])
            # ---- one REINFORCE update on the whole batch, gates recomputed from the stored h~
            model.train()
            loss_sum = kl_sum = 0.0
            for i in range(0, N, micro):
                rows = slice(i, min(i + micro, N))
                logp = completion_logprobs(model, r, rows, hyb)
                loss, kl = reinforce_loss(logp, ref_logp[rows] if ref_logp is not None else None, adv[rows],
                                          loss_mask[rows], args.beta, N, loss_type, n_tokens, args.max_completion_length)
                loss.backward()
                loss_sum += loss.item()
                kl_sum += kl.item()
            common.average_gradients([gate], d)
            grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
            gate_grad_norm = float(torch.nn.utils.clip_grad_norm_(gate.parameters(), args.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # ---- logging
        groups = rewards.view(-1, G)
        row = {"reward": rewards.mean().item(), "reward_std": groups.std(1).mean().item(),
               "frac_zero_std": (groups.std(1) == 0).float().mean().item(),
               "completion_length": loss_mask.sum(1).mean().item(), "hybrid_length": r.extras["span"].sum(1).float().mean().item(),
               "hidden_ratio": hidden_ratio, "truncated": 1 - r.finished.float().mean().item(), "loss": loss_sum,
               "grad_norm": grad_norm, "gate_grad_norm": gate_grad_norm, **times}
        if args.beta > 0:
            row["kl"] = kl_sum / N
        logger.log({k: common.all_mean(v, d) if k not in times else v for k, v in row.items()}, step)
        if args.log_completions:
            common.write_completions(args.output_dir, step, [
                {"question": batch[i // G]["question"], "completion": texts[i], "reward": rewards[i].item()}
                for i in range(0, len(texts), G)], d)
        if step % args.eval_every == 0 and step != args.max_steps:
            run_eval(step)
        state.maybe_save(step, tokenizer, cfg, extra={"start": start, "hidden_ratio": hidden_ratio}, extra_modules={"gate": gate})
    final = run_eval(args.max_steps)
    # ---- save: merged weights (plain transformers loads them), gate.safetensors, latent_config.json
    common.finish(model, tokenizer, cfg, args, d, final, start, ["reward", "eval_acc", "completion_length", "hidden_ratio", "kl"],
                  extra_modules={"gate": gate}, note=f"hidden ratio {hidden_ratio:.4f}")
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
