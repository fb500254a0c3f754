"""HRPO: reinforcement learning of hybrid latent reasoning (gated token embeddings + hidden representations).

Paper: "Hybrid Latent Reasoning via Reinforcement Learning", Yue et al., NeurIPS 2025, arXiv 2505.18454
(code: github.com/Yueeeeeeee/HRPO).

Inside the reasoning span (until the answer marker appears) each step's input is a gated mix of the
sampled token's embedding and a projection of its output distribution; with p = softmax(logits / tau):

    x ~ p,   e = E[x],   h~ = (sum_v p_v E_v) / ||p||_2
    r = sigmoid(W_r e + b_r),   i = sigmoid(W_i e + b_i),   a = exp(-c * softplus(-Lambda) * r)   (c = 8)
    next input = a * e + sqrt(1 - a^2 + 1e-8) * (i * h~)

Lambda starts at -log(u^(-1/c) - 1), u ~ U(r_min, r_max), so a = u^r starts near 1: the model first
reads almost plain tokens, and RL decides how much of h~ to let in (the hidden ratio, mean(1 - a)).
After the marker, decoding is plain. Training is REINFORCE, strictly on-policy (one update per batch):

    A = (R - group mean) / (group std + 1e-4),   loss = -A * log pi(token) + beta * k3(pi, pi_base)

averaged over each completion's tokens, then over completions. The training forward recomputes the
gates from the h~ the rollout stored, so the gradient reaches W_r, W_i and Lambda. The LM trains
through LoRA (or fully, --lora_r 0); the gate and Lambda train fully, each at its own learning rate.
This file also defines mode "hybrid" for eval.py (`reasoning`, `load_extras`: gate.safetensors).

Usage:
    python hrpo.py                      # toy: from the CoT checkpoint, LoRA -> runs/hrpo
    python hrpo.py --no_gate            # the paper's plain-interpolation ablation
    python eval.py --model runs/hrpo

Docs: docs/hrpo.md
"""
import functools
import random
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import toy


