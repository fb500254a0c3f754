"""ATP-Latent, phase 2: RL for active latent planning, with a coherence reward.

Paper: "Beyond Imitation: Reinforcement Learning for Active Latent Planning", Zhi Zheng and Wee Sun Lee,
arXiv 2601.21598 (code: github.com/zz1358m/ATP-Latent-master). Phase 1, the SFT that makes this file's
start checkpoint (the LM, its VAE and stop heads, the step decoder), is atp_sft.py.

A rollout feeds z ~ N(mu, sigma^2) from the VAE head at each latent slot and samples the stop head's
decision every c_thought latents; after the stop (or max_latents) comes <|end-latent|>, then the
sampled answer. The log-probability of a generated position is

    latent:  sum_d log N(z_d; mu_d, sigma_d)   (+ log p(continue) at the latent after a stop check)
    stop:    log p(stop)          answer token: log pi(token) at the sampling temperature

    reward = correct + format_weight * format + coherence_weight * coherence * correct

where the frozen decoder reads each latent pair as a step and coherence is the fraction of decoded
steps whose result is used (a step's by a later step, the last step's by the final answer; 1.0 when
none is decoded). Advantages are group-normalised (GRPO); the loss is PPO-clipped, with the
log-ratio clamped to [-3, 3] and no KL, averaged as the authors' code does: per rollout, the mean
over its latent positions plus the mean over its answer positions, then the mean over rollouts.
eval.py runs the result as mode "atp" (defined in atp_sft.py: z = mu, the stop head's argmax).

Usage:
    python atp_sft.py                        # first: the SFT checkpoint runs/atp_sft
    python atp_rl.py                         # toy: RL from runs/atp_sft -> runs/atp_rl
    python eval.py --model runs/atp_rl --show_latents

Docs: docs/atp_rl.md
"""
import functools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache

import common


@dataclass
class Args(common.TrainArgs):
    # ---- ATP-Latent RL's own
    format_weight: float = field(default=0.5, metadata={"help": "reward weight of the format bonus"})
    coherence_weight: float = field(default=0.1, metadata={"help": "reward weight of coherence (times correct)"})
    max_step_tokens: int = field(default=24, metadata={"help": "tokens the decoder writes per latent pair"})
    log_ratio_clamp: float = field(default=3.0, metadata={"help": "the log-ratio is clamped to [-c, c]"})
    # ---- the objective (TRL's names)
    num_generations: int = field(default=8, metadata={"help": "G, rollouts per prompt"})
    epsilon: float = field(default=0.2, metadata={
        "help": "PPO clip range: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]"})
    epsilon_high: Optional[float] = field(default=None, metadata={
        "help": "upper clip range (TRL's clip-higher); default: --epsilon"})
    scale_rewards: Literal["group", "batch", "none", "true", "false"] = field(default="group", metadata={
        "help": "advantage scaling: by the group's std, the batch's, or none (true/false = group/none)"})
    num_iterations: int = field(default=1, metadata={"help": "passes over each batch"})
    temperature: float = field(default=1.0, metadata={"help": "answer sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "answer nucleus sampling"})
    # ---- the training loop
    mini_batch_size: int = field(default=8, metadata={"help": "prompts per optimizer update"})
    micro_batch_size: int = field(default=64, metadata={"help": "rollouts per forward on one rank"})
    max_steps: int = field(default=30, metadata={"help": "RL steps"})
    generation_batch_size: int = field(default=0, metadata={
        "help": "rollouts generated at once on one rank, a multiple of --num_generations (0 = all of a step's)"})
    eval_every: int = field(default=15, metadata={"help": "evaluate every N steps"})
    log_completions: bool = field(default=False, metadata={
        "help": "write one completion per prompt to completions.jsonl"})
    distributed: Literal["fsdp", "ddp"] = field(default="fsdp", metadata={"help": "under torchrun: FSDP2 or DDP"})
    # ---- the flags every trainer shares (common.TrainArgs), with this method's defaults
    model_name_or_path: str = field(default="runs/atp_sft", metadata={
        "help": "an ATP-Latent checkpoint (atp_sft.py's output, or an atp_rl.py one)"})
    dataset: str = field(default="", metadata={
        "help": "training data: a hub dataset, a local .jsonl/.parquet, or toy (default: the checkpoint's)"})
    output_dir: str = "runs/atp_rl"
    max_completion_length: int = field(default=48, metadata={
        "help": "generated positions per rollout and evaluation, latents included"})
    # (4) the toy task's learning rate and steps (the paper's learning rate: 1e-6)
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate (LM and heads)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (the LM, and the heads apart)"})
    bf16: Optional[bool] = field(default=None, metadata={
        "help": "bf16 compute on fp32 master weights (and a bf16 frozen decoder); default: on for a bf16 GPU"})
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "dtype of the saved LM and decoder (auto: the start model's published dtype)"})


