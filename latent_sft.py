"""Latent-SFT: latent reasoning as a superposition of vocabulary embeddings (the start Latent-GRPO needs).

Paper: "Latent Reasoning in LLMs as a Vocabulary-Space Superposition", Jingcheng Deng, Liang Pang, Zihao Wei
et al. 2025, arXiv 2510.15522 (code: github DJC-GO-SOLO/Latent-SFT); the initialisation of Latent-GRPO
(arXiv 2604.27998, code: github DJC-GO-SOLO/Latent-GRPO).
Docs: docs/latent_sft.md

A latent token is a top-k mixture of the embedding table E: e = sum_i w_i E[id_i]. Two stages.

Stage 1 builds a chain of latents, one per `compression` CoT tokens. A compress marker M follows
every chunk; an encoder reads `question <think> c1 c2 M c3 c4 M ...` with a mask in which no query
attends to an earlier marker, and the hidden state h_j at marker j gives latent L_j:
ids = top-k(h_j . E^T), w = softmax(those k scores), E detached. A decoder reads
`question <think> L1 c3 c4 L2 ... Lm </think> answer` and learns by cross-entropy on the text after
each latent, </think> and the answer. Encoder and decoder train jointly (the gradient reaches the
encoder through w).

Stage 2 teaches the decoder to produce the chain itself. It reads `question <think> [m slots]
</think> answer`, slot j fed the frozen encoder's soft label q_j with Gumbel noise g:
    q~_j = softmax((log(q_j + 1e-10) + gumbel_noise * clamp(g, -1.5, 3)) / gumbel_tau)
    loss = CE(</think> answer) + kl_weight * mean_j KL(q~_j || softmax(z_{j-1})) on q_j's top-k ids
At inference (the "mixture" mode, which eval.py asks this file for) the model feeds back the top-k
mixture of its own log_softmax(z) until their argmax is </think>; Gumbel noise on those scores
samples the chain for pass@k.

Usage:
    python latent_sft.py                                      # toy: from checkpoints/toy-cot -> runs/latent_sft
    python eval.py --model runs/latent_sft --num_samples 8    # deterministic pass@1, Gumbel pass@8
    python latent_sft.py --model meta-llama/Llama-3.2-1B-Instruct --dataset whynlp/gsm8k-aug --chat_template \\
        --bf16 true --lora_r 64 --lora_alpha 128 --learning_rate 2e-4 --gradient_checkpointing   # one GPU
"""
import contextlib
import copy
import functools
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

import common
import toy

START_THINK, END_THINK = "<think>", "</think>"   # the latent span: prompts end with <think>
COMPRESS = "<|compress|>"                          # stage 1's marker after every chunk of CoT tokens