@dataclass
class Args(common.TrainArgs):
    # ---- HRPO's own
    temperature: float = field(default=0.5, metadata={"help": "tau: sampling temperature and the sharpness of h~"})
    c: float = field(default=8.0, metadata={"help": "the gate's scale c in a = exp(-c softplus(-Lambda) r)"})
    r_min: float = field(default=0.99, metadata={"help": "a starts as u^r with u ~ U(r_min, r_max)"})
    r_max: float = field(default=0.999, metadata={"help": "see --r_min"})
    # (7) the learning rates and max_steps are sized for the toy task; the paper's are 5e-6 / 1e-4 / 1e-3
    gate_learning_rate: float = field(default=1e-2, metadata={"help": "learning rate of W_r, W_i and their biases"})
    lambda_learning_rate: float = field(default=5e-2, metadata={"help": "learning rate of Lambda"})
    no_gate: bool = field(default=False, metadata={"help": "ablation: plain interpolation (1-w) e + w h~, no gate"})
    interp_weight: float = field(default=0.5, metadata={"help": "w of --no_gate"})
    strict_format: bool = field(default=False, metadata={
        "help": "the paper's reward: 0 unless the completion has exactly one answer marker"})
    # ---- the objective (TRL's names)
    num_generations: int = field(default=8, metadata={"help": "G: rollouts per prompt"})
    beta: float = field(default=0.005, metadata={"help": "k3 KL coefficient to the frozen base model"})
    loss_type: Literal["grpo", "dapo", "dr_grpo", "seq-mean-token-mean", "token-mean"] = field(
        default="grpo", metadata={"help": "how per-token losses are averaged (TRL's names; verl's two are aliases)"})
    scale_rewards: Literal["group", "batch", "none", "true", "false"] = field(default="group", metadata={
        "help": "advantage scaling: by the group's std, the batch's, or none (true/false = group/none)"})
    # ---- the training loop
    micro_batch_size: int = field(default=64, metadata={"help": "rollouts per forward pass on one rank"})
    max_steps: int = field(default=60, metadata={"help": "training steps"})
    generation_batch_size: int = field(default=0, metadata={
        "help": "rollouts generated at once on one rank, a multiple of --num_generations (0 = all of a step's)"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps"})
    log_completions: bool = field(default=False, metadata={
        "help": "write one completion per prompt to completions.jsonl"})
    distributed: Literal["ddp", "fsdp"] = field(default="ddp", metadata={"help": "under torchrun: DDP or FSDP2"})
    # ---- the flags every trainer shares (common.TrainArgs), with this method's defaults
    model_name_or_path: str = field(default=toy.COT, metadata={
        "help": "a plain causal LM, a CoT checkpoint, or an HRPO checkpoint (keeps its gate)"})
    output_dir: str = "runs/hrpo"
    max_completion_length: int = field(default=48, metadata={"help": "generated tokens per rollout"})
    # (7) the toy task's learning rate (the paper's: 5e-6)
    learning_rate: float = field(default=1e-4, metadata={"help": "learning rate of the language model (LoRA or full)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on Lambda)"})
    max_grad_norm: float = field(default=0.1, metadata={"help": "gradient clipping, the LM and the gate each"})
    lora_r: int = 32
    lora_alpha: int = 64
    # (5) --lora_dropout stays 0 (TrainArgs' default): the training log-probs are the rollout's


# ----------------------------------------------------------------------------------------------
# the hybrid input: h~, the gate, and the hook that feeds their mix in place of token embeddings

def hidden_representation(logits, embedding_weight, tau):
    """h~ = (sum_v p_v E_v) / ||p||_2 with p = softmax(z / tau) over the whole vocabulary. (N, d)"""
    p = (logits.float() / tau).softmax(-1)  # (2) h~ (and sampling) at tau; log-probs and KL at T = 1
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
        if self.interp_weight is not None:  # (6) --no_gate: a fixed w, no W_r, W_i or Lambda
            w = self.interp_weight
            return (1 - w) * e + w * h, torch.full_like(e, 1 - w)
        r = torch.sigmoid(self.W_r(e))
        i = torch.sigmoid(self.W_i(e))
        a = torch.exp(-self.c * F.softplus(-self.Lambda) * r)
        return a * e + torch.sqrt(1 - a * a + 1e-8) * (i * h), a


class HybridInput:
    """A forward hook on the input embedding, so the same code mixes the inputs in the KV-cached
    rollout (one position per step) and in the training forward (the whole completion), and
    gradients and FSDP see an ordinary forward. `arm(ids, h, span)` prepares the next forward: if its
    input ids are `ids` (compared where `span` is True: the rollout loop pads finished rows), the
    embedding e becomes gate(e, h) wherever `span` is True. Armed for one forward only (the next
    one disarms it, whatever it is). Also accumulates the hidden ratio mean(1 - a) over the
    positions it mixed (reset with `reset_stats`)."""

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
    marker, tau = cfg.get("answer_marker", common.ANSWER_MARKER), cfg["tau"]  # (1) "###", not the paper's "####"
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
    if strict_format and text.count(common.ANSWER_MARKER) != 1:  # (1) the paper's rule is --strict_format
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
    if scale_rewards == "group":
        std = r.std(1, keepdim=True)
    else:  # (8) "batch": TRL's, beside the paper's "group"
        std = (rewards if batch_rewards is None else batch_rewards).std()
    return (centered / (std + eps)).flatten()


def k3_kl(logp, ref_logp):
    """exp(ref - new) - (ref - new) - 1: non-negative, 0 where the policies agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def reinforce_loss(logp, ref_logp, adv, loss_mask, beta, n_seqs, loss_type="grpo", n_tokens=None, max_len=None):
    """Per token -A log pi + beta k3 (no ratio, no clip), this micro-batch's share of the batch's loss.
    "grpo" (the paper's): the mean over each completion's tokens, summed / n_seqs (the batch's
    completions); "dapo": the token sum / n_tokens (the batch's tokens); "dr_grpo": the token sum /
    (n_seqs x max_len). Returns (loss, summed per-sequence KL)."""
    per_tok = -adv[:, None] * logp
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_tok = (per_tok + beta * kl) * loss_mask
    n_tok = loss_mask.sum(1).clamp(min=1)
    if loss_type == "dapo":  # (8) TRL's loss types beside the paper's "grpo"
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


def reference_logprobs(model, ref, r, micro):
    """log pi_base(token) of every rollout row: plain token inputs, no gate; the frozen copy `ref`
    (full fine-tuning) or, with LoRA, the policy with its adapters off."""
    N = len(r.tokens)
    with torch.no_grad():
        if ref is not None:
            return torch.cat([completion_logprobs(ref, r, slice(i, i + micro)) for i in range(0, N, micro)])
        with common.unwrap(model).disable_adapter():
            return torch.cat([completion_logprobs(common.unwrap(model), r, slice(i, i + micro))
                              for i in range(0, N, micro)])


def run_eval(model, tokenizer, cfg, hyb, test, args, d, logger, step):
    """Greedy pass@1 and #L on the test questions and the hidden ratio of those rollouts, logged at `step`."""
    hyb.reset_stats()
    res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                          max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
    logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"],
                "eval_hidden_ratio": common.all_reduce(hyb.hidden_ratio, d)}, step)
    return {"pass@1": res["pass@1"], "mean_L": res["mean_L"]}


def main(args):
    # ---- 0. setup: checks, model, data, the reference, the gate, the adapters, AdamW, resume
    if not 0 < args.r_min <= args.r_max < 1:
        common.die(f"need 0 < --r_min <= --r_max < 1 (got {args.r_min}, {args.r_max})")
    if args.temperature <= 0:
        common.die(f"--temperature (tau) must be > 0: rollouts sample and h~ divides by it (got {args.temperature})")
    loss_type, scale_rewards = LOSS_TYPES[args.loss_type], SCALE_REWARDS[args.scale_rewards]
    d = common.setup_distributed(args.seed)   # seeds python, numpy and torch with seed + rank
    common.check_args(args, d)
    model, tokenizer, cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)  # fp32 master weights
    common.check_start(cfg, (None, "cot", "hybrid"), "hrpo.py")  # from language reasoning, or an HRPO checkpoint
    cfg = dict(cfg or {"mode": "cot"})
    train, test = common.load_train_eval(args, cfg)
    cfg.update(common.prompt_settings(args, cfg, train))  # chat template and system turn: saved for eval.py
    bf16 = common.use_bf16(args.bf16, d.device)
    d_model = model.get_input_embeddings().weight.shape[1]
    torch.manual_seed(args.seed)              # the reference, the gate and the adapters: the same on every rank
    ref = common.reference_model(model, args, d, bf16)   # (10) full fine-tuning: a frozen copy (LoRA: adapters off)
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
        {"params": [gate.Lambda], "lr": args.lambda_learning_rate, "weight_decay": 0.0},  # (3) no decay on Lambda
    ], lr=args.learning_rate, weight_decay=args.weight_decay)
    cfg.update(mode="hybrid", tau=args.temperature, answer_marker=common.ANSWER_MARKER,
               gate={"c": args.c, "interp_weight": args.interp_weight if args.no_gate else None},
               method="hrpo", base_model=args.model_name_or_path, lora_r=args.lora_r)
    G = args.num_generations
    rng = random.Random(args.seed)
    # --save_steps and --resume_from_checkpoint: the model (its adapters with LoRA), the gate, AdamW,
    # the data order and every random state
    state = common.TrainState(args, d, {"model": model, "gate": gate}, [optimizer], rngs=[rng])
    start_step, extra = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=start_step)
    n_rows = args.train_batch_size // d.world * G          # rollouts per step on this rank
    seq_len = max(len(p) for p in encode_prompts(tokenizer, [ex["question"] for ex in train[:1000]], cfg))
    seq_len += args.max_completion_length
    common.print_memory_plan(model, d, args, min(args.micro_batch_size, n_rows), seq_len,
                             args.generation_batch_size or n_rows, seq_len, frozen=ref, extra_modules=[gate])
    start = extra["start"] if start_step else run_eval(model, tokenizer, cfg, hyb, test, args, d, logger, 0)
    hidden_ratio = extra.get("hidden_ratio", float("nan"))

    for step in tqdm(range(start_step + 1, args.max_steps + 1), desc="hrpo", initial=start_step,
                     total=args.max_steps, disable=not d.main):
        times = {}
        # ---- 1. rollout and reward: G hybrid completions per prompt at tau, h~ and the span stored
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

        # ---- 2. advantages: (R - group mean) / (group std + 1e-4) (--scale_rewards)
        adv = group_advantages(rewards, G, scale_rewards,
                               common.all_gather(rewards, d) if scale_rewards == "batch" else None)
        loss_mask = r.mask.float()  # every generated position is a sampled token

        with common.timer(times, "update_s"):
            # ---- 3. reference log-probs: the base model, no gate, plain token inputs
            N, micro = len(r.tokens), args.micro_batch_size
            n_tokens = common.all_reduce(loss_mask.sum().item(), d, "sum") / d.world  # "dapo": DDP's mean over ranks
            ref_logp = reference_logprobs(model, ref, r, micro) if args.beta > 0 else None

            # ---- 4. update: one REINFORCE step on the whole batch, the gates recomputed from the stored h~
            model.train()
            loss_sum = kl_sum = 0.0
            for i in range(0, N, micro):
                rows = slice(i, min(i + micro, N))
                logp = completion_logprobs(model, r, rows, hyb)
                ref_rows = None if ref_logp is None else ref_logp[rows]
                loss, kl = reinforce_loss(logp, ref_rows, adv[rows], loss_mask[rows], args.beta, N, loss_type, n_tokens,
                                          args.max_completion_length)
                loss.backward()
                loss_sum += loss.item()
                kl_sum += kl.item()
            common.average_gradients([gate], d)  # (9) the gate is replicated: its gradient averaged by hand
            grad_norm = common.clip_grad_norm(model, args.max_grad_norm)  # (4) the LM and the gate clipped apart
            gate_grad_norm = float(torch.nn.utils.clip_grad_norm_(gate.parameters(), args.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # ---- 5. log, evaluate, save
        groups = rewards.view(-1, G)
        row = {"reward": rewards.mean().item(), "reward_std": groups.std(1).mean().item(),
               "frac_zero_std": (groups.std(1) == 0).float().mean().item(),
               "completion_length": loss_mask.sum(1).mean().item(),
               "hybrid_length": r.extras["span"].sum(1).float().mean().item(),
               "hidden_ratio": hidden_ratio, "truncated": 1 - r.finished.float().mean().item(), "loss": loss_sum,
               "grad_norm": grad_norm, "gate_grad_norm": gate_grad_norm, **times}
        if args.beta > 0:
            row["kl"] = kl_sum / N
        logger.log({k: common.all_reduce(v, d) if k not in times else v for k, v in row.items()}, step)
        if args.log_completions:
            common.write_completions(args.output_dir, step, [
                {"question": batch[i // G]["question"], "completion": texts[i], "reward": rewards[i].item()}
                for i in range(0, len(texts), G)], d)
        if step % args.eval_every == 0 and step != args.max_steps:
            run_eval(model, tokenizer, cfg, hyb, test, args, d, logger, step)
        state.maybe_save(step, tokenizer, cfg, extra={"start": start, "hidden_ratio": hidden_ratio},
                         extra_modules={"gate": gate})

    # ---- 6. final evaluation; save merged weights (11), gate.safetensors and latent_config.json
    final = run_eval(model, tokenizer, cfg, hyb, test, args, d, logger, args.max_steps)
    common.finish(model, tokenizer, cfg, args, d, final, start,
                  ["reward", "eval_acc", "completion_length", "hidden_ratio", "kl"],
                  extra_modules={"gate": gate}, note=f"hidden ratio {hidden_ratio:.4f}")
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