START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"   # Coconut's markers
SCALE_REWARDS = {"group": "group", "batch": "batch", "none": "none", "true": "group", "false": "none"}  # TRL's values


# ----------------------------------------------------------------------------------------------
# the heads (trained by atp_sft.py): a conditional VAE over the fed-back vector, and the stop decision

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


def gaussian_logprob(z, mu, logvar):
    """log N(z; mu, diag sigma^2), summed over the last dimension."""
    return (-0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + math.log(2 * math.pi))).sum(-1)


def sample_latent(mu, logvar):
    """z = mu + sigma * eps."""
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


def load_decoder(folder, device, dtype):
    """(1) The step decoder atp_sft.py trained, frozen here (bf16 with --bf16)."""
    path = Path(folder) / "decoder"
    if not (path / "config.json").is_file():
        common.die(f"{folder} has no decoder/ folder (not a complete ATP-Latent checkpoint)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# the rollout: the prompt ends with <|start-latent|>; latents sampled from the VAE head, a stop
# decision sampled every c_thought latents, then <|end-latent|> and the answer in tokens

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
    feeds <|end-latent|> (FORCED kind; its log p(stop) is scored by the loss through the recorded
    `check`). At max_latents the end is forced and not scored. Then tokens are sampled.
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
        forced = self.thinking & ~stop & (t >= self.max_latents)  # (2) at max_latents the end is forced, not scored
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
    """Mode "atp" for this file's evaluation (eval.py asks atp_sft.py, which defines the same):
    (prompts(questions) -> token ids, the ATP step; greedy: z = mu and the stop head's argmax)."""
    step = ATPStep(model, cfg, tokenizer, temperature, top_p=top_p)
    return functools.partial(encode_prompts, tokenizer, cfg=cfg), step


def rollout_latents(r):
    """Per row, the latent vectors it was fed, in order: a list of (n_i, d) tensors."""
    if r.latents is None:
        return [r.tokens.new_zeros((0, 1)).float() for _ in range(len(r.tokens))]
    is_lat = (r.kinds == common.LATENT_STEP) & r.mask.bool()
    return [r.latents[i][is_lat[i]] for i in range(len(r.tokens))]


# ----------------------------------------------------------------------------------------------
# the reward: correct, format, and the coherence of the steps the frozen decoder reads

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


STEP = re.compile(r"<<([^=<>]*)=([^<>]*)>>")


def parse_step(text):
    """ "<<3*4=12>>" -> ([3, 4], 12) (exact Decimals); None if the text is not a step with a numeric result."""
    m = STEP.search(text)
    if not m:
        return None
    result = common.NUMBER.search(m.group(2))
    if not result:
        return None
    return [common.as_number(x) for x in common.NUMBER.findall(m.group(1))], common.as_number(result.group(0))


def coherence_score(steps, answer):
    """The fraction of decoded steps whose result is used, as the authors' code counts it: a step
    before the last counts if its result is an operand of a later step, the last step if its result
    is the final answer. Steps that do not parse count as unused; no decoded step gives 1.0.
    (6) Numbers are compared as numbers; the authors' code tests substrings of the decoded text."""
    if not steps:
        return 1.0
    parsed = [parse_step(s) for s in steps]
    final = common.as_number(answer) if answer is not None else None
    used = 0
    for i, p in enumerate(parsed[:-1]):
        used += p is not None and any(p[1] == x for q in parsed[i + 1:] if q for x in q[0])
    used += parsed[-1] is not None and final is not None and parsed[-1][1] == final
    return used / len(steps)


def has_format(text, finished):
    """(9) The format bonus as this file reads it: the completion ended (a stop id) and gives "### <number>"."""
    return bool(finished) and re.search(re.escape(common.ANSWER_MARKER) + r"\s*-?\d", text) is not None


def atp_rewards(texts, finished, answers, decoded, args):
    """correct + format_weight * format + coherence_weight * coherence * correct, per rollout."""
    correct = torch.tensor([float(common.is_correct(t, a)) for t, a in zip(texts, answers)])  # (9) eval.py's checker
    fmt = torch.tensor([float(has_format(t, f)) for t, f in zip(texts, finished.tolist())])
    coh = torch.tensor([coherence_score(s, common.extract_answer(t)) for s, t in zip(decoded, texts)])
    return correct + args.format_weight * fmt + args.coherence_weight * coh * correct, correct, fmt, coh


# ----------------------------------------------------------------------------------------------
# the loss: Gaussian latent log-probs + stop term + answer tokens in a clamped PPO loss

def group_advantages(rewards, G, scale_rewards="group", batch_rewards=None, eps=1e-4):
    """A_i = (R_i - mean_group) / (std + eps) with the group's std ("group"), the std of
    `batch_rewards` (the whole batch, all ranks; default `rewards`: "batch"), or no division
    ("none"). All-equal groups give 0."""
    r = rewards.view(-1, G)
    centered = r - r.mean(1, keepdim=True)
    if scale_rewards == "none":
        return centered.flatten()
    if scale_rewards == "group":
        std = r.std(1, keepdim=True)
    else:  # (8) "batch": TRL's, beside the paper's "group"
        std = (rewards if batch_rewards is None else batch_rewards).std()
    return (centered / (std + eps)).flatten()


def position_logprobs(model, heads, r, rows, temperature):
    """Per generated position of rows `rows`: sum_d log N(z; mu, sigma) (+ log p(continue) after a
    stop check) at latents, log p(stop) where the stop head ended the span, log pi(token) at
    temperature for sampled tokens (computed in chunks of positions: never whole logits). Also
    sigma's mean over latents (for the log)."""
    ids, mask, latent_mask, latents = r.inputs(rows)
    lp, hidden = common.lm_logprobs(model, ids, mask, common.positions(mask), r.tokens[rows], temperature, latent_mask,
                                    None if latents is None else latents.detach())
    P = r.prompt_ids.shape[1]
    h_prev = hidden[:, P - 1:-1]                    # the hidden state each generated position was chosen from
    tok_lp = lp.token
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


def clamped_ppo_loss(logp, old_logp, adv, eps, clamp, eps_high=None):
    """max(-A rho, -A clip(rho, 1 - eps, 1 + eps_high)) with rho = exp(clamp(logp - old, -c, c));
    eps_high defaults to eps ((8) TRL's clip-higher; the paper's clip is symmetric)."""
    ratio = torch.exp((logp - old_logp).clamp(-clamp, clamp))
    high = eps if eps_high is None else eps_high
    return torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + high)), ratio


