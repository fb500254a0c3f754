"""ATP-Latent, phase 1: SFT of latents sampled from a conditional VAE, with a step decoder and a stop head.

Paper: "Beyond Imitation: Reinforcement Learning for Active Latent Planning", Zhi Zheng and Wee Sun Lee,
arXiv 2601.21598 (code: github.com/zz1358m/ATP-Latent-master). Phase 2, RL, is atp_rl.py, from this checkpoint.

Coconut's latents imitate one arbitrary chain of thought. ATP-Latent makes each latent a sample of a
conditional VAE, so the latent space is smooth and RL can explore it. The curriculum is Coconut's
("Training Large Language Models to Reason in a Continuous Latent Space", Hao et al. 2024, arXiv
2412.06769), from a CoT model: stage s replaces the first min(s, max_latent_stage) reasoning steps by
c_thought latent slots each. At a latent slot the model is fed, instead of the previous hidden state h,

    (mu, log sigma^2) = VAEHead(h),   z = mu + sigma * eps,   eps ~ N(0, I)

A decoder (a copy of the start model) reads each pair of latents and learns to write that step's text
("<<3*4=12>>" EOS); a stop head (continue / stop) after every c_thought-th latent learns when the span ends:

    loss = CE(answer) + decoder_weight * CE(decoder) + kl_weight * KL(N(mu, sigma^2) || N(0, I))
           + stop_weight * CE(stop)

This file also defines mode "atp", for eval.py and atp_rl.py's checkpoints alike: `reasoning` (mean
latent z = mu, the stop head's argmax), `load_extras` (the heads) and `show_latents` (eval.py
--show_latents prints the decoder's reading of each latent pair).

Usage:
    python atp_sft.py                                    # toy: CoT checkpoint, stages 1..4 -> runs/atp_sft
    python atp_rl.py                                     # then RL from runs/atp_sft
    python eval.py --model runs/atp_sft --show_latents

Docs: docs/atp_sft.md
"""
import copy
import functools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache

import common
import toy


@dataclass
class Args(common.TrainArgs):
    # ---- ATP-Latent SFT's own
    c_thought: int = field(default=2, metadata={
        "help": "latents per replaced step (the stop head also decides every c_thought latents)"})
    max_latent_stage: int = field(default=3, metadata={
        "help": "at most this many steps become latents (max_latents = c_thought x this)"})
    start_stage: int = field(default=1, metadata={
        "help": "first curriculum stage (>= 1; stage 0, language CoT, is coconut_sft.py --end_stage 0)"})
    end_stage: int = field(default=-1, metadata={"help": "last stage; -1 = max_latent_stage + 1 (every step latent)"})
    steps_per_stage: int = field(default=100, metadata={"help": "optimizer steps per stage"})
    kl_weight: float = field(default=0.001, metadata={"help": "weight of the VAE's KL to N(0, I)"})
    decoder_weight: float = field(default=1.0, metadata={"help": "weight of the decoder's cross-entropy"})
    stop_weight: float = field(default=1.0, metadata={"help": "weight of the stop head's cross-entropy"})
    init_logvar: float = field(default=-4.0, metadata={"help": "initial log sigma^2 of the VAE head"})
    # ---- the training loop
    micro_batch_size: int = field(default=64, metadata={"help": "examples per forward on one rank"})
    log_every: int = field(default=10, metadata={"help": "log every N steps"})
    distributed: Literal["fsdp", "ddp"] = field(default="fsdp", metadata={"help": "under torchrun: FSDP2 or DDP"})
    # ---- the flags every trainer shares (common.TrainArgs), with this method's defaults
    model_name_or_path: str = field(default=toy.COT, metadata={
        "help": "start: a plain causal LM or a CoT checkpoint (coconut_sft.py --end_stage 0)"})
    dataset: str = field(default="", metadata={
        "help": "training data with reasoning steps: a hub dataset, a local .jsonl/.parquet, or toy"})
    output_dir: str = field(default="runs/atp_sft", metadata={
        "help": "checkpoint, metrics.jsonl and plots (atp_rl.py's default start)"})
    train_batch_size: int = field(default=64, metadata={"help": "examples per optimizer step, all ranks together"})
    max_completion_length: int = field(default=48, metadata={
        "help": "generated positions per evaluation rollout, latents included"})
    max_eval_samples: int = field(default=200, metadata={"help": "evaluation questions after each stage (0 = all)"})
    # (5) the toy task's learning rate, as coconut_sft.py's
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (LM, heads and decoder)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (the LM; heads and decoder apart)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer in backward, in the LM and the decoder (exact; less memory)"})
    save_steps: int = field(default=0, metadata={
        "help": "a checkpoint-<step> every N steps, counted over all stages (0 = only at the end)"})
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "dtype of the saved LM and decoder (auto: the start model's published dtype)"})