@dataclass
class Args(common.TrainArgs):
    # the method
    stage1_steps: int = field(default=300, metadata={"help": "optimizer steps of stage 1 (encoder and decoder)"})
    stage2_steps: int = field(default=500, metadata={"help": "optimizer steps of stage 2 (the decoder alone)"})
    compression: int = field(default=2, metadata={"help": "CoT tokens per latent token"})
    top_k: int = field(default=10, metadata={"help": "vocabulary entries per latent token"})
    latent_only_pass: bool = field(default=True, metadata={"help": "stage 1: also train the all-latent layout"})
    gumbel_noise: float = field(default=1.0, metadata={"help": "stage 2: scale of the Gumbel noise on the soft labels"})
    gumbel_tau: float = field(default=1.0, metadata={"help": "stage 2: temperature of the noisy soft labels"})
    kl_weight: float = field(default=1.0, metadata={"help": "stage 2: weight of the KL to the noisy soft labels"})
    max_latent_steps: int = field(default=64, metadata={"help": "inference cap on latent tokens, then </think>"})
    # the training loop
    micro_batch_size: int = field(default=32, metadata={"help": "examples per forward pass on one rank"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps of each stage"})
    eval_every: int = field(default=250, metadata={"help": "stage 2: evaluate every N steps"})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N steps"})
    # the flags every trainer shares (common.TrainArgs), with this method's defaults
    model_name_or_path: str = field(default=toy.COT, metadata={
        "help": "start model: a plain causal LM or a CoT checkpoint"})
    dataset: str = field(default="", metadata={
        "help": "training data with reasoning steps: a hub dataset, a local .jsonl/.parquet, or toy"})
    output_dir: str = "runs/latent_sft"
    train_batch_size: int = field(default=32, metadata={"help": "examples per optimizer step, all ranks together"})
    max_completion_length: int = field(default=96, metadata={
        "help": "generated positions per evaluation rollout, latents included"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on LoRA's marker rows)"})
    lora_r: int = field(default=0, metadata={"help": "0: two full copies (toy); 64: the paper's two LoRA adapters"})
    lora_alpha: int = 128
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer in backward, in both roles"})
    save_steps: int = field(default=0, metadata={
        "help": "a checkpoint-<step> every N steps, counted over both stages (0 = only at the end)"})


# ----------------------------------------------------------------------------------------------
# examples: the prompt, the CoT cut into chunks, the answer; the three layouts

def split_example(tokenizer, ex, args, think, prompting=None, end_id=None):
    """(prompt ids ending with <think>, CoT chunks of `compression` ids, answer ids ending with
    `end_id` (common.answer_end_id: the chat template's end of turn, or EOS)). `prompting`:
    {"prompt_format", "system_prompt"} (common.prompt_settings), as eval.py prompts."""
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    prompting = prompting or {"prompt_format": "plain", "system_prompt": ""}
    prompt = common.encode_prompt(tokenizer, ex["question"], prompting["prompt_format"] == "chat",
                                  prompting["system_prompt"]) + [think[0]]
    cot = tokenizer.encode("".join(s + "\n" for s in ex["steps"]), add_special_tokens=False) or [tokenizer.eos_token_id]
    chunks = [cot[i:i + args.compression] for i in range(0, len(cot), args.compression)]
    answer = tokenizer.encode(f"{common.ANSWER_MARKER} {ex['answer']}", add_special_tokens=False) + [end_id]
    return prompt, chunks, answer


def pad_batch(rows, pad_id, device):
    """Left-pad lists of (id, flag...) columns: returns ids (B, T), mask (B, T) and each flag (B, T) bool."""
    width = max(len(r[0]) for r in rows)
    out = [torch.full((len(rows), width), pad_id, dtype=torch.long)]
    out += [torch.zeros((len(rows), width), dtype=torch.bool) for _ in rows[0][1:]]
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, cols in enumerate(rows):
        n = len(cols[0])
        mask[b, width - n:] = 1
        for t, col in zip(out, cols):
            t[b, width - n:] = torch.as_tensor(col, dtype=t.dtype)
    return [t.to(device) for t in [out[0], mask] + out[1:]]


def encoder_batch(parts, marker_id, pad_id, device):
    """`prompt c1 c2 M c3 c4 M ...`: ids, mask, marker flags, and the 4D attention mask in which no
    query attends to an earlier marker (and nobody attends to padding)."""
    rows = []
    for prompt, chunks, _ in parts:
        ids, is_marker = list(prompt), [False] * len(prompt)
        for c in chunks:
            ids += c + [marker_id]
            is_marker += [False] * len(c) + [True]
        rows.append((ids, is_marker))
    ids, mask, is_marker = pad_batch(rows, pad_id, device)
    T = ids.shape[1]
    q, k = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    allowed = (k <= q)[None] & mask.bool()[:, None, :] & ~(is_marker[:, None, :] & (k < q)[None])
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)[None]  # padded rows see themselves (no NaN)
    return ids, mask, is_marker, allowed[:, None]


def decoder_batch(parts, think, pad_id, device):
    """`prompt L1 c3 c4 L2 ... Lm </think> answer`: ids, mask, latent-slot flags, loss mask (the
    tokens the cross-entropy scores)."""
    rows = []
    for prompt, chunks, answer in parts:
        ids, slot, loss_mask = list(prompt), [False] * len(prompt), [False] * len(prompt)
        for j in range(len(chunks)):
            nxt = chunks[j + 1] if j + 1 < len(chunks) else []
            ids += [pad_id] + nxt
            slot += [True] + [False] * len(nxt)
            loss_mask += [False] + [True] * len(nxt)
        tail = [think[1]] + answer
        ids, slot, loss_mask = ids + tail, slot + [False] * len(tail), loss_mask + [True] * len(tail)
        rows.append((ids, slot, loss_mask))
    return pad_batch(rows, pad_id, device)


def student_batch(parts, think, pad_id, device):
    """Stage 2 (and stage 1's all-latent pass): `prompt [m slots] </think> answer`: ids, mask, slot
    flags, loss mask."""
    rows = []
    for prompt, chunks, answer in parts:
        m, tail = len(chunks), [think[1]] + answer
        rows.append((prompt + [pad_id] * m + tail, [False] * len(prompt) + [True] * m + [False] * len(tail),
                     [False] * (len(prompt) + m) + [True] * len(tail)))
    return pad_batch(rows, pad_id, device)


# ----------------------------------------------------------------------------------------------
# the method: latent tokens from the encoder, the noisy soft labels, the two losses

def encode_latents(encoder, ids, mask, is_marker, attn, E, k):
    """Top-k ids and weights of every marker (in batch order), from one encoder pass scored
    against the detached embedding table E. The top k are found without gradients, a chunk of
    markers at a time; their k scores are then computed again, with gradients: the same values
    and gradient as scoring the whole table, without keeping (markers, vocabulary) for backward."""
    _, hidden = common.lm_forward(encoder, ids, attn, common.positions(mask), logits_to_keep=1)
    h, E = hidden[is_marker].float(), E.detach().float()
    chunk = max(1, common.LOGPROB_CHUNK_ELEMENTS // E.shape[0])
    with torch.no_grad():
        top_ids = torch.cat([(h[i:i + chunk] @ E.T).topk(k, dim=-1).indices for i in range(0, len(h), chunk)])
    top = torch.einsum("nd,nkd->nk", h, E[top_ids])
    return top_ids, top.softmax(-1)


def mixture(ids, weights, E):
    """sum_i w_i E[id_i] per row: the latent token."""
    return torch.einsum("nk,nkd->nd", weights.to(E.dtype), E.detach()[ids])


def scatter_slots(vectors, slot):
    """(B, T, d) with the latent vectors (in batch order) at the slot positions, zeros elsewhere."""
    out = vectors.new_zeros(slot.shape + vectors.shape[-1:])
    return out.index_put(tuple(slot.nonzero().T), vectors)


def gumbel(x):
    """Standard Gumbel noise -log(-log U) shaped like x."""
    return torch.distributions.Gumbel(x.new_zeros(()), x.new_ones(())).sample(x.shape)


def noisy_soft_labels(q, noise, tau):
    """Stage 2's Gumbel-perturbed targets: softmax((log(q + 1e-10) + noise * clamp(g, -1.5, 3)) / tau)."""
    g = gumbel(q).clamp(-1.5, 3.0)
    return ((torch.log(q + 1e-10) + noise * g) / tau).softmax(-1)


def support_kl(target, logp):
    """KL(target || softmax(z)) summed over the support (rows: latent slots), from the model's
    log-probs at the support's ids, logp = log softmax(z)[ids]."""
    return (target * (torch.log(target + 1e-10) - logp)).sum(-1)


def token_ce(token_logprobs, loss_mask, n_tokens):
    """Summed cross-entropy of the tokens in `loss_mask`, / n_tokens, from token_logprobs =
    log softmax(z)[ids[:, 1:]] (position t predicts t+1; common.lm_logprobs)."""
    return -token_logprobs[loss_mask[:, 1:]].sum() / n_tokens


def scored(model, ids, mask, slot, vectors, support=None):
    """One forward of a decoder layout, its latent vectors at the slots: log softmax(z)[ids[:, 1:]]
    at every position and, with `support` (B, T - 1, k), at those ids; computed in chunks of
    positions (common.lm_logprobs: never the whole (B, T, vocabulary) logits)."""
    lp, _ = common.lm_logprobs(model, ids, mask, common.positions(mask), ids[:, 1:], latent_mask=slot,
                               latent_vectors=vectors, ids=support)
    return lp


# ----------------------------------------------------------------------------------------------
# two adapters on one model (--lora_r > 0), or two full copies

class TwoRoles:
    """The encoder and decoder: two full copies, or two LoRA adapters of one peft model, "default"
    (the decoder) and "encoder" (peft freezes the inactive adapter when switching; both must keep
    training in stage 1, so we re-enable it). With LoRA the base model is frozen, the embedding
    table and LM head with it; each adapter has its own rows of the marker tokens (peft's trainable
    tokens, `common.apply_lora`), as each full copy has its own tables."""

    def __init__(self, model, args, marker_ids):
        self.lora = args.lora_r > 0
        if not self.lora:  # (2) the toy default: two full copies, not the paper's two LoRA adapters
            self.decoder, self.encoder = model, copy.deepcopy(model)
            return
        self.peft = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                                      marker_ids)
        self.peft.add_adapter("encoder", self.peft.peft_config["default"])
        self.adapter = {"decoder": "default", "encoder": "encoder"}
        self.encoder = self.decoder = self.peft
        self.use("decoder")

    def use(self, role, train=True):
        """The model of `role`, in training mode (or eval); with LoRA, that adapter switched on."""
        if self.lora:
            self.peft.base_model.set_adapter(self.adapter[role])
            for n, p in self.peft.named_parameters():
                if "lora_" in n or "trainable_tokens_delta" in n:
                    p.requires_grad_(True)  # (TrainState saves the encoder's too: the teacher of stage 2)
        return (self.encoder if role == "encoder" else self.decoder).train(train)

    def embedding_table(self):
        """The decoder's input-embedding table (with LoRA: with its own marker rows): the latents mix its rows."""
        return common.unwrap(self.use("decoder")).get_input_embeddings().weight

    def parameters(self, stage):
        """What a stage trains: (weights, marker rows), the rows without weight decay (LoRA only; full
        copies train their whole tables). Stage 1: both roles; stage 2: the decoder."""
        if not self.lora:
            return list(self.decoder.parameters()) + (list(self.encoder.parameters()) if stage == 1 else []), []
        ours = [(n, p) for n, p in self.peft.named_parameters() if ("lora_" in n or "trainable_tokens_delta" in n)
                and (stage == 1 or self.adapter["decoder"] in n.split("."))]
        rows = [p for n, p in ours if "trainable_tokens_delta" in n]
        return [p for n, p in ours if "trainable_tokens_delta" not in n], rows

    def as_in_forward(self, layer):
        """--gradient_checkpointing with LoRA (common.enable_gradient_checkpointing's recompute_context):
        a checkpointed decoder layer runs its forward again in backward, and stage 1's backward reaches
        the encoder's passes after the decoder's adapter was switched on. Called in the layer's forward;
        its recomputation runs under the returned context: the adapter that forward ran with."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        tuners = [m for m in layer.modules() if isinstance(m, BaseTunerLayer)]
        in_forward = [m.active_adapter for m in tuners]

        @contextlib.contextmanager
        def recompute():
            now = [m.active_adapter for m in tuners]
            for m, a in zip(tuners, in_forward):
                m._active_adapter = a   # (peft's set_adapter would also change requires_grad, mid-backward)
            try:
                yield
            finally:
                for m, a in zip(tuners, now):
                    m._active_adapter = a
        return recompute()

    def final_model(self):
        """The decoder: a full copy, or the peft model with the decoder's adapter active (the
        checkpoint merges it, and its marker rows, into plain weights)."""
        return self.use("decoder", train=False)


def make_optimizer(roles, args, stage, steps, state):
    """A stage's AdamW (LoRA's marker rows without weight decay) and its schedule, registered with
    `state` for checkpoints: (trained parameters, optimizer, scheduler)."""
    body, rows = roles.parameters(stage)
    groups = [{"params": body}] + ([{"params": rows, "weight_decay": 0.0}] if rows else [])
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    # (4) per stage: linear warmup from 0 over --warmup_steps, then cosine to a tenth over `steps` (not epochs)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.warmup_steps, steps, min_lr_rate=0.1)
    state.optimizers, state.schedulers = [optimizer], [scheduler]
    return body + rows, optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# inference: the model produces its own latent chain (eval.py's "mixture" mode, defined here)

def latent_token(logits, E, k, noise_scale=0.0):
    """The latent fed back at inference: top-k of l = log_softmax(z), weights softmax over those k,
    vector sum_i w_i E[id_i]; the recorded id is the top-1. `noise_scale` > 0 adds
    noise_scale * clamp(Gumbel, -1.5, 3) to l first: Gumbel sampling of the latents for pass@k
    (Latent-GRPO's sampled evaluation). Returns (vectors (N, d), ids (N,))."""
    scores = logits.float().log_softmax(-1)
    if noise_scale > 0:
        scores = scores + noise_scale * gumbel(scores).clamp(-1.5, 3.0)
    top, ids = scores.topk(k, dim=-1)
    return mixture(ids, top.softmax(-1), E), ids[:, 0]


def think_step(model, end_id, k, max_latent_steps, noise_scale=0.0, temperature=0.0, top_p=1.0):
    """The rollout step (common.rollout) of a model whose prompt ends with <think>. While a row
    thinks it is fed `latent_token`; it stops thinking when the recorded id is </think> (fed as
    an ordinary token) or after `max_latent_steps` latents (</think> forced). Then its tokens are
    sampled (greedy at temperature 0)."""
    embedding = common.unwrap(model).get_input_embeddings()
    thinking = None

    def step(t, logits, hidden, done):
        nonlocal thinking
        if t == 0:
            thinking = torch.ones_like(done)
        # .weight read at each step: under FSDP2 it is the gathered table only during the rollout
        vec, ids = latent_token(logits, embedding.weight, k, noise_scale)
        ends = thinking & (ids == end_id)
        forced = thinking & ~ends & (t >= max_latent_steps)   # (6) a cap on the chain, then </think> is forced
        latent = thinking & ~ends & ~forced
        tokens = torch.where(latent | ends, ids, common.sample_token(logits, temperature, 0, top_p))
        tokens = tokens.masked_fill(forced, end_id)
        kinds = torch.full_like(tokens, common.TOKEN, dtype=torch.int8)
        kinds = kinds.masked_fill(latent, common.LATENT_STEP).masked_fill(forced, common.FORCED)
        thinking = latent
        return tokens, vec, kinds
    return step


def reasoning(model, tokenizer, cfg, temperature=0.0, top_p=1.0):
    """How a "mixture" checkpoint reasons (eval.py asks this file): (prompts(questions) -> token
    ids ending with <think>, the rollout step). Deterministic latents at temperature 0; sampled
    rollouts (temperature > 0) add Gumbel noise of scale cfg["noise_scale"] (default 1.0)."""
    start, end = common.require_tokens(tokenizer, [START_THINK, END_THINK], "a latent (mixture) model")
    chat, system = cfg.get("prompt_format") == "chat", cfg.get("system_prompt", "")

    def prompts(questions):
        return [common.encode_prompt(tokenizer, q, chat, system) + [start] for q in questions]
    noise = cfg.get("noise_scale", 1.0) if temperature > 0 else 0.0
    step = think_step(model, end, cfg.get("top_k", 10), cfg.get("max_latent_steps", 10 ** 9), noise, temperature, top_p)
    return prompts, step


def run_eval(roles, tokenizer, test, cfg, args, d, logger, step):
    """Greedy pass@1 (deterministic latents) and #L of the decoder, logged as eval_acc and eval_mean_L."""
    model = roles.use("decoder")
    with torch.no_grad():
        res = common.evaluate(model, tokenizer, test, functools.partial(reasoning, model, tokenizer, cfg),
                              max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
    model.train()
    logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, step)
    if d.main:
        tqdm.write(f"  eval: pass@1 {res['pass@1']:.3f}  #L {res['mean_L']:.1f}")
    return res


def main(args):
    # ---- 0. setup: the start model and its data, the added tokens, the encoder and decoder
    if args.compression < 1 or args.top_k < 1:
        common.die(f"--compression and --top_k must be at least 1 (got {args.compression}, {args.top_k})")
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    if args.lora_r and d.world > 1:
        common.die("--lora_r runs on one device (two switching adapters in one DDP model are not supported); "
                   "drop torchrun or use --lora_r 0")
    model, tokenizer, start_cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    common.check_start(start_cfg, (None, "cot"), "latent_sft.py")   # (8) a plain model or a CoT checkpoint
    data = {"dataset": (start_cfg or {}).get("dataset", "")}
    train, test = common.load_train_eval(args, data)        # --dataset, or the toy task of a toy start
    if not any(ex["steps"] for ex in train[:100]):
        common.die(f"{data['dataset']!r} has no reasoning steps to compress "
                   "(Latent-SFT needs CoT data such as GSM8K-Aug)")
    prompting = common.prompt_settings(args, start_cfg, train)   # (8) prompts as eval.py and the RL files build them
    end_id = common.answer_end_id(tokenizer, prompting, common.stop_ids(model, tokenizer))
    cfg = {"mode": "mixture", "top_k": args.top_k, "max_latent_steps": args.max_latent_steps, **prompting,
           "method": "latent_sft", "compression": args.compression, "base_model": args.model_name_or_path, **data}
    # (5) <think>, </think>, <|compress|>: new rows of their own (table mean + noise); a copy of a token would tie it
    think = common.add_special_tokens(model, tokenizer, [START_THINK, END_THINK], init_from=None)
    marker = common.add_special_tokens(model, tokenizer, [COMPRESS], init_from=None)[0]
    bf16 = common.use_bf16(args.bf16, d.device)
    roles = TwoRoles(model, args, [think[0], think[1], marker])   # with LoRA, the three marker rows train
    if args.gradient_checkpointing:
        for m in [roles.peft] if roles.lora else [roles.encoder, roles.decoder]:
            common.enable_gradient_checkpointing(m, roles.as_in_forward if roles.lora else None)
    if roles.lora:  # one device: wrap_model only turns bf16 compute on
        common.wrap_model(roles.peft, d, bf16=bf16)
    else:  # (7) under torchrun two full copies in DDP, not FSDP2: the mixture reads the table outside the forward
        roles.encoder = common.wrap_model(roles.encoder, d, "ddp", bf16)
        roles.decoder = common.wrap_model(roles.decoder, d, "ddp", bf16)
    per_rank, pad = args.train_batch_size // d.world, tokenizer.pad_token_id
    micro = min(args.micro_batch_size, per_rank)
    rng = random.Random(args.seed)
    totals, first = {1: args.stage1_steps, 2: args.stage2_steps}, {1: 1, 2: args.stage1_steps + 1}   # global steps
    # Trained: the decoder (saved as the checkpoint) and the encoder, trained in stage 1 and stage 2's
    # frozen teacher (its parameters keep requires_grad, outside stage 2's optimizer, so every
    # checkpoint holds it). Each stage makes its own optimizer and schedule; a resumed run makes
    # those of the checkpoint's stage for resume() to fill.
    models = {"model": roles.peft} if roles.lora else {"model": roles.decoder, "encoder": roles.encoder}
    state = common.TrainState(args, d, models, rngs=[rng])
    _, saved_step = state.checkpoint()
    if saved_step:
        stage = 1 if saved_step <= args.stage1_steps else 2
        params, optimizer, scheduler = make_optimizer(roles, args, stage, totals[stage], state)
    start_step, _ = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=start_step)
    parts = [split_example(tokenizer, ex, args, think, prompting, end_id) for ex in train[:1000]]
    longest = max(len(p) + sum(len(c) + 1 for c in ch) + len(a) + 1 for p, ch, a in parts)   # a layout, at most
    common.print_memory_plan(roles.decoder, d, args, micro, 3 * longest,   # stage 1 keeps 3 passes for backward
                             64, max(len(p) for p, _, _ in parts) + args.max_completion_length,   # evaluation rollouts
                             extra_modules=() if roles.lora else (roles.encoder,))

    for stage in (1, 2):
        total = totals[stage]
        if first[stage] + total - 1 <= start_step:   # done before the checkpoint this run resumed from
            continue
        if start_step < first[stage]:                # the stage starts here (a resumed one keeps resume()'s optimizer)
            params, optimizer, scheduler = make_optimizer(roles, args, stage, total, state)
        window = {"s": 0.0, "tokens": 0, "steps": 0}
        done = max(0, start_step - first[stage] + 1)
        for i in tqdm(range(done, total), desc=f"latent-sft stage {stage}", disable=not d.main, initial=done,
                      total=total):
            # ---- 1. a batch: prompts, CoT chunks, answers; the token counts (all ranks) the losses divide by
            t0, n_positions = time.perf_counter(), 0
            picks = rng.sample(range(len(train)), args.train_batch_size)[d.rank::d.world]
            parts = [split_example(tokenizer, train[j], args, think, prompting, end_id) for j in picks]
            n_ce = common.all_reduce(sum(sum(len(c) for c in p[1][1:]) + len(p[2]) + 1 if stage == 1 else len(p[2]) + 1
                                         for p in parts), d, "sum")
            n_slots = common.all_reduce(sum(len(p[1]) for p in parts), d, "sum")
            n_answer = common.all_reduce(sum(len(p[2]) + 1 for p in parts), d, "sum")
            stats = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "top1_weight": 0.0}
            for m in range(0, len(parts), micro):
                mb = parts[m:m + micro]
                E = roles.embedding_table()
                ids, mask, is_marker, attn = encoder_batch(mb, marker, pad, d.device)
                if stage == 1:
                    # ---- 2a. stage 1: encoder -> latent tokens -> decoder, CE on the next chunks and the answer
                    lat_ids, w = encode_latents(roles.use("encoder"), ids, mask, is_marker, attn, E, args.top_k)
                    dids, dmask, slot, loss_mask = decoder_batch(mb, think, pad, d.device)
                    latents = mixture(lat_ids, w, E)
                    lp = scored(roles.use("decoder"), dids, dmask, slot, scatter_slots(latents, slot))
                    ce, kl = token_ce(lp.token, loss_mask, n_ce), torch.zeros(())
                    n_positions += int(mask.sum() + dmask.sum())
                    if args.latent_only_pass:  # (1) the same latents, no text between them: the answer needs them
                        sids, smask, sslot, sloss_mask = student_batch(mb, think, pad, d.device)
                        lp = scored(roles.decoder, sids, smask, sslot, scatter_slots(latents, sslot))
                        ce = ce + token_ce(lp.token, sloss_mask, n_answer)
                        n_positions += int(smask.sum())
                else:
                    # ---- 2b. stage 2: the frozen encoder's soft labels, noised, in the slots; CE + KL
                    with torch.no_grad():  # (3) recomputed for each batch, not stored by stage 1
                        lat_ids, q = encode_latents(roles.use("encoder", train=False), ids, mask, is_marker, attn, E,
                                                    args.top_k)
                    q_noisy = noisy_soft_labels(q, args.gumbel_noise, args.gumbel_tau)
                    sids, smask, slot, loss_mask = student_batch(mb, think, pad, d.device)
                    # the teacher's top-k at the position before each slot (position t predicts t + 1)
                    support = lat_ids.new_zeros((len(sids), sids.shape[1] - 1, args.top_k))
                    support[slot[:, 1:]] = lat_ids
                    vectors = scatter_slots(mixture(lat_ids, q_noisy, E), slot)
                    lp = scored(roles.use("decoder"), sids, smask, slot, vectors, support)
                    ce = token_ce(lp.token, loss_mask, n_ce)
                    kl = support_kl(q_noisy, lp.ids[slot[:, 1:]]).sum() / n_slots
                    w = q
                    n_positions += int(mask.sum() + smask.sum())
                loss = ce + args.kl_weight * kl
                (loss * d.world).backward()
                stats["loss"] += loss.item()
                stats["ce"] += ce.item()
                stats["kl"] += kl.item()
                stats["top1_weight"] += w[:, 0].sum().item() / n_slots
            # ---- 3. update
            grad_norm = common.clip_grad_norm(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # ---- 4. log, evaluate (stage 2), save
            step = first[stage] + i
            window = {"s": window["s"] + time.perf_counter() - t0, "tokens": window["tokens"] + n_positions,
                      "steps": window["steps"] + 1}
            if (i + 1) % args.log_every == 0 or i + 1 == total:
                row = {k: common.all_reduce(v, d, "sum") for k, v in stats.items()}
                row.update(stage=stage, grad_norm=grad_norm, lr=scheduler.get_last_lr()[0],   # times: this rank's
                           step_s=window["s"] / window["steps"], tok_per_s=window["tokens"] / window["s"])
                logger.log(row, step)
                window = {"s": 0.0, "tokens": 0, "steps": 0}
            if stage == 2 and (i + 1) % args.eval_every == 0 and i + 1 != total:
                run_eval(roles, tokenizer, test, cfg, args, d, logger, step)
            state.maybe_save(step, tokenizer, cfg)   # (with LoRA the decoder's adapter is active: the one merged)

    # ---- 5. final evaluation; save the decoder (LoRA: merged into the base, marker rows included)
    final = run_eval(roles, tokenizer, test, cfg, args, d, logger, args.stage1_steps + args.stage2_steps)
    out_model = roles.final_model()
    common.finish(out_model, tokenizer, cfg, args, d, final,
                  plot_keys=["ce", "kl", "top1_weight", "eval_acc", "eval_mean_L"])
    return out_model


if __name__ == "__main__":
    main(common.parse_args(Args))