def sequence_loss(per_pos, is_latent, is_answer):
    """The authors' aggregation, per row: the mean over its latent positions plus the mean over its
    answer positions (the stop decision counts with the answer, as in their code)."""
    def mean(m):
        return (per_pos * m).sum(1) / m.sum(1).clamp(min=1)
    return mean(is_latent) + mean(is_answer)


def clip_fraction(ratio, mask, eps, eps_high, n_pos):
    """The share of `n_pos` scored positions whose ratio lies outside the clip range [1 - eps, 1 + eps_high],
    counted on both sides whatever the advantage's sign."""
    clipped = ((ratio - 1) > eps_high) | ((1 - ratio) > eps)
    return ((clipped.float() * mask).sum() / n_pos).item()


def run_eval(model, tokenizer, cfg, test, args, d, logger, step):
    """Greedy pass@1 and #L on the test questions (z = mu, the stop head's argmax), logged at `step`."""
    res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                          max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
    logger.log({"phase": "rl", "eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
    return {"pass@1": res["pass@1"], "mean_L": res["mean_L"]}


def main(args):
    # ---- 0. setup: checks, the SFT checkpoint (LM, heads, frozen decoder), data, AdamW, resume
    if args.log_ratio_clamp <= 0:
        common.die(f"--log_ratio_clamp must be > 0 (got {args.log_ratio_clamp})")
    scale_rewards = SCALE_REWARDS[args.scale_rewards]
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    if not (Path(args.model_name_or_path) / "config.json").is_file():   # missing, or an atp_sft run cut short
        common.die(f"{args.model_name_or_path} holds no checkpoint: make it first with atp_sft.py (atp_rl.py starts "
                   "from an ATP-Latent SFT checkpoint)")
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)  # fp32 master weights
    if (cfg or {}).get("mode") in (None, "cot"):
        common.die(f"{args.model_name_or_path} is not an ATP-Latent checkpoint (latent_config mode atp): make one "
                   "from it with atp_sft.py")
    common.check_start(cfg, ("atp",), "atp_rl.py")
    # how the checkpoint prompts (chat template, system turn) and its dataset: the same in RL and eval.py
    start = dict(cfg)
    train, test = common.load_train_eval(args, start)
    cfg = {**cfg, **common.prompt_settings(args, start, train), "dataset": start["dataset"], "phase": "rl",
           "method": "atp_rl"}
    bf16 = common.use_bf16(args.bf16, d.device)
    markers = common.require_tokens(tokenizer, [START_LATENT, END_LATENT, LATENT], "an ATP-Latent model")
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                              trainable_token_ids=markers)   # (5) LoRA: the markers' rows stay trainable
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    heads = attach_heads(model, load_heads(args.model_name_or_path, model.config.hidden_size, d.device))
    decoder = load_decoder(args.model_name_or_path, d.device, torch.bfloat16 if bf16 else torch.float32)  # (1) frozen
    decoder = common.wrap_model(decoder, common.Dist(), bf16=bf16)  # (5) whole on every rank
    model = common.wrap_model(model, d, args.distributed, bf16)
    G = args.num_generations
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(heads.parameters()),
                                  lr=args.learning_rate, weight_decay=args.weight_decay)
    rng = random.Random(args.seed + 1000 * d.rank)
    # --save_steps and --resume_from_checkpoint: the LM (its adapters with LoRA), the heads, AdamW,
    # the data order and every random state (the decoder is frozen)
    state = common.TrainState(args, d, {"model": model, "heads": heads}, [optimizer], rngs=[rng])
    start_step, extra = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=start_step)
    n_rows = args.train_batch_size // d.world * G          # rollouts per step on this rank
    seq_len = max(len(p) for p in encode_prompts(tokenizer, [ex["question"] for ex in train[:1000]], cfg))
    seq_len += args.max_completion_length
    common.print_memory_plan(model, d, args, min(args.micro_batch_size, n_rows), seq_len,
                             args.generation_batch_size or n_rows, seq_len, frozen=decoder, extra_modules=[heads])
    heads_files = {"vae_head": heads.vae, "stop_head": heads.stop}
    start = extra["start"] if start_step else run_eval(model, tokenizer, cfg, test, args, d, logger, 0)

    for step in tqdm(range(start_step + 1, args.max_steps + 1), desc="atp rl", initial=start_step,
                     total=args.max_steps, disable=not d.main):
        times = {}
        # ---- 1. rollout and reward: G per prompt, latents and stop decisions sampled; the frozen
        # decoder reads the latent pairs for the coherence reward
        batch = [train[i] for i in rng.sample(range(len(train)), args.train_batch_size // d.world)]
        model.eval(), heads.eval()
        with common.timer(times, "rollout_s"), torch.no_grad():
            r = common.generate(model, encode_prompts(tokenizer, [ex["question"] for ex in batch], cfg),
                                lambda: ATPStep(model, cfg, tokenizer, args.temperature, top_p=args.top_p, sample=True),
                                args.max_completion_length, common.stop_ids(model, tokenizer), tokenizer.pad_token_id,
                                G, args.generation_batch_size)   # r.extras["check"]: the stop checks (ATPStep.extras)
            texts = [common.decode_completion(tokenizer, r, i) for i in range(len(r.tokens))]
        times["rollout_tok_per_s"] = r.lengths.sum().item() / times["rollout_s"]   # positions, latents included
        with common.timer(times, "decode_s"):
            decoded = decode_latent_pairs(decoder, tokenizer, rollout_latents(r), cfg["c_thought"],
                                          args.max_step_tokens)
        answers = [batch[i // G]["answer"] for i in range(len(texts))]
        rewards, correct, fmt, coh = atp_rewards(texts, r.finished.cpu(), answers, decoded, args)

        # ---- 2. advantages: (R - group mean) / (group std + 1e-4) (--scale_rewards)
        batch_rewards = common.all_gather(rewards.to(d.device), d).cpu() if scale_rewards == "batch" else None
        adv = group_advantages(rewards, G, scale_rewards, batch_rewards).to(d.device)
        # what the loss scores: sampled tokens, latents, and the stop decision (not a forced end);
        # (7) the answer's EOS is scored (the authors' mask drops it)
        check = r.extras["check"]
        scored = (r.kinds == common.TOKEN) | (r.kinds == common.LATENT_STEP) | (check == 2)
        loss_mask = (scored & r.mask.bool()).float()
        is_lat = ((r.kinds == common.LATENT_STEP) & r.mask.bool()).float()
        N, micro = len(r.tokens), args.micro_batch_size
        with common.timer(times, "update_s"):
            # ---- 3. old log-probs (3): a no-grad forward of the rollout policy
            with torch.no_grad():
                old_logp = torch.cat([position_logprobs(model, heads, r, slice(i, i + micro), args.temperature)[0]
                                      for i in range(0, N, micro)])

            # ---- 4. update: PPO-clipped mini-batches, the authors' per-rollout aggregation
            model.train(), heads.train()
            stats = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "sigma": 0.0, "n": 0, "m": 0}
            rows_per_mini = args.mini_batch_size // d.world * G
            high = args.epsilon if args.epsilon_high is None else args.epsilon_high
            for _ in range(args.num_iterations):
                for m0 in range(0, N, rows_per_mini):
                    mini = range(m0, min(N, m0 + rows_per_mini))
                    n_pos = common.all_reduce(loss_mask[mini].sum().item(), d) or 1.0
                    for i in range(mini.start, mini.stop, micro):
                        rows = slice(i, min(i + micro, mini.stop))
                        logp, sigma = position_logprobs(model, heads, r, rows, args.temperature)
                        per_pos, ratio = clamped_ppo_loss(logp, old_logp[rows], adv[rows, None], args.epsilon,
                                                          args.log_ratio_clamp, args.epsilon_high)
                        loss = sequence_loss(per_pos, is_lat[rows], loss_mask[rows] - is_lat[rows]).sum() / len(mini)
                        loss.backward()
                        stats["loss"] += loss.item()
                        stats["clip_frac"] += clip_fraction(ratio, loss_mask[rows], args.epsilon, high, n_pos)
                        stats["sigma"] += sigma
                        stats["m"] += 1
                    common.average_gradients([heads], d)  # (5) the heads are replicated: gradients averaged by hand
                    stats["grad_norm"] += common.clip_grad_norm(model, args.max_grad_norm)
                    torch.nn.utils.clip_grad_norm_(heads.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stats["n"] += 1

        # ---- 5. log, evaluate, save
        n_lat = is_lat.sum(1)
        groups = rewards.view(-1, G)
        row = {"phase": "rl", "reward": rewards.mean().item(), "correct": correct.mean().item(),
               "format": fmt.mean().item(), "coherence": coh.mean().item(),
               "frac_zero_std": (groups.std(1) == 0).float().mean().item(),
               "n_latents": n_lat.mean().item(), "stop_rate": (check == 2).any(1).float().mean().item(),
               "completion_length": ((r.kinds == common.TOKEN) & r.mask.bool()).sum(1).float().mean().item(),
               "loss": stats["loss"] / stats["n"], "clip_frac": stats["clip_frac"] / stats["n"],
               "grad_norm": stats["grad_norm"] / stats["n"], "sigma": stats["sigma"] / max(1, stats["m"])}
        row = {k: (common.all_reduce(v, d) if isinstance(v, float) else v) for k, v in row.items()}
        logger.log({**row, **times}, step)
        if args.log_completions:
            common.write_completions(args.output_dir, step, [
                {"question": batch[i // G]["question"], "completion": texts[i], "decoded_latents": decoded[i],
                 "reward": rewards[i].item()} for i in range(0, N, G)], d)
        if step % args.eval_every == 0 and step != args.max_steps:
            run_eval(model, tokenizer, cfg, test, args, d, logger, step)
        state.maybe_save(step, tokenizer, cfg, extra={"start": start}, extra_modules=heads_files,
                         subfolders={"decoder": decoder})

    # ---- 6. final evaluation; save the LM and decoder/ in --save_dtype, the heads in fp32, latent_config.json
    final = run_eval(model, tokenizer, cfg, test, args, d, logger, args.max_steps)
    common.finish(model, tokenizer, cfg, args, d, final, start, ["reward", "coherence", "eval_acc", "eval_mean_L"],
                  extra_modules=heads_files, subfolders={"decoder": decoder})
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