START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"   # Coconut's markers


# ----------------------------------------------------------------------------------------------
# the heads: a conditional VAE over the fed-back vector, and the stop decision

class VAEHead(nn.Module):
    """h (the hidden state before a latent slot) -> (mu, log sigma^2) of the latent fed there.
    (1) The paper's MLP (d -> d, GELU, d -> d, LayerNorm) with its last layer split in two: mu through
    the LayerNorm, log sigma^2 apart (initialised to `init_logvar`, clamped to [-10, 4])."""

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


def sample_latent(mu, logvar):
    """z = mu + sigma * eps (the reparameterisation: gradients reach mu and sigma)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# (7) the heads are attached to the LM as a plain attribute (not a submodule, so they stay out of
# model.safetensors and plain transformers still loads the LM); each has its own safetensors file

def attach_heads(model, heads):
    object.__setattr__(common.unwrap(model), "atp_heads", heads)
    return heads


def load_heads(folder, d, device=None, dtype=torch.float32):
    heads = ATPHeads(d)
    for name, module in (("vae_head", heads.vae), ("stop_head", heads.stop)):
        common.load_extra_module(folder, name, module)
    return heads.to(device=device, dtype=torch.float32 if dtype is None else dtype)


def load_extras(model, folder, cfg):
    """eval.py: the VAE and stop heads saved beside the weights."""
    attach_heads(model, load_heads(folder, model.config.hidden_size, model.device, model.dtype))


# ----------------------------------------------------------------------------------------------
# how an ATP model reasons: the prompt ends with <|start-latent|>; latents from the VAE head, a
# stop decision every c_thought latents, then <|end-latent|> and the answer in tokens

def encode_prompts(tokenizer, questions, cfg):
    """The question (plain, or in the chat template with the system turn it was trained with),
    then <|start-latent|>."""
    start = common.require_tokens(tokenizer, [START_LATENT], "an ATP-Latent model")[0]
    chat = cfg.get("prompt_format") == "chat"
    return [common.encode_prompt(tokenizer, q, chat, cfg.get("system_prompt", "")) + [start] for q in questions]


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
            tokenizer, [START_LATENT, END_LATENT, LATENT], "an ATP-Latent model")
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
        forced = self.thinking & ~stop & (t >= self.max_latents)  # (3) at max_latents the end is forced, not scored
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


def reasoning(model, tokenizer, cfg, temperature=0.0, top_p=1.0):
    """How mode "atp" reasons, for evaluation (this file's, atp_rl.py's checkpoints in eval.py):
    (prompts(questions) -> token ids, the ATP step). Greedy (temperature 0): z = mu and the stop
    head's argmax; sampled: z ~ N(mu, sigma^2) and a sampled stop decision."""
    step = ATPStep(model, cfg, tokenizer, temperature, top_p=top_p)
    return functools.partial(encode_prompts, tokenizer, cfg=cfg), step


