"""ATP-Latent: active latent planning with a conditional VAE and a coherence reward.

Paper: Zheng and Lee 2026, "Beyond Imitation: Reinforcement Learning for Active Latent Planning"
(seed 003, arXiv 2601.21598, github zz1358m/ATP-Latent-master). Spec: ../shared/ALGORITHMS.md,
section 8.

Coconut's latents imitate one arbitrary chain of thought. ATP-Latent makes each latent a sample
of a conditional VAE, so the latent space is smooth and can be explored, and then plans in it
with RL. Two phases in this one file:

SFT (Coconut-style curriculum from a CoT model). Stage s replaces the first min(s, max_latent_stage)
steps by c_thought latent slots each. The vector fed at a latent slot is not the previous hidden
state h itself but z = mu + sigma * eps, with (mu, log sigma^2) = VAEHead(h), and the loss adds
kl_weight * KL(N(mu, sigma^2) || N(0, I)). A decoder (a copy of the start model) reads each pair
of latents [z_{2j-1}, z_{2j}] as input vectors and learns with cross-entropy to write step j's
text ("<<3*4=12>>" EOS): the VAE's reconstruction term, whose gradient also reaches the LM and the
VAE head through z. A stop head (MLP -> 2 logits: continue, stop) on the hidden state after every
c_thought-th latent learns when the latent span ends (stop after the example's last latent pair).
Loss = CE(answer tokens) + decoder_weight * CE(decoder) + kl_weight * KL + stop_weight * CE(stop).

RL (from the SFT model). A rollout feeds z ~ N(mu, sigma^2) at each latent slot; every c_thought
latents the stop head's decision is sampled; after the stop (or max_latents) <|end-latent|>, then
the answer is sampled. The log-probability of a latent position is sum_d log N(z_d; mu_d, sigma_d)
(+ log p(continue) at the latent that follows a stop check); a stop position carries log p(stop).
These and the answer tokens' log-probs go into a PPO-clipped loss, log-ratio clamped to
[-log_ratio_clamp, log_ratio_clamp], no KL, aggregated as the authors' code does: per rollout, the
mean over its latent positions plus the mean over its answer positions (with the stop decision),
then the mean over rollouts. Reward = correct + format_weight * format + coherence_weight *
coherence * correct, where coherence: the frozen decoder decodes each latent pair into a step; a
step before the last counts if its result is an operand of a later step, the last step if its
result is the final answer (only the last one is compared with the answer, as in the authors'
code); coherence = counted steps / decoded steps, and 1.0 when no step is decoded (their code).
Group-normalised advantages (GRPO).

eval.py runs the result (mode "atp": mean latent z = mu, the stop head's argmax) and, with
`--show_latents`, prints the decoder's reading of each latent pair.

Deviations and choices (numbered, so the README can refer to them):
1. The VAE head: h -> Linear(d, d) -> GELU, then mu = LayerNorm(Linear(d, d)(.)) and
   log sigma^2 = Linear(d, d)(.) (initialised to `--init_logvar`, clamped to [-10, 4]). The spec
   says "MLP d->d, GELU, d->d, LayerNorm gives mu, log sigma^2"; we split the last layer in two.
2. The decoder reads only the two latent vectors (no question, no earlier steps) and is trained
   jointly with the LM during SFT (its CE gradient reaches the LM through z); it is frozen in RL
   (a bf16 copy with --bf16). It writes a step until any stop id (`common.stop_ids`: SFT teaches
   the tokenizer's eos; an instruct model may end with its end of turn), as every rollout ends.
3. The stop head is trained at every stage (stop after the last latent pair of that stage); at
   inference a row thinks at least c_thought latents and at most max_latents (then the end is
   forced and not scored).
4. Step counts instead of epochs (`--steps_per_stage`); the optimizer is reset at each stage as in
   Coconut. Greedy evaluation (pass@1, #L) after each stage and at the start and end of RL.
5. Defaults are sized for the toy task: SFT lr 1e-3 (as coconut_sft.py), 4 stages x 100 steps of
   64 examples; RL lr 5e-5 for 30 steps of 16 prompts x 8 rollouts (about 24 minutes for both at
   one thread on a shared 2-core CPU). The paper uses lr 1e-6 and group 8 in RL on LLaMA-3.2-1B
   (the real-model commands below). Real models: starts are a plain or CoT model (SFT from stage
   1; stage 0, language CoT, is coconut_sft.py's) or an ATP checkpoint (RL); --dataset is required
   (with reasoning steps for SFT; a single local file gives a held-out tenth to evaluation);
   --chat_template and --system_prompt shape the prompts of SFT, RL and eval.py alike (saved in
   latent_config.json); --bf16 computes in bf16 over fp32 master weights; the LM and decoder are
   saved in the start model's published dtype (--save_dtype). Each phase reads only its own flags
   (their help says SFT: or RL:); a run that skips a phase notes the flags of that phase it got.
6. Old log-probs are recomputed with a no-grad forward before the update (as verl does).
7. Under torchrun the LM is wrapped by FSDP2/DDP; the heads and the decoder are small or frozen,
   kept whole on every rank, and their gradients are averaged by an all-reduce.
8. --phase: "" (default) runs SFT then RL when --model is not an ATP checkpoint (the SFT checkpoint
   is saved to <output_dir>-sft), and RL alone when it is; "sft" or "rl" runs one phase.
9. Coherence compares numbers (a result with a later step's operands, the last result with the
   extracted final answer); the authors' code tests substrings of the decoded text, under which
   an unparsable step's empty result, or "1" inside "12", counts as used.
10. The answer's EOS token is scored; the authors' answer mask drops it (their pad id is the EOS).

Commands:
    python atp_latent.py                                    # toy: CoT checkpoint -> SFT -> RL (runs/atp_latent)
    python eval.py --model runs/atp_latent --show_latents   # pass@1, #L, decoded latent steps
    python atp_latent.py --phase sft --output_dir runs/atp_sft
    python atp_latent.py --phase rl --model runs/atp_sft --output_dir runs/atp_rl
    python coconut_sft.py --model meta-llama/Llama-3.2-1B-Instruct --dataset whynlp/gsm8k-aug --chat_template \\
        --start_stage 0 --end_stage 0 --learning_rate 1e-4 --epochs_per_stage 3 --output_dir runs/llama-cot
    python atp_latent.py --phase sft --model runs/llama-cot --dataset whynlp/gsm8k-aug --chat_template \\
        --sft_learning_rate 1e-4 --steps_per_stage 3000 --sft_batch_size 128 --micro_batch_size 16 \\
        --max_completion_length 256 --output_dir runs/llama-atp-sft
    python atp_latent.py --phase rl --model runs/llama-atp-sft --dataset whynlp/gsm8k-aug --chat_template \\
        --learning_rate 1e-6 --num_generations 8 --train_batch_size 64 --mini_batch_size 16 --micro_batch_size 16 \\
        --max_completion_length 256 --output_dir runs/llama-atp
    torchrun --nproc_per_node 8 atp_latent.py --phase rl --model runs/llama-atp-sft --dataset whynlp/gsm8k-aug --chat_template ...
    python eval.py --model runs/llama-atp --dataset whynlp/gsm8k-aug --max_completion_length 256 --show_latents
"""
import copy
import json
import math
import random
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache

import coconut_sft
import common
from eval import evaluate


@dataclass
class Args:
    model_name_or_path: str = field(default=common.TOY_COT, metadata={"aliases": ["--model"], "help": "a plain or CoT model (SFT first) or an ATP checkpoint (RL)"})
    phase: str = field(default="", metadata={"help": "sft | rl | '' (SFT then RL, or RL alone from an ATP checkpoint)"})
    dataset: str = field(default="", metadata={"help": "training data with reasoning steps (SFT): a hub dataset, a local .jsonl/.parquet, or toy (the default only for the toy model)"})
    eval_dataset: str = field(default="", metadata={"help": "evaluation data; default: the test split of --dataset (a single file: a held-out tenth of it)"})
    output_dir: str = field(default="runs/atp_latent", metadata={"help": "where the checkpoint, metrics.jsonl and plots go (SFT then RL: the SFT checkpoint goes to <output_dir>-sft)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    chat_template: bool = field(default=False, metadata={"help": "format prompts with the tokenizer's chat template, in SFT and RL (kept from the checkpoint if it was trained so)"})
    system_prompt: str = field(default="auto", metadata={"help": "system turn with --chat_template; auto = the checkpoint's, else the answer format the reward checks"})
    # --- SFT (Coconut-style curriculum with a VAE, a decoder and a stop head)
    c_thought: int = field(default=2, metadata={"help": "SFT: latents per replaced step (RL reads it from the checkpoint)"})
    max_latent_stage: int = field(default=3, metadata={"help": "SFT: at most this many steps become latents (RL reads it from the checkpoint)"})
    start_stage: int = field(default=1, metadata={"help": "SFT: first curriculum stage (>= 1; the language CoT stage 0 is coconut_sft.py --end_stage 0)"})
    end_stage: int = field(default=-1, metadata={"help": "SFT: last stage; -1 = max_latent_stage + 1 (every step latent)"})
    steps_per_stage: int = field(default=100, metadata={"help": "SFT: optimizer steps per stage"})
    sft_batch_size: int = field(default=64, metadata={"help": "SFT: examples per optimizer step, all ranks together"})
    sft_learning_rate: float = field(default=1e-3, metadata={"help": "SFT: AdamW learning rate (LM, heads and decoder)"})
    kl_weight: float = field(default=0.001, metadata={"help": "SFT: weight of the VAE's KL to N(0, I)"})
    decoder_weight: float = field(default=1.0, metadata={"help": "SFT: weight of the decoder's cross-entropy"})
    stop_weight: float = field(default=1.0, metadata={"help": "SFT: weight of the stop head's cross-entropy"})
    init_logvar: float = field(default=-4.0, metadata={"help": "SFT: initial log sigma^2 of the VAE head"})
    log_every: int = field(default=10, metadata={"help": "SFT: log every N steps"})
    micro_batch_size: int = field(default=64, metadata={"help": "examples (SFT) or rollouts (RL) per forward on one rank"})
    # --- RL
    num_generations: int = field(default=8, metadata={"help": "RL: G, rollouts per prompt"})
    train_batch_size: int = field(default=16, metadata={"help": "RL: prompts per step, all ranks together"})
    mini_batch_size: int = field(default=8, metadata={"help": "RL: prompts per optimizer update"})
    num_iterations: int = field(default=1, metadata={"help": "RL: passes over each batch"})
    epsilon: float = field(default=0.2, metadata={"help": "RL: PPO clip range"})
    log_ratio_clamp: float = field(default=3.0, metadata={"help": "RL: the log-ratio is clamped to [-c, c]"})
    format_weight: float = field(default=0.5, metadata={"help": "RL: reward weight of the format bonus"})
    coherence_weight: float = field(default=0.1, metadata={"help": "RL: reward weight of coherence (times correct)"})
    temperature: float = field(default=1.0, metadata={"help": "RL: answer sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "RL: answer nucleus sampling"})
    learning_rate: float = field(default=5e-5, metadata={"help": "RL: AdamW learning rate (LM and heads)"})
    max_steps: int = field(default=30, metadata={"help": "RL: steps"})
    max_step_tokens: int = field(default=24, metadata={"help": "RL: tokens the decoder writes per latent pair"})
    eval_every: int = field(default=15, metadata={"help": "RL: evaluate every N steps"})
    log_completions: bool = field(default=False, metadata={"help": "RL: write one completion per prompt to completions.jsonl"})
    # --- shared
    max_completion_length: int = field(default=48, metadata={"help": "generated positions per rollout and evaluation, latents included"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (the LM, and the heads and decoder apart)"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N training rows (0 = all)"})
    max_eval_samples: int = field(default=200, metadata={"help": "evaluation questions (0 = all)"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "bf16 compute on fp32 master weights; default: on for a bf16-capable GPU, off on CPU"})
    save_dtype: str = field(default="auto", metadata={"help": "dtype of the saved weights (LM and decoder): auto (the start model's published dtype) | float32 | bfloat16"})
    distributed: str = field(default="fsdp", metadata={"help": "under torchrun: fsdp (FSDP2) | ddp"})
    track: bool = field(default=False, metadata={"help": "log to Weights & Biases"})


# the flags only one phase reads (the others are read by both)
SFT_ONLY = {"c_thought", "max_latent_stage", "start_stage", "end_stage", "steps_per_stage", "sft_batch_size",
            "sft_learning_rate", "kl_weight", "decoder_weight", "stop_weight", "init_logvar", "log_every"}
RL_ONLY = {"num_generations", "train_batch_size", "mini_batch_size", "num_iterations", "epsilon", "log_ratio_clamp",
           "format_weight", "coherence_weight", "temperature", "top_p", "learning_rate", "max_steps", "max_step_tokens",
           "eval_every", "log_completions"}


def unread_flags(args, phases):
    """The flags set away from their defaults that none of the running `phases` reads."""
    skipped = (SFT_ONLY if "sft" not in phases else set()) | (RL_ONLY if "rl" not in phases else set())
    return [f.name for f in fields(Args) if f.name in skipped and getattr(args, f.name) != f.default]


# ----------------------------------------------------------------------------------------------
# the heads: a conditional VAE over the fed-back vector, and the stop decision

class VAEHead(nn.Module):
    """h (the hidden state before a latent slot) -> (mu, log sigma^2) of the latent fed there."""

    def __init__(self, d, init_logvar=-4.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, d), nn.GELU())
        self.mu = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.logvar = nn.Linear(d, d)
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, init_logvar)

    def forward(self, h):
        x = self.body(h.to(self.logvar.weight.dtype))
        return self.mu(x), self.logvar(x).clamp(-10.0, 4.0)


class StopHead(nn.Module):
    """h (the hidden state after every c_thought-th latent) -> logits of (continue, stop)."""

    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 2))

    def forward(self, h):
        return self.net(h.to(self.net[0].weight.dtype))