# ----------------------------------------------------------------------------------------------
# the decoder: each pair of latents -> that step's text (eval.py --show_latents)

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
    logits, _ = common.lm_forward(decoder, ids, mask[:, :c], pos, cache, torch.ones_like(ids, dtype=torch.bool), vec,
                                  logits_to_keep=1)
    done = torch.zeros(M, dtype=torch.bool, device=device)
    written = []
    for t in range(max_tokens):
        tok = logits[:, -1].argmax(-1).masked_fill(done, eos)
        written.append(tok)
        done |= torch.isin(tok, stops)
        if done.all():
            break
        pos = torch.full((M, 1), c + t, device=device)
        logits, _ = common.lm_forward(decoder, tok[:, None], mask[:, :c + t + 1], pos, cache)
    written = torch.stack(written, 1).tolist()
    for (i, _), toks in zip(pairs, written):
        toks = toks[:next((k for k, x in enumerate(toks) if x in stop_list), len(toks))]
        out[i].append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


def rollout_latents(r):
    """Per row, the latent vectors it was fed, in order: a list of (n_i, d) tensors."""
    if r.latents is None:
        return [r.tokens.new_zeros((0, 1)).float() for _ in range(len(r.tokens))]
    is_lat = (r.kinds == common.LATENT_STEP) & r.mask.bool()
    return [r.latents[i][is_lat[i]] for i in range(len(r.tokens))]


def decode_latents(model, tokenizer, cfg, questions, decoder, max_tokens=24):
    """Greedy rollouts of `questions`, and the decoder's reading of each latent pair. Returns per
    question (completion, [decoded steps])."""
    r = common.rollout(model, encode_prompts(tokenizer, questions, cfg), ATPStep(model, cfg, tokenizer),
                       cfg["max_latents"] + 64, common.stop_ids(model, tokenizer), tokenizer.pad_token_id)
    steps = decode_latent_pairs(decoder, tokenizer, rollout_latents(r), cfg["c_thought"], max_tokens)
    return [(common.decode_completion(tokenizer, r, i), steps[i]) for i in range(len(questions))]


def load_decoder(folder, device, dtype):
    path = Path(folder) / "decoder"
    if not (path / "config.json").is_file():
        common.die(f"{folder} has no decoder/ folder (not a complete ATP-Latent checkpoint)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)


def show_latents(model, tokenizer, cfg, data, folder):
    """eval.py --show_latents: the step decoder's reading of each latent pair, then the answer."""
    decoder = load_decoder(folder, model.device, model.dtype)
    for ex, (text, steps) in zip(data, decode_latents(model, tokenizer, cfg, [ex["question"] for ex in data], decoder)):
        print(f"--- {ex['question']} (gold {ex['answer']})\n"
              f"    latents read as: {' | '.join(steps)}\n    then: {text!r}")


# ----------------------------------------------------------------------------------------------
# the curriculum: Coconut's step-wise examples, plus the steps the latents replace

class Example(NamedTuple):
    prompt: list     # the prompt's ids, ending with <|start-latent|>
    n_latent: int    # latent slots after the prompt
    tail: list       # [<|latent|>] * n_latent, <|end-latent|>, the steps left, "### answer", end id
    labels: list     # the tail's labels: -100 over the latents and <|end-latent|>
    targets: list    # the decoder's targets: the ids of each replaced step, then EOS


def build_example(tokenizer, ex, stage, args, special, cfg, end_id=None):
    """Coconut's step-wise example at `stage` (the first min(stage, max_latent_stage) steps become
    c_thought latents each; past max_latent_stage the other steps are dropped too) and the decoder's
    targets. The prompt is the one atp_rl.py and eval.py give the checkpoint (`encode_prompts` with
    `cfg`: chat template, system turn, then <|start-latent|>); the answer ends with `end_id`
    (default EOS; the end of turn with a chat template)."""
    start, end, latent = special
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    steps = [tokenizer.encode(s + "\n", add_special_tokens=False) for s in ex["steps"]]
    answer = tokenizer.encode(f"{common.ANSWER_MARKER} {ex['answer']}", add_special_tokens=False) + [end_id]
    k = min(stage, args.max_latent_stage)
    n_latent = args.c_thought * min(k, len(steps))
    reasoning_left = [t for s in ([] if stage > args.max_latent_stage else steps[k:]) for t in s]
    prompt = common.encode_prompt(tokenizer, ex["question"], cfg["prompt_format"] == "chat", cfg["system_prompt"])
    prompt = prompt + [start]
    targets = [tokenizer.encode(s, add_special_tokens=False) + [tokenizer.eos_token_id]
               for s in ex["steps"][:n_latent // args.c_thought]]
    return Example(prompt, n_latent, [latent] * n_latent + [end] + reasoning_left + answer,
                   [-100] * (n_latent + 1) + reasoning_left + answer, targets)


def collate(examples, pad_id, device):
    """Left-pad the prompts (so every latent slot of the batch sits in the same columns) and
    right-pad the tails. Returns ids, attention mask, labels, n_latent and the first latent column."""
    left, lmask = common.pad_left([e.prompt for e in examples], pad_id)
    width = max(len(e.tail) for e in examples)
    right = torch.full((len(examples), width), pad_id)
    rmask = torch.zeros((len(examples), width), dtype=torch.long)
    lab = torch.full((len(examples), left.shape[1] + width), -100)
    for i, e in enumerate(examples):
        right[i, :len(e.tail)], rmask[i, :len(e.tail)] = torch.tensor(e.tail), 1
        lab[i, left.shape[1]:left.shape[1] + len(e.labels)] = torch.tensor(e.labels)
    ids, mask = torch.cat([left, right], 1), torch.cat([lmask, rmask], 1)
    n_latent = torch.tensor([e.n_latent for e in examples], device=device)
    return ids.to(device), mask.to(device), lab.to(device), n_latent, left.shape[1]


# ----------------------------------------------------------------------------------------------
# the losses: Coconut's multi-pass forward with sampled latents; decoder, KL and stop losses

def atp_forward(model, heads, ids, mask, n_latent, c0):
    """Coconut's forward with z ~ N(mu, sigma^2) from the VAE head fed at latent slot c0 + k instead
    of the hidden state: pass 0 covers columns [0, c0), pass k the single column c0 + k - 1, the
    last pass the rest, over one KV cache, gradients through the chain. Returns logp (B, L-1),
    logp[:, j] = log p(ids[:, j+1] | columns <= j) (0 at the prompt's positions, which predict no
    label), mu, logvar, z (B, n_max, d) and the hidden state after each latent slot (B, n_max, d)
    for the stop head.

    No pass makes whole (B, L, V) logits: the last pass scores its positions with lm_logprobs (in
    chunks), and each earlier pass needs only its last position's logits (B, 1, V), which predict
    the next pass's first column (a label for rows with fewer latents than the batch's most)."""
    pos = common.positions(mask)
    n_max = common.all_reduce(int(n_latent.max()), None, "max")  # the same number of passes on every rank
    B, d = ids.shape[0], common.unwrap(model).config.hidden_size
    if n_max == 0:  # no row has a latent: one plain pass
        lp, _ = common.lm_logprobs(model, ids, mask, pos, ids[:, 1:])
        empty = torch.zeros((B, 0, d), device=ids.device)
        return lp.token, empty, empty, empty, empty

    def next_logprob(logits, b):  # log p(ids[:, b]) from the logits of column b-1 (B, 1, V)
        return logits[:, -1].float().log_softmax(-1).gather(-1, ids[:, b, None])

    cache = DynamicCache(config=common.unwrap(model).config)
    logits, hidden = common.lm_forward(model, ids[:, :c0], mask[:, :c0], pos[:, :c0], cache, logits_to_keep=1)
    chunks = [torch.zeros((B, c0 - 1), device=ids.device), next_logprob(logits, c0)]
    mus, logvars, zs, after = [], [], [], []
    for k in range(n_max):
        a, b = c0 + k, (c0 + k + 1 if k < n_max - 1 else ids.shape[1])
        is_latent = torch.zeros((B, b - a), dtype=torch.bool, device=ids.device)
        is_latent[:, 0] = k < n_latent
        mu, logvar = heads.vae(hidden[:, -1])
        z = sample_latent(mu, logvar)
        latent = dict(latent_mask=is_latent, latent_vectors=z.to(hidden.dtype)[:, None].expand(-1, b - a, -1))
        if b < ids.shape[1]:
            logits, hidden = common.lm_forward(model, ids[:, a:b], mask[:, :b], pos[:, a:b], cache, logits_to_keep=1,
                                               **latent)
            chunks.append(next_logprob(logits, b))
        else:
            lp, hidden = common.lm_logprobs(model, ids[:, a:b], mask[:, :b], pos[:, a:b], ids[:, a + 1:b],
                                            past_key_values=cache, **latent)
            chunks.append(lp.token)
        mus.append(mu), logvars.append(logvar), zs.append(z), after.append(hidden[:, 0])
    return torch.cat(chunks, 1), torch.stack(mus, 1), torch.stack(logvars, 1), torch.stack(zs, 1), torch.stack(after, 1)


def decoder_loss(decoder, zs, n_latent, targets, c, pad_id):
    """CE of the decoder writing step j's text from latents [jc, (j+1)c) of its row (sum, count).
    (2) The decoder reads the latent vectors alone (no question, no earlier steps), and its CE's
    gradient reaches the LM and the VAE head through z (it is trained jointly; atp_rl.py freezes it)."""
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
    lp, _ = common.lm_logprobs(decoder, ids, mask, common.positions(mask), ids[:, 1:], latent_mask=lat_mask,
                               latent_vectors=vec)
    return -(lp.token * (labels[:, 1:] != -100)).sum(), int((labels != -100).sum())


def stop_targets(n_latent, n_max, c):
    """Where the stop head is trained, and its label: after latent m = c, 2c, ... <= n of a row,
    label STOP if m == n else CONTINUE. Returns (checked (B, n_max) bool, labels (B, n_max)).
    (3) Trained at every stage: stop after the last latent pair of that stage."""
    m = torch.arange(1, n_max + 1, device=n_latent.device)[None]
    checked = (m % c == 0) & (m <= n_latent[:, None])
    return checked, (m == n_latent[:, None]).long()


def latent_config(args, stage, base):
    """latent_config.json of an ATP checkpoint; `base` holds how it prompts and its dataset."""
    return {**base, "mode": "atp", "c_thought": args.c_thought, "max_latents": args.c_thought * args.max_latent_stage,
            "stage": stage, "phase": "sft", "method": "atp_sft", "base_model": args.model_name_or_path}




def micro_batch_loss(model, heads, decoder, part, args, d, pad_id, n_lab, w, stats):
    """The loss of one micro-batch of examples, this micro-batch's share of the step's (its answer
    tokens over the global batch's `n_lab`; the other terms weighted by its share `w` of the rank's
    examples); adds its numbers to `stats`. Returns (loss, positions)."""
    ids, mask, labels, n_latent, c0 = collate(part, pad_id, d.device)
    logp, mu, logvar, zs, after = atp_forward(model, heads, ids, mask, n_latent, c0)
    # the answer's CE: every labelled token of the global batch weighs the same
    ce = -(logp * (labels[:, 1:] != -100)).sum()
    # the VAE's KL to N(0, I), averaged over the latent slots used
    is_lat = torch.arange(mu.shape[1], device=d.device)[None] < n_latent[:, None]
    kl = (gaussian_kl(mu, logvar) * is_lat).sum() / is_lat.sum().clamp(min=1)
    # the decoder writes each replaced step from its latent pair
    dec_sum, dec_n = decoder_loss(decoder, zs, n_latent, [e.targets for e in part], args.c_thought, pad_id)
    dec = dec_sum / max(1, dec_n)
    # the stop head: stop after the last latent pair, continue before it
    checked, target = stop_targets(n_latent, mu.shape[1], args.c_thought)
    stop_logits = heads.stop(after[checked])
    stop_ce = F.cross_entropy(stop_logits.float(), target[checked]) if checked.any() else kl * 0
    loss = (ce * d.world / n_lab + w * (args.kl_weight * kl + args.decoder_weight * dec + args.stop_weight * stop_ce))
    stats["ce"] += ce.item() / n_lab
    stats["dec_ce"] += w * dec.item()
    stats["kl"] += w * kl.item()
    stats["stop_ce"] += w * stop_ce.item()
    if checked.any():
        stats["stop_acc"] += w * (stop_logits.argmax(-1) == target[checked]).float().mean().item()
    stats["sigma"] += w * ((0.5 * logvar).exp().mean(-1) * is_lat).sum().item() / is_lat.sum().clamp(min=1).item()
    return loss, int(mask.sum())


def main(args):
    # ---- 0. setup: checks, the start model, data, the markers, the decoder, the heads, resume
    if args.c_thought < 1:
        common.die(f"--c_thought must be at least 1 (got {args.c_thought})")
    if args.max_latent_stage < 1:
        common.die(f"--max_latent_stage must be at least 1 (got {args.max_latent_stage})")
    if args.start_stage < 1:
        common.die(f"--start_stage must be at least 1 (got {args.start_stage}); stage 0, language CoT, is "
                   "coconut_sft.py --end_stage 0, whose checkpoint this script starts from")
    end = args.max_latent_stage + 1 if args.end_stage < 0 else args.end_stage
    if end < args.start_stage:
        common.die(f"--end_stage {end} comes before --start_stage {args.start_stage}")
    if args.steps_per_stage < 1:
        common.die(f"--steps_per_stage must be at least 1 (got {args.steps_per_stage})")
    if args.kl_weight < 0:
        common.die(f"--kl_weight must be >= 0 (got {args.kl_weight})")
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)  # fp32 master weights
    if (cfg or {}).get("mode") == "atp":
        common.die(f"{args.model_name_or_path} is already an ATP-Latent checkpoint: train it on with atp_rl.py")
    common.check_start(cfg, (None, "cot"), "atp_sft.py")
    # how the checkpoint prompts (chat template, system turn) and its dataset: the same in SFT, RL and eval.py
    start = dict(cfg or {"mode": "cot"})
    train, test = common.load_train_eval(args, start)
    base = {**common.prompt_settings(args, start, train), "dataset": start["dataset"]}
    bf16 = common.use_bf16(args.bf16, d.device)
    if len(train) < args.train_batch_size:
        common.die(f"--train_batch_size {args.train_batch_size} exceeds the training set ({len(train)} examples)")
    if not any(ex["steps"] for ex in train):
        common.die(f"dataset {base['dataset']!r} has no reasoning steps: the latents replace steps")
    special = common.add_special_tokens(model, tokenizer, [START_LATENT, END_LATENT, LATENT])
    decoder = copy.deepcopy(model)                    # the decoder starts as a copy of the start model
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                              trainable_token_ids=special)   # (6) LoRA: the markers' rows stay trainable
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
        common.enable_gradient_checkpointing(decoder)
    heads = attach_heads(model, ATPHeads(model.config.hidden_size, args.init_logvar).to(d.device))
    heads_files = {"vae_head": heads.vae, "stop_head": heads.stop}   # (7) saved beside the weights, in fp32
    decoder = common.wrap_model(decoder, common.Dist(), bf16=bf16)  # (6) whole on every rank; computes in bf16 too
    model = common.wrap_model(model, d, args.distributed, bf16)
    # --save_steps and --resume_from_checkpoint: the LM (its adapters with LoRA), the heads, the
    # decoder, and the AdamW and data order of the stage the step is in
    state = common.TrainState(args, d, {"model": model, "heads": heads, "decoder": decoder})
    _, resume_step = state.checkpoint()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=resume_step)
    per_rank = args.train_batch_size // d.world
    micro = min(args.micro_batch_size, per_rank)
    params = [p for m in (model, heads, decoder) for p in m.parameters() if p.requires_grad]
    stop = common.stop_ids(model, tokenizer)
    first_cfg = latent_config(args, args.start_stage, base)
    longest = max(len(e.prompt) + len(e.tail) for e in (
        build_example(tokenizer, ex, args.start_stage, args, special, first_cfg,
                      common.answer_end_id(tokenizer, first_cfg, stop))
        for ex in train[:1000]))   # the first stage keeps the most text
    prompt = max(len(p) for p in encode_prompts(tokenizer, [ex["question"] for ex in test[:1000]], first_cfg))
    common.print_memory_plan(model, d, args, micro, longest, min(64, len(test)), prompt + args.max_completion_length,
                             extra_modules=[heads, decoder])
    cfg, res = None, None

    for stage in range(args.start_stage, end + 1):
        # ---- 1. the stage: its examples and a fresh AdamW (4), or the resumed step's state
        first = (stage - args.start_stage) * args.steps_per_stage   # the steps of the stages before
        cfg = latent_config(args, stage, base)
        if resume_step > first + args.steps_per_stage:
            continue                                  # a stage the resumed run finished
        end_id = common.answer_end_id(tokenizer, cfg, stop)  # chat: end of turn
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)  # reset per stage
        rng = random.Random(args.seed * 1000 + stage)
        state.optimizers, state.rngs = [optimizer], [rng]
        done = 0
        if resume_step > first:  # the checkpoint's step is in this stage: its AdamW, data order and random states
            done, extra = state.resume()
            done, res = done - first, extra["eval"]
        model.train(), heads.train(), decoder.train()
        t0, n_steps, n_tok = time.time(), 0, 0
        for i in tqdm(range(done, args.steps_per_stage), desc=f"sft stage {stage}", initial=done,
                      total=args.steps_per_stage, disable=not d.main):
            # ---- 2. forward and backward: answer CE, VAE KL, decoder CE, stop CE, a micro-batch at a time
            step = first + i + 1
            batch = rng.sample(range(len(train)), args.train_batch_size)[d.rank::d.world]
            exs = [build_example(tokenizer, train[j], stage, args, special, cfg, end_id) for j in batch]
            n_lab = common.all_reduce(sum(sum(y != -100 for y in ex.labels) for ex in exs), d, "sum")
            stats = {"ce": 0.0, "dec_ce": 0.0, "kl": 0.0, "stop_ce": 0.0, "stop_acc": 0.0, "sigma": 0.0}
            for m0 in range(0, len(exs), micro):
                part = exs[m0:m0 + micro]
                loss, n = micro_batch_loss(model, heads, decoder, part, args, d, tokenizer.pad_token_id, n_lab,
                                           len(part) / per_rank, stats)
                loss.backward()
                n_tok += n

            # ---- 3. update (8): the LM, and the heads and decoder apart (their gradients averaged by hand (6))
            common.average_gradients([heads, decoder], d)
            grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(list(heads.parameters()) + list(decoder.parameters()), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_steps += 1

            # ---- 4. log
            if (i + 1) % args.log_every == 0 or i + 1 == args.steps_per_stage:
                row = {k: common.all_reduce(v, d, "sum" if k == "ce" else "mean") for k, v in stats.items()}
                loss = (row["ce"] + args.kl_weight * row["kl"] + args.decoder_weight * row["dec_ce"]
                        + args.stop_weight * row["stop_ce"])
                elapsed = time.time() - t0   # this rank's time per step and positions (latents too) per second
                logger.log({"phase": "sft", "stage": stage, "loss": loss, **row, "grad_norm": grad_norm,
                            "step_s": elapsed / n_steps, "tok_per_s": n_tok / elapsed}, step)
                t0, n_steps, n_tok = time.time(), 0, 0

            # ---- 5. evaluate after each stage (greedy, with this stage's latents), save
            if i + 1 == args.steps_per_stage:
                with torch.no_grad():
                    full = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                                           max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
                res = {"pass@1": full["pass@1"], "mean_L": full["mean_L"]}
                logger.log({"phase": "sft", "stage": stage, "eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]},
                           step)
                if d.main:
                    print(f"stage {stage}: pass@1 {res['pass@1']:.3f}  #L {res['mean_L']:.1f}  "
                          f"({len(test)} test questions)")
            state.maybe_save(step, tokenizer, cfg, extra={"eval": res}, extra_modules=heads_files,
                             subfolders={"decoder": decoder})

    # ---- 6. save (7): the LM and decoder/ in --save_dtype, the heads in fp32, latent_config.json
    common.finish(model, tokenizer, cfg, args, d, res, plot_keys=["ce", "dec_ce", "kl", "stop_acc", "eval_acc",
                                                                  "eval_mean_L"],
                  extra_modules=heads_files, subfolders={"decoder": decoder})
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