class ATPHeads(nn.Module):
    def __init__(self, d, init_logvar=-4.0):
        super().__init__()
        self.vae, self.stop = VAEHead(d, init_logvar), StopHead(d)


CONTINUE, STOP = 0, 1


def gaussian_kl(mu, logvar):
    """KL(N(mu, diag sigma^2) || N(0, I)) summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def gaussian_logprob(z, mu, logvar):
    """log N(z; mu, diag sigma^2), summed over the last dimension."""
    return (-0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + math.log(2 * math.pi))).sum(-1)


def sample_latent(mu, logvar):
    """z = mu + sigma * eps (the reparameterisation: gradients reach mu and sigma)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# heads are attached to the LM as a plain attribute (not a submodule, so they stay out of
# model.safetensors and plain transformers still loads the LM); each has its own safetensors file

def attach_heads(model, heads):
    object.__setattr__(common.unwrap(model), "atp_heads", heads)
    return heads


def load_heads(folder, d, device=None, dtype=torch.float32):
    heads = ATPHeads(d)
    for name, module in (("vae_head", heads.vae), ("stop_head", heads.stop)):
        common.load_extra_module(folder, name, module)
    return heads.to(device=device, dtype=torch.float32 if dtype is None else dtype)


# ----------------------------------------------------------------------------------------------
# the rollout step: latents from the VAE head, a stop decision every c_thought latents

class ATPStep:
    """A step_fn for ATP-Latent models whose prompt ends with <|start-latent|>.

    While a row thinks it is fed z (sampled from N(mu, sigma^2) when `sample`, else mu). After
    every c_thought-th latent the stop head decides (sampled when `sample`, else argmax); a stop
    feeds <|end-latent|> (FORCED kind; its log p(stop) is scored by the RL loss through the
    recorded `check`). At max_latents the end is forced and not scored. Then tokens are sampled.
    `extras()["check"]` (N, T): 1 = a stop check said continue (this latent carries log
    p(continue)), 2 = the check said stop, 0 = no check."""

    def __init__(self, model, cfg, tokenizer, temperature=0.0, top_k=0, top_p=1.0, sample=None):
        self.heads = getattr(common.unwrap(model), "atp_heads", None)
        if self.heads is None:
            common.die("an ATP-Latent model needs its VAE and stop heads (vae_head/stop_head.safetensors)")
        _, self.end_id, self.latent_id = common.require_tokens(
            tokenizer, [common.START_LATENT, common.END_LATENT, common.LATENT], "an ATP-Latent model")
        self.c, self.max_latents = cfg["c_thought"], cfg["max_latents"]
        self.sample = temperature > 0 if sample is None else sample
        self.sampling = (temperature, top_k, top_p)
        self.checks, self.thinking = [], None

    def __call__(self, t, logits, hidden, done):
        if t == 0:
            self.checks, self.thinking = [], torch.ones_like(done)
        # every row thinks from t = 0, so t is the number of latents fed so far
        check = self.thinking & (t > 0) & (t % self.c == 0)
        stop = torch.zeros_like(check)
        if check.any():
            p = self.heads.stop(hidden).float().softmax(-1)
            decide = torch.multinomial(p, 1).squeeze(-1) if self.sample else p.argmax(-1)
            stop = check & (decide == STOP)
        forced = self.thinking & ~stop & (t >= self.max_latents)
        latent = self.thinking & ~stop & ~forced
        mu, logvar = self.heads.vae(hidden)
        z = sample_latent(mu, logvar) if self.sample else mu
        tokens = common.sample_token(logits, *self.sampling)
        tokens = torch.where(latent, self.latent_id, torch.where(stop | forced, self.end_id, tokens))
        kinds = torch.full_like(tokens, common.TOKEN, dtype=torch.int8)
        kinds = kinds.masked_fill(latent, common.LATENT_STEP).masked_fill(stop | forced, common.FORCED)
        self.checks.append((check & latent).to(torch.int8) + 2 * stop.to(torch.int8))
        self.thinking = latent
        return tokens, z.to(hidden.dtype), kinds

    def extras(self):
        return {"check": torch.stack(self.checks, 1)} if self.checks else {}


# ----------------------------------------------------------------------------------------------
# the decoder: each pair of latents -> that step's text; the coherence of the decoded steps

@torch.no_grad()
def decode_latent_pairs(decoder, tokenizer, latents, c, max_tokens=24):
    """Greedy decoding of every c consecutive latents of every row (latents: list of (n_i, d)
    tensors); a step ends at any stop id (`common.stop_ids`: the tokenizer's eos, which SFT
    teaches, and an instruct model's end of turn). Returns, per row, the list of decoded step texts."""
    pairs = [(i, row[j:j + c]) for i, row in enumerate(latents) for j in range(0, len(row) - c + 1, c)]
    out = [[] for _ in latents]
    if not pairs:
        return out
    dec = common.unwrap(decoder)
    device = next(dec.parameters()).device
    vec = torch.stack([p for _, p in pairs]).to(device)
    M, eos = len(pairs), tokenizer.eos_token_id
    stop_list = common.stop_ids(decoder, tokenizer)
    stops = torch.tensor(stop_list, device=device)
    ids = torch.full((M, c), eos, dtype=torch.long, device=device)
    mask = torch.ones((M, c + max_tokens), dtype=torch.long, device=device)
    cache = DynamicCache(config=dec.config)
    pos = torch.arange(c, device=device).expand(M, c)
    logits, _ = common.lm_forward(decoder, ids, mask[:, :c], pos, cache, torch.ones_like(ids, dtype=torch.bool), vec)
    done = torch.zeros(M, dtype=torch.bool, device=device)
    written = []
    for t in range(max_tokens):
        tok = logits[:, -1].argmax(-1).masked_fill(done, eos)
        written.append(tok)
        done |= torch.isin(tok, stops)
        if done.all():
            break
        logits, _ = common.lm_forward(decoder, tok[:, None], mask[:, :c + t + 1], torch.full((M, 1), c + t, device=device), cache)
    written = torch.stack(written, 1).tolist()
    for (i, _), toks in zip(pairs, written):
        toks = toks[:next((k for k, x in enumerate(toks) if x in stop_list), len(toks))]
        out[i].append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


STEP = re.compile(r"<<([^=<>]*)=([^<>]*)>>")


def parse_step(text):
    """ "<<3*4=12>>" -> ([3, 4], 12) (exact Decimals); None if the text is not a step with a numeric result."""
    m = STEP.search(text)
    if not m:
        return None
    result = common.NUMBER.search(m.group(2))
    if not result:
        return None
    return [common._as_number(x) for x in common.NUMBER.findall(m.group(1))], common._as_number(result.group(0))


def coherence_score(steps, answer):
    """The fraction of decoded steps whose result is used, as the authors' code counts it: a step
    before the last counts if its result is an operand of a later step, the last step if its result
    is the final answer. Steps that do not parse count as unused; no decoded step gives 1.0."""
    if not steps:
        return 1.0
    parsed = [parse_step(s) for s in steps]
    final = common._as_number(answer) if answer is not None else None
    used = 0
    for i, p in enumerate(parsed[:-1]):
        used += p is not None and any(p[1] == x for q in parsed[i + 1:] if q for x in q[0])
    used += parsed[-1] is not None and final is not None and parsed[-1][1] == final
    return used / len(steps)


def has_format(text, finished):
    """The format bonus: the completion ended (EOS) and gives "### <number>"."""
    return bool(finished) and re.search(re.escape(common.ANSWER_MARKER) + r"\s*-?\d", text) is not None


def rollout_latents(r):
    """Per row, the latent vectors it was fed, in order: a list of (n_i, d) tensors."""
    if r.latents is None:
        return [r.tokens.new_zeros((0, 1)).float() for _ in range(len(r.tokens))]
    is_lat = (r.kinds == common.LATENT_STEP) & r.mask.bool()
    return [r.latents[i][is_lat[i]] for i in range(len(r.tokens))]


def decode_latents(model, tokenizer, cfg, questions, decoder=None, max_tokens=24):
    """eval.py --show_latents: greedy rollouts of `questions`, and the decoder's reading of each
    latent pair. Returns per question (completion, [decoded steps])."""
    decoder = decoder or getattr(common.unwrap(model), "atp_decoder", None)
    if decoder is None:
        common.die("--show_latents needs the checkpoint's decoder/ folder (an ATP-Latent checkpoint)")
    step = ATPStep(model, cfg, tokenizer)
    prompts = common.reasoning_prompts(tokenizer, questions, cfg)
    r = common.rollout(model, prompts, step, cfg["max_latents"] + 64, common.stop_ids(model, tokenizer), tokenizer.pad_token_id)
    steps = decode_latent_pairs(decoder, tokenizer, rollout_latents(r), cfg["c_thought"], max_tokens)
    return [(common.decode_completion(tokenizer, r, i), steps[i]) for i in range(len(questions))]


def load_decoder(folder, device, dtype):
    path = Path(folder) / "decoder"
    if not (path / "config.json").is_file():
        common.die(f"{folder} has no decoder/ folder (not a complete ATP-Latent checkpoint)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# SFT: Coconut's multi-pass forward with sampled latents; decoder, KL and stop losses

def build_example(tokenizer, ex, stage, args, special, cfg, end_id=None):
    """Coconut's step-wise example (prompt + <start>, n latents, tail, labels) plus the token ids
    of the steps the latents replace (the decoder's targets). The prompt is the one RL and eval.py
    give the checkpoint (`common.reasoning_prompts` with `cfg`: chat template, system turn, then
    <|start-latent|>)."""
    ns = SimpleNamespace(removal="step", c_thought=args.c_thought, max_latent_stage=args.max_latent_stage,
                         chat_template=False, system_prompt="")
    _, n_latent, tail, labels = coconut_sft.build_example(tokenizer, ex, stage, ns, special, 1, end_id=end_id)
    prompt = common.encode_prompt(tokenizer, ex["question"], cfg["prompt_format"] == "chat", cfg["system_prompt"]) + special[:1]
    targets = [tokenizer.encode(s, add_special_tokens=False) + [tokenizer.eos_token_id]
               for s in ex["steps"][:n_latent // args.c_thought]]
    return (prompt, n_latent, tail, labels), targets


def atp_forward(model, heads, ids, mask, n_latent, c0):
    """coconut_forward with z ~ N(mu, sigma^2) from the VAE head fed at latent slot c0 + k instead of
    the hidden state. Returns logits (B, L, V), mu, logvar, z (B, n_max, d) and the hidden state
    after each latent slot (B, n_max, d) for the stop head."""
    pos = common.positions(mask)
    n_max = common.global_max(n_latent.max())  # the same number of passes on every rank
    cache = DynamicCache(config=common.unwrap(model).config)
    logits, hidden = common.lm_forward(model, ids[:, :c0], mask[:, :c0], pos[:, :c0], cache)
    chunks, mus, logvars, zs, after = [logits], [], [], [], []
    for k in range(n_max):
        a, b = c0 + k, (c0 + k + 1 if k < n_max - 1 else ids.shape[1])
        is_latent = torch.zeros((ids.shape[0], b - a), dtype=torch.bool, device=ids.device)
        is_latent[:, 0] = k < n_latent
        mu, logvar = heads.vae(hidden[:, -1])
        z = sample_latent(mu, logvar)
        logits, hidden = common.lm_forward(model, ids[:, a:b], mask[:, :b], pos[:, a:b], cache, latent_mask=is_latent,
                                           latent_vectors=z.to(hidden.dtype)[:, None].expand(-1, b - a, -1))
        chunks.append(logits)
        mus.append(mu), logvars.append(logvar), zs.append(z), after.append(hidden[:, 0])
    return torch.cat(chunks, 1), torch.stack(mus, 1), torch.stack(logvars, 1), torch.stack(zs, 1), torch.stack(after, 1)


def decoder_loss(decoder, zs, n_latent, targets, c, pad_id):
    """CE of the decoder writing step j's text from latents [jc, (j+1)c) of its row (sum, count)."""
    vecs, seqs = [], []
    for i, tg in enumerate(targets):
        for j, t in enumerate(tg):
            if (j + 1) * c <= int(n_latent[i]):
                vecs.append(zs[i, j * c:(j + 1) * c])
                seqs.append(t)
    if not seqs:
        return zs.sum() * 0, 0
    device = zs.device
    width = c + max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for m, s in enumerate(seqs):
        ids[m, c:c + len(s)] = torch.tensor(s, device=device)
        labels[m, c:c + len(s)] = torch.tensor(s, device=device)
        mask[m, :c + len(s)] = 1
    lat_mask = torch.zeros_like(ids, dtype=torch.bool)
    lat_mask[:, :c] = True
    vec = torch.zeros(ids.shape + (zs.shape[-1],), dtype=zs.dtype, device=device)
    vec[:, :c] = torch.stack(vecs)
    logits, _ = common.lm_forward(decoder, ids, mask, common.positions(mask), latent_mask=lat_mask, latent_vectors=vec)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def stop_targets(n_latent, n_max, c):
    """Where the stop head is trained, and its label: after latent m = c, 2c, ... <= n of a row,
    label STOP if m == n else CONTINUE. Returns (checked (B, n_max) bool, labels (B, n_max))."""
    m = torch.arange(1, n_max + 1, device=n_latent.device)[None]
    checked = (m % c == 0) & (m <= n_latent[:, None])
    return checked, (m == n_latent[:, None]).long()


def run_sft(args, d, model, tokenizer, heads, decoder, train, test, logger, special, base):
    end = args.max_latent_stage + 1 if args.end_stage < 0 else args.end_stage
    stages = list(range(args.start_stage, end + 1))
    batch_size = args.sft_batch_size
    per_rank, micro = batch_size // d.world, min(args.micro_batch_size, batch_size // d.world)
    params = [p for m in (model, heads, decoder) for p in m.parameters()]
    step, cfg = 0, None
    for stage in stages:
        stage_cfg = atp_config(args, stage, "sft", base)
        end_id = common.answer_end_id(tokenizer, stage_cfg, common.stop_ids(model, tokenizer))  # chat: end of turn
        optimizer = torch.optim.AdamW(params, lr=args.sft_learning_rate, weight_decay=args.weight_decay)  # reset per stage
        model.train(), heads.train(), decoder.train()
        rng = random.Random(args.seed * 1000 + stage)
        t0 = time.time()
        for i in tqdm(range(args.steps_per_stage), desc=f"sft stage {stage}", disable=not d.main):
            batch = rng.sample(range(len(train)), batch_size)[d.rank::d.world]
            exs = [build_example(tokenizer, train[j], stage, args, special, stage_cfg, end_id) for j in batch]
            n_tok = common.all_sum(sum(sum(y != -100 for y in ex[0][3]) for ex in exs), d)
            stats = {"ce": 0.0, "dec_ce": 0.0, "kl": 0.0, "stop_ce": 0.0, "stop_acc": 0.0, "sigma": 0.0}
            for m0 in range(0, len(exs), micro):
                part = exs[m0:m0 + micro]
                w = len(part) / per_rank
                ids, mask, labels, n_latent, c0 = coconut_sft.collate([e[0] for e in part], tokenizer.pad_token_id, d.device)
                logits, mu, logvar, zs, after = atp_forward(model, heads, ids, mask, n_latent, c0)
                ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
                is_lat = torch.arange(mu.shape[1], device=d.device)[None] < n_latent[:, None]
                kl = (gaussian_kl(mu, logvar) * is_lat).sum() / is_lat.sum().clamp(min=1)
                dec_sum, dec_n = decoder_loss(decoder, zs, n_latent, [e[1] for e in part], args.c_thought, tokenizer.pad_token_id)
                dec = dec_sum / max(1, dec_n)
                checked, target = stop_targets(n_latent, mu.shape[1], args.c_thought)
                stop_logits = heads.stop(after[checked])
                stop = F.cross_entropy(stop_logits.float(), target[checked]) if checked.any() else kl * 0
                loss = (ce * d.world / n_tok + w * (args.kl_weight * kl + args.decoder_weight * dec + args.stop_weight * stop))
                loss.backward()
                stats["ce"] += ce.item() / n_tok
                stats["dec_ce"] += w * dec.item()
                stats["kl"] += w * kl.item()
                stats["stop_ce"] += w * stop.item()
                if checked.any():
                    stats["stop_acc"] += w * (stop_logits.argmax(-1) == target[checked]).float().mean().item()
                stats["sigma"] += w * ((0.5 * logvar).exp().mean(-1) * is_lat).sum().item() / is_lat.sum().clamp(min=1).item()
            common.average_gradients([heads, decoder], d)
            grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(list(heads.parameters()) + list(decoder.parameters()), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if (i + 1) % args.log_every == 0 or i + 1 == args.steps_per_stage:
                row = {"phase": "sft", "stage": stage, "ce": common.all_sum(stats["ce"], d), "grad_norm": grad_norm,
                       **{k: common.all_mean(v, d) for k, v in stats.items() if k != "ce"},
                       "s_per_step": (time.time() - t0) / args.log_every}
                logger.log(row, step)
                t0 = time.time()
        cfg = stage_cfg
        with torch.no_grad():
            res = evaluate(model, tokenizer, test, cfg, max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
        logger.log({"phase": "sft", "stage": stage, "eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
        if d.main:
            print(f"stage {stage}: pass@1 {res['pass@1']:.3f}  #L {res['mean_L']:.1f}  ({len(test)} test questions)")
    return cfg, step


def atp_config(args, stage, phase, base):
    """latent_config.json of an ATP checkpoint; `base` holds how it prompts and its dataset."""
    return {**base, "mode": "atp", "c_thought": args.c_thought, "max_latents": args.c_thought * args.max_latent_stage,
            "stage": stage, "phase": phase, "method": "atp_latent", "base_model": args.model_name_or_path}


# ----------------------------------------------------------------------------------------------
# RL: Gaussian latent log-probs + stop term + answer tokens in a clamped PPO loss

def position_logprobs(model, heads, r, rows, temperature):
    """Per generated position of rows `rows`: sum_d log N(z; mu, sigma) (+ log p(continue) after a
    stop check) at latents, log p(stop) where the stop head ended the span, log pi(token) at
    temperature for sampled tokens. Also sigma's mean over latents (for the log)."""
    ids, mask, latent_mask, latents = r.inputs(rows)
    T = r.tokens.shape[1]  # logits of the positions that predict the completion only (not the prompt's)
    logits, hidden = common.lm_forward(model, ids, mask, common.positions(mask), latent_mask=latent_mask,
                                       latent_vectors=None if latents is None else latents.detach(), logits_to_keep=T + 1)
    P = r.prompt_ids.shape[1]
    logits = logits[:, :-1].float() / (temperature if temperature > 0 else 1.0)
    h_prev = hidden[:, P - 1:-1]                    # the hidden state each generated position was chosen from
    tok_lp = common.gather_logprobs(logits, r.tokens[rows])
    kinds, check = r.kinds[rows], r.extras["check"][rows]
    is_lat = kinds == common.LATENT_STEP
    out = tok_lp
    sigma = 0.0
    if is_lat.any():
        mu, logvar = heads.vae(h_prev[is_lat])
        lat_lp = torch.zeros_like(tok_lp)
        lat_lp[is_lat] = gaussian_logprob(r.latents[rows][is_lat].float(), mu.float(), logvar.float())
        out = torch.where(is_lat, lat_lp, out)
        sigma = (0.5 * logvar).exp().mean().item()
    checked = check > 0
    if checked.any():
        stop_lp = torch.zeros_like(tok_lp)
        stop_lp[checked] = heads.stop(h_prev[checked]).float().log_softmax(-1).gather(
            -1, (check[checked] == 2).long()[:, None]).squeeze(-1)
        out = out + stop_lp                          # continue: added to the latent's density; stop: the only term
        out = torch.where(check == 2, stop_lp, out)
    return out, sigma


def clamped_ppo_loss(logp, old_logp, adv, eps, clamp):
    """max(-A rho, -A clip(rho, 1-eps, 1+eps)) with rho = exp(clamp(logp - old, -c, c))."""
    ratio = torch.exp((logp - old_logp).clamp(-clamp, clamp))
    return torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)), ratio


def sequence_loss(per_pos, is_latent, is_answer):
    """The authors' aggregation, per row: the mean over its latent positions plus the mean over its
    answer positions (the stop decision counts with the answer, as in their code)."""
    def mean(m):
        return (per_pos * m).sum(1) / m.sum(1).clamp(min=1)
    return mean(is_latent) + mean(is_answer)


def group_advantages(rewards, G, eps=1e-4):
    r = rewards.view(-1, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def atp_rewards(texts, finished, answers, decoded, args):
    """correct + format_weight * format + coherence_weight * coherence * correct, per rollout."""
    correct = torch.tensor([float(common.is_correct(t, a)) for t, a in zip(texts, answers)])
    fmt = torch.tensor([float(has_format(t, f)) for t, f in zip(texts, finished.tolist())])
    coh = torch.tensor([coherence_score(s, common.extract_answer(t)) for s, t in zip(decoded, texts)])
    return correct + args.format_weight * fmt + args.coherence_weight * coh * correct, correct, fmt, coh


def run_rl(args, d, model, tokenizer, heads, decoder, cfg, train, test, logger, step0=0):
    G = args.num_generations
    cfg = dict(cfg, phase="rl")
    decoder.eval().requires_grad_(False)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    rng = random.Random(args.seed + 1000 * d.rank)
    completions_file = Path(args.output_dir) / "completions.jsonl"

    def run_eval(step):
        res = evaluate(model, tokenizer, test, cfg, max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
        logger.log({"phase": "rl", "eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
        return res

    start = run_eval(step0)
    for step in tqdm(range(step0 + 1, step0 + args.max_steps + 1), desc="atp rl", disable=not d.main):
        times = {}
        batch = [train[i] for i in rng.sample(range(len(train)), args.train_batch_size // d.world)]
        model.eval(), heads.eval()
        with common.timer(times, "rollout_s"), torch.no_grad():
            step_fn = ATPStep(model, cfg, tokenizer, args.temperature, top_p=args.top_p, sample=True)
            prompts = common.reasoning_prompts(tokenizer, [ex["question"] for ex in batch], cfg)
            r = common.rollout(model, prompts, step_fn, args.max_completion_length, common.stop_ids(model, tokenizer),
                               tokenizer.pad_token_id, num_generations=G)
            r.extras.update(step_fn.extras())
            texts = [common.decode_completion(tokenizer, r, i) for i in range(len(r.tokens))]
        with common.timer(times, "decode_s"):
            decoded = decode_latent_pairs(decoder, tokenizer, rollout_latents(r), cfg["c_thought"], args.max_step_tokens)
        answers = [batch[i // G]["answer"] for i in range(len(texts))]
        rewards, correct, fmt, coh = atp_rewards(texts, r.finished.cpu(), answers, decoded, args)
        adv = group_advantages(rewards, G).to(d.device)
        check = r.extras["check"]
        scored = (((r.kinds == common.TOKEN) | (r.kinds == common.LATENT_STEP) | (check == 2)) & r.mask.bool()).float()
        is_lat = ((r.kinds == common.LATENT_STEP) & r.mask.bool()).float()
        N, micro = len(r.tokens), args.micro_batch_size
        with common.timer(times, "update_s"):
            with torch.no_grad():
                old_logp = torch.cat([position_logprobs(model, heads, r, slice(i, i + micro), args.temperature)[0]
                                      for i in range(0, N, micro)])
            model.train(), heads.train()
            stats = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "sigma": 0.0, "n": 0, "m": 0}
            rows_per_mini = args.mini_batch_size // d.world * G
            for _ in range(args.num_iterations):
                for m0 in range(0, N, rows_per_mini):
                    mini = range(m0, min(N, m0 + rows_per_mini))
                    n_pos = common.all_mean(scored[mini].sum().item(), d) or 1.0
                    for i in range(mini.start, mini.stop, micro):
                        rows = slice(i, min(i + micro, mini.stop))
                        logp, sigma = position_logprobs(model, heads, r, rows, args.temperature)
                        per_pos, ratio = clamped_ppo_loss(logp, old_logp[rows], adv[rows, None], args.epsilon, args.log_ratio_clamp)
                        loss = sequence_loss(per_pos, is_lat[rows], scored[rows] - is_lat[rows]).sum() / len(mini)
                        loss.backward()
                        stats["loss"] += loss.item()
                        stats["clip_frac"] += ((((ratio - 1).abs() > args.epsilon).float() * scored[rows]).sum() / n_pos).item()
                        stats["sigma"] += sigma
                        stats["m"] += 1
                    common.average_gradients([heads], d)
                    stats["grad_norm"] += common.clip_grad_norm(model, args.max_grad_norm)
                    torch.nn.utils.clip_grad_norm_(heads.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stats["n"] += 1
        n_lat = is_lat.sum(1)
        groups = rewards.view(-1, G)
        row = {"phase": "rl", "reward": rewards.mean().item(), "correct": correct.mean().item(), "format": fmt.mean().item(),
               "coherence": coh.mean().item(), "frac_zero_std": (groups.std(1) == 0).float().mean().item(),
               "n_latents": n_lat.mean().item(), "stop_rate": (check == 2).any(1).float().mean().item(),
               "completion_length": ((r.kinds == common.TOKEN) & r.mask.bool()).sum(1).float().mean().item(),
               "loss": stats["loss"] / stats["n"], "clip_frac": stats["clip_frac"] / stats["n"],
               "grad_norm": stats["grad_norm"] / stats["n"], "sigma": stats["sigma"] / max(1, stats["m"])}
        logger.log({**{k: (common.all_mean(v, d) if isinstance(v, float) else v) for k, v in row.items()}, **times}, step)
        if args.log_completions and d.main:
            with completions_file.open("a") as f:
                for i in range(0, N, G):
                    f.write(json.dumps({"step": step, "question": batch[i // G]["question"], "completion": texts[i],
                                        "decoded_latents": decoded[i], "reward": rewards[i].item()}) + "\n")
            tqdm.write(f"  e.g. latents {decoded[0]} -> {texts[0]!r} reward {rewards[0].item():.2f}")
        if (step - step0) % args.eval_every == 0 and step != step0 + args.max_steps:
            run_eval(step)
    final = run_eval(step0 + args.max_steps)
    if d.main:
        print(f"RL: pass@1 {start['pass@1']:.3f} -> {final['pass@1']:.3f}   #L {start['mean_L']:.1f} -> {final['mean_L']:.1f}")
    return cfg


# ----------------------------------------------------------------------------------------------

def save(model, tokenizer, heads, decoder, out, cfg, d, save_dtype="auto"):
    """The LM and its decoder/ in `save_dtype` ("auto": the start model's published dtype); the heads in fp32."""
    common.save_checkpoint(model, tokenizer, out, cfg, extra_modules={"vae_head": heads.vae, "stop_head": heads.stop},
                           d=d, subfolders={"decoder": decoder}, save_dtype=save_dtype)


def load_extras(model, folder, cfg):
    """eval.py: the VAE and stop heads saved beside the weights."""
    attach_heads(model, load_heads(folder, model.config.hidden_size, model.device, model.dtype))


def show_latents(model, tokenizer, cfg, data, folder):
    """eval.py --show_latents: the step decoder's reading of each latent pair, then the answer."""
    decoder = load_decoder(folder, model.device, model.dtype)
    for ex, (text, steps) in zip(data, decode_latents(model, tokenizer, cfg, [ex["question"] for ex in data], decoder)):
        print(f"--- {ex['question']} (gold {ex['answer']})\n    latents read as: {' | '.join(steps)}\n    then: {text!r}")


def reasoning(model, tokenizer, cfg, temperature=0.0, top_p=1.0):
    """LEGACY (issue 12) shim: (prompts(questions) -> ids, step function) for this file's modes."""
    noise = cfg.get("noise_scale", 1.0) if temperature > 0 else 0.0
    step = common.reasoning_step(cfg, tokenizer, temperature, top_p=top_p, model=model, noise_scale=noise)
    return (lambda questions: common.reasoning_prompts(tokenizer, questions, cfg)), step


def main(args):
    if args.phase not in ("", "sft", "rl"):
        common.die(f"--phase must be sft, rl or empty (SFT then RL) (got {args.phase!r})")
    if args.c_thought < 1:
        common.die(f"--c_thought must be at least 1 (got {args.c_thought})")
    if args.max_latent_stage < 1:
        common.die(f"--max_latent_stage must be at least 1 (got {args.max_latent_stage})")
    if args.start_stage < 1:
        common.die(f"--start_stage must be at least 1 (got {args.start_stage}); stage 0, language CoT, is "
                   "coconut_sft.py --end_stage 0, whose checkpoint this script starts from")
    if args.num_generations < 2:
        common.die(f"--num_generations must be at least 2: the advantages compare rollouts within a group (got {args.num_generations})")
    if args.kl_weight < 0 or args.log_ratio_clamp <= 0:
        common.die("--kl_weight must be >= 0 and --log_ratio_clamp > 0")
    d = common.setup_distributed()
    common.seed_everything(args.seed, d.rank)
    if args.train_batch_size % args.mini_batch_size or args.mini_batch_size % d.world:
        common.die(f"--train_batch_size {args.train_batch_size} must be a multiple of --mini_batch_size "
                   f"{args.mini_batch_size}, itself a multiple of the {d.world} processes")
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)  # fp32 master weights
    common.check_start(cfg, (None, "cot", "atp"), "atp_latent.py")
    is_atp = bool(cfg) and cfg.get("mode") == "atp"
    phases = [args.phase] if args.phase else (["rl"] if is_atp else ["sft", "rl"])
    if phases == ["rl"] and not is_atp:
        common.die(f"--phase rl needs an ATP-Latent checkpoint (latent_config mode atp); {args.model_name_or_path} is not one")
    if "sft" in phases and is_atp:
        common.die(f"{args.model_name_or_path} is already an ATP-Latent checkpoint: use --phase rl")
    unread = unread_flags(args, phases)
    if unread and d.main:
        print(f"note: this run ({' then '.join(phases).upper()}) does not read {', '.join('--' + n for n in unread)} "
              "(flags of the other phase: see --help)", flush=True)
    # how the checkpoint prompts (chat template, system turn) and its dataset: the same in SFT, RL and eval.py
    start = dict(cfg or {"mode": "cot"})
    train, test = common.load_train_eval(args, start)
    base = {**common.prompt_settings(args, start, train), "dataset": start["dataset"]}
    bf16 = common.use_bf16(args.bf16, d.device)
    if "sft" in phases:
        if len(train) < args.sft_batch_size or args.sft_batch_size % d.world:
            common.die(f"--sft_batch_size {args.sft_batch_size} must divide among {d.world} processes and not exceed "
                       f"the training set ({len(train)} examples)")
        if not any(ex["steps"] for ex in train):
            common.die(f"dataset {base['dataset']!r} has no reasoning steps: the latents replace steps")
        special = common.add_special_tokens(model, tokenizer, [common.START_LATENT, common.END_LATENT, common.LATENT])
        decoder = copy.deepcopy(model)                    # the decoder starts as a copy of the start model
        heads = attach_heads(model, ATPHeads(model.config.hidden_size, args.init_logvar).to(d.device))
    else:
        heads = attach_heads(model, load_heads(args.model_name_or_path, model.config.hidden_size, d.device))
        decoder = load_decoder(args.model_name_or_path, d.device, torch.bfloat16 if bf16 else torch.float32)  # frozen in RL
        cfg = {**cfg, **base}
    decoder = common.wrap_model(decoder, common.Dist(), bf16=bf16)  # whole on every rank; computes in bf16 like the LM
    object.__setattr__(model, "atp_decoder", decoder)
    model = common.wrap_model(model, d, args.distributed, bf16)
    logger = common.Logger(args.output_dir, args, d, args.track)
    step = 0
    if "sft" in phases:
        cfg, step = run_sft(args, d, model, tokenizer, heads, decoder, train, test, logger, special, base)
        out = args.output_dir if phases == ["sft"] else args.output_dir.rstrip("/") + "-sft"
        save(model, tokenizer, heads, decoder, out, cfg, d, args.save_dtype)
        if d.main:
            print(f"saved the SFT checkpoint {out}")
    if "rl" in phases:
        if bf16:  # the decoder is frozen in RL: a bf16 copy, like a frozen reference model
            decoder.to(torch.bfloat16)
        cfg = run_rl(args, d, model, tokenizer, heads, decoder, cfg, train, test, logger, step)
        save(model, tokenizer, heads, decoder, args.output_dir, cfg, d, args.save_dtype)
    if d.main:
        common.plot_metrics(args.output_dir, ["ce", "dec_ce", "kl", "stop_acc", "reward", "coherence", "eval_acc", "eval_mean_L"])
        print(f"saved {args.output_dir}")
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
