"""Latent-SFT: latent reasoning as a superposition of vocabulary embeddings (the start Latent-GRPO needs).

Paper: Deng et al. 2025, "Latent Reasoning in LLMs as a Vocabulary-Space Superposition"
(github DJC-GO-SOLO/Latent-SFT), the initialisation used by seed 001 (Latent-GRPO, appendix B).
Spec: ../shared/ALGORITHMS.md, section 6.

A latent token is a top-k mixture of the embedding table, e = sum_i w_i E[id_i]: a point in the
span of the vocabulary, so a model can read it the way it reads words. Two stages.

Stage 1 builds, for each training chain of thought, a chain of latent tokens, about one per
`compression` CoT tokens. A compress marker follows every chunk of `compression` CoT tokens. The
encoder reads `question <think> c1 c2 M c3 c4 M ...` with a mask in which no query attends to an
earlier marker (each marker reads the text so far, not the other read-outs); the hidden state at
marker j, scored against the (detached) embedding table, gives top-k ids and weights
softmax(top-k scores): latent L_j. The decoder reads `question <think> L1 c3 c4 L2 c5 c6 ... Lm
</think> answer EOS`, each latent followed by the next chunk's text, and is trained with
cross-entropy on those chunks, </think> and the answer. The gradient reaches the encoder through
the mixture weights. Encoder and decoder train jointly.

Stage 2 teaches the model to produce the chain itself. Input: `question <think> [m slots] </think>
answer EOS`; slot j is fed the stage-1 soft label q_j with Gumbel noise,
q~ = softmax((log(q + 1e-10) + clamp(g, -1.5, 3)) / tau) on q's top-k support. Loss: cross-entropy
on </think> + answer + EOS, plus KL(q~ || softmax(z)) over that support at each slot, where z are
the logits of the position before the slot. At inference the model feeds back the top-k mixture
of its own log-probabilities until their argmax is </think>: the "mixture" mode, defined here
(`reasoning`; eval.py asks this file), with Gumbel noise on the latent scores for sampled pass@k.

Deviations and choices:
1. Stage 1 trains one schedule instead of the public repository's three steps (encoder, decoder,
   union), which it calls a convenience: every step trains the interleaved layout above and, with
   `--latent_only_pass` (default), also the all-latent layout stage 2 uses,
   `question <think> L1 ... Lm </think> answer`, with cross-entropy on </think> + answer. In the
   interleaved layout only L1 hides text the decoder cannot see, so without the second pass the
   later latents need not carry the reasoning (on the toy both variants end at 11% pass@1).
2. Encoder and decoder are two LoRA adapters on one base model (r 64, alpha 128) with
   `--lora_r 64`, as in the paper; the toy default `--lora_r 0` trains two full copies instead
   (a rank-64 adapter on a 128-wide model is not low-rank). Stage 2 continues from the decoder
   (merged into the base at the end, so plain transformers loads the result).
3. The stage-1 soft labels are recomputed by the frozen encoder for each stage-2 batch instead of
   being stored on disk (same values; no cache files).
4. Step counts instead of epochs (`--stage1_steps`, `--stage2_steps`); the paper trains 10 epochs
   per stage-1 step and 70 epochs in stage 2 on GSM8K-Aug. Each stage warms the learning rate up
   linearly from 0 over `--warmup_steps`, then decays it on a cosine to a tenth (transformers'
   get_cosine_with_min_lr_schedule_with_warmup). Defaults and learning rates are sized for the toy
   task; the real-model command below uses the paper's LoRA setting.
5. <think>, </think> and the compress marker <|compress|> are added when the tokenizer lacks them
   (Qwen2.5, Llama-3.2, SmolLM2 do), as rows of their own: the table's mean plus small noise, since
   a copy of an existing token ties its logit for as long as the row cannot move. With LoRA the
   base model is frozen, embedding table and LM head included, yet these rows train: each adapter
   has its own copy of the three rows (peft trainable tokens, without weight decay), as each full
   copy has its own tables; in stage 2 the decoder's rows train and the frozen encoder keeps its
   own. The merged checkpoint carries the decoder's. <|compress|> stays in the tokenizer (unused
   after stage 1). `--max_latent_steps` caps the latent chain at inference (then </think> is forced).
6. Under torchrun the two copies are wrapped in DDP, not FSDP2 (the mixture reads the embedding
   table outside the model's forward, where FSDP2 keeps it sharded); LoRA runs on one device.
   A 7B model fits one GPU with LoRA.
7. Starts from a plain model or a CoT checkpoint (another method's checkpoint: a one-line error).
   The training prompts are built as eval.py and the RL files build them (`--chat_template`, and
   with it a system prompt naming the answer format, `--system_prompt auto`), and recorded in
   latent_config.json, so later stages prompt the same way. `--dataset` is required off the toy
   model; a single local file gives up a tenth of its rows for evaluation. `--bf16` (default on a
   bf16 GPU) computes in bf16 on fp32 master weights; the checkpoint is saved in the start model's
   published dtype (`--save_dtype`).

At real sizes: the cross-entropy and the stage-2 KL are computed from the hidden states in chunks
of positions, at the target tokens and the teacher's top-k ids only (`common.lm_logprobs`), never
as whole (rows, T, vocabulary) logits; the encoder's top-k over the table is found a chunk of
markers at a time without gradients, then its k scores are computed again with them.
`--gradient_checkpointing` recomputes each decoder layer in backward, in both roles (with LoRA,
with the adapter its forward ran with). `--save_steps` counts steps over both stages; a
checkpoint holds both roles (the encoder is stage 2's teacher), and `--resume_from_checkpoint
latest` continues in either stage, with that stage's optimizer and schedule. The memory plan
printed before the first step says whether a run fits.

Commands:
    python latent_sft.py                                          # toy: from checkpoints/toy-cot
    python eval.py --model runs/latent_sft --num_samples 8        # deterministic pass@1, Gumbel pass@8
    python latent_sft.py --model meta-llama/Llama-3.2-1B-Instruct --dataset whynlp/gsm8k-aug --chat_template --bf16 true \
        --lora_r 64 --lora_alpha 128 --learning_rate 2e-4 --stage1_steps 20000 --stage2_steps 40000 \
        --train_batch_size 64 --micro_batch_size 8 --gradient_checkpointing --max_latent_steps 128 \
        --save_steps 1000 --output_dir runs/llama-latent-sft
        # one 80 GB GPU, the paper's two LoRA adapters (Qwen/Qwen2.5-1.5B-Instruct likewise)
    torchrun --nproc_per_node 8 latent_sft.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset whynlp/gsm8k-aug --chat_template \
        --bf16 true --learning_rate 1e-5 --stage1_steps 20000 --stage2_steps 40000 --train_batch_size 128 \
        --micro_batch_size 16 --gradient_checkpointing --max_latent_steps 128 --save_steps 1000 --output_dir runs/qwen-latent-sft
        # 8 GPUs: two full copies in DDP (memory plan ~50 GB per GPU)
    python latent_sft.py --model Qwen/Qwen2.5-Math-7B --dataset DigitalLearningGmbH/MATH-lighteval \
        --eval_dataset HuggingFaceH4/MATH-500 --bf16 true --lora_r 64 --lora_alpha 128 --learning_rate 2e-4 \
        --gradient_checkpointing --train_batch_size 64 --micro_batch_size 4 --max_latent_steps 1024 \
        --max_completion_length 4096 --save_steps 500 --output_dir runs/qwen-math-7b-latent-sft
        # the start of the Qwen2.5-Math-7B Latent-GRPO / Soft-GRPO runs, one 80 GB GPU with LoRA
    python latent_sft.py ... --resume_from_checkpoint latest     # the same command continues a stopped run
"""
import contextlib
import copy
import functools
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

import common
import toy

START_THINK, END_THINK = "<think>", "</think>"   # the latent span: prompts end with <think>
COMPRESS = "<|compress|>"                          # stage 1's marker after every chunk of CoT tokens


@dataclass
class Args:
    model_name_or_path: str = field(default=toy.COT, metadata={"aliases": ["--model"], "help": "start model: a plain causal LM or a CoT checkpoint (ideally one trained on explicit CoT)"})
    dataset: str = field(default="", metadata={"help": "training data with reasoning steps: whynlp/gsm8k-aug, a local .jsonl/.parquet, or toy (the default only for the toy model)"})
    eval_dataset: str = field(default="", metadata={"help": "evaluation data; default: the test split of --dataset (a single file: a held-out tenth of it)"})
    output_dir: str = field(default="runs/latent_sft", metadata={"help": "where the checkpoint, metrics.jsonl and plots go"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    chat_template: bool = field(default=False, metadata={"help": "format prompts with the tokenizer's chat template (kept from the checkpoint if it was trained so)"})
    system_prompt: str = field(default="auto", metadata={"help": "system turn with --chat_template; auto = the checkpoint's, else the answer format the reward checks"})
    compression: int = field(default=2, metadata={"help": "CoT tokens per latent token"})
    top_k: int = field(default=10, metadata={"help": "vocabulary entries per latent token"})
    lora_r: int = field(default=0, metadata={"help": "0 = two full copies (toy); 64 = the paper's two LoRA adapters (one device), each with its own trainable marker rows"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (with --lora_r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA's layers: all-linear, or comma-separated names (q_proj,v_proj)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder layer's activations in backward, in both roles (less memory, about a third more time)"})
    stage1_steps: int = field(default=300, metadata={"help": "optimizer steps of stage 1 (encoder and decoder)"})
    stage2_steps: int = field(default=500, metadata={"help": "optimizer steps of stage 2 (the decoder learns to produce the chain)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate (linear warmup from 0, then cosine to a tenth)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on the marker rows of a LoRA run)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps of each stage"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    train_batch_size: int = field(default=32, metadata={"help": "examples per optimizer step, all ranks together"})
    micro_batch_size: int = field(default=32, metadata={"help": "examples per forward pass on one rank"})
    gumbel_noise: float = field(default=1.0, metadata={"help": "stage 2: scale of the Gumbel noise on the soft labels"})
    gumbel_tau: float = field(default=1.0, metadata={"help": "stage 2: temperature of the noisy soft labels"})
    kl_weight: float = field(default=1.0, metadata={"help": "stage 2: weight of the KL to the noisy soft labels"})
    latent_only_pass: bool = field(default=True, metadata={"help": "stage 1: also train the all-latent layout (CE on the answer)"})
    max_latent_steps: int = field(default=64, metadata={"help": "inference cap on latent tokens (then </think> is forced)"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N training rows (0 = all)"})
    max_eval_samples: int = field(default=200, metadata={"help": "evaluation questions (0 = all)"})
    max_completion_length: int = field(default=96, metadata={"help": "generated positions per evaluation rollout, latents included"})
    eval_every: int = field(default=250, metadata={"help": "stage 2: evaluate every N steps"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "bf16 compute on fp32 master weights; default: on for a bf16-capable GPU, off on CPU"})
    save_dtype: str = field(default="auto", metadata={"help": "dtype of the saved weights: auto (the start model's published dtype) | float32 | bfloat16"})
    save_steps: int = field(default=0, metadata={"help": "write a checkpoint-<step> folder to resume from every N steps, counted over both stages (0 = only the final save)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest N checkpoint-<step> folders (default: all)"})
    resume_from_checkpoint: str = field(default="", metadata={"help": "continue a run: a checkpoint-<step> folder, or latest (the newest in --output_dir); its step says its stage"})
    track: bool = field(default=False, metadata={"help": "log to Weights & Biases"})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N steps"})


# ----------------------------------------------------------------------------------------------
# examples: the prompt, the CoT cut into chunks, the answer

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
    out = [torch.full((len(rows), width), pad_id, dtype=torch.long)] + [torch.zeros((len(rows), width), dtype=torch.bool) for _ in rows[0][1:]]
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
    """Stage 2: `prompt [m slots] </think> answer`: ids, mask, slot flags, loss mask."""
    rows = []
    for prompt, chunks, answer in parts:
        m, tail = len(chunks), [think[1]] + answer
        rows.append((prompt + [pad_id] * m + tail, [False] * len(prompt) + [True] * m + [False] * len(tail),
                     [False] * (len(prompt) + m) + [True] * len(tail)))
    return pad_batch(rows, pad_id, device)


# ----------------------------------------------------------------------------------------------
# the method: latent tokens from the encoder, the two losses

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
        if not self.lora:
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

    def parameters(self, stage):
        """What a stage trains: (weights, marker rows), the rows without weight decay (LoRA only; full
        copies train their whole tables). Stage 1: both roles; stage 2: the decoder."""
        if not self.lora:
            return list(self.decoder.parameters()) + (list(self.encoder.parameters()) if stage == 1 else []), []
        ours = [(n, p) for n, p in self.peft.named_parameters()
                if ("lora_" in n or "trainable_tokens_delta" in n) and (stage == 1 or self.adapter["decoder"] in n.split("."))]
        return [p for n, p in ours if "trainable_tokens_delta" not in n], [p for n, p in ours if "trainable_tokens_delta" in n]

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


# ----------------------------------------------------------------------------------------------
# inference: the model produces its own latent chain (eval.py's "mixture" mode, defined here)

def latent_token(logits, E, k, noise_scale=0.0):
    """The latent fed back at inference: top-k of l = log_softmax(z), weights softmax over those k,
    vector sum_i w_i E[id_i]; the recorded id is the top-1. `noise_scale` > 0 adds
    noise_scale * clamp(Gumbel, -1.5, 3) to l first: Gumbel sampling of the latents for pass@k
    (seed 001 section 4.4). Returns (vectors (N, d), ids (N,))."""
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
        forced = thinking & ~ends & (t >= max_latent_steps)
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
    return prompts, think_step(model, end, cfg.get("top_k", 10), cfg.get("max_latent_steps", 10 ** 9), noise, temperature, top_p)


def main(args):
    if args.compression < 1 or args.top_k < 1:
        common.die(f"--compression and --top_k must be at least 1 (got {args.compression}, {args.top_k})")
    d = common.setup_distributed(args.seed)
    common.check_args(args, d)
    if args.lora_r and d.world > 1:
        common.die("--lora_r runs on one device (two switching adapters in one DDP model are not supported); drop torchrun or use --lora_r 0")
    model, tokenizer, start_cfg = common.load_model(args.model_name_or_path, d.device, torch.float32)
    common.check_start(start_cfg, (None, "cot"), "latent_sft.py")
    data = {"dataset": (start_cfg or {}).get("dataset", "")}
    train, test = common.load_train_eval(args, data)        # --dataset, or the toy task of a toy start
    if not any(ex["steps"] for ex in train[:100]):
        common.die(f"{data['dataset']!r} has no reasoning steps to compress (Latent-SFT needs CoT data such as GSM8K-Aug)")
    prompting = common.prompt_settings(args, start_cfg, train)   # training prompts as eval.py and the RL files build them
    end_id = common.answer_end_id(tokenizer, prompting, common.stop_ids(model, tokenizer))
    cfg = {"mode": "mixture", "top_k": args.top_k, "max_latent_steps": args.max_latent_steps, **prompting,
           "method": "latent_sft", "compression": args.compression, "base_model": args.model_name_or_path, **data}
    # new rows of their own (table mean + noise): a copy of an existing token would tie it
    think = common.add_special_tokens(model, tokenizer, [START_THINK, END_THINK], init_from=None)
    marker = common.add_special_tokens(model, tokenizer, [COMPRESS], init_from=None)[0]
    bf16 = common.use_bf16(args.bf16, d.device)
    roles = TwoRoles(model, args, [think[0], think[1], marker])   # with LoRA, the three marker rows train
    if args.gradient_checkpointing:
        for m in [roles.peft] if roles.lora else [roles.encoder, roles.decoder]:
            common.enable_gradient_checkpointing(m, roles.as_in_forward if roles.lora else None)
    if roles.lora:  # one device: wrap_model only turns bf16 compute on
        common.wrap_model(roles.peft, d, bf16=bf16)
    else:
        roles.encoder, roles.decoder = common.wrap_model(roles.encoder, d, "ddp", bf16), common.wrap_model(roles.decoder, d, "ddp", bf16)
    per_rank, pad = args.train_batch_size // d.world, tokenizer.pad_token_id
    micro = min(args.micro_batch_size, per_rank)
    rng = random.Random(args.seed)
    totals, first = {1: args.stage1_steps, 2: args.stage2_steps}, {1: 1, 2: args.stage1_steps + 1}   # global steps
    # Trained: the decoder (saved as the checkpoint) and the encoder, trained in stage 1 and stage 2's
    # frozen teacher (its parameters keep requires_grad, outside stage 2's optimizer, so every
    # checkpoint holds it). Each stage makes its own optimizer and schedule; a resumed run makes
    # those of the checkpoint's stage for resume() to fill.
    state = common.TrainState(args, d, {"model": roles.peft} if roles.lora else {"model": roles.decoder, "encoder": roles.encoder},
                              rngs=[rng])

    def make_optimizer(stage):
        body, rows = roles.parameters(stage)
        groups = [{"params": body}] + ([{"params": rows, "weight_decay": 0.0}] if rows else [])
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.warmup_steps, totals[stage], min_lr_rate=0.1)
        state.optimizers, state.schedulers = [optimizer], [scheduler]
        return body + rows, optimizer, scheduler

    _, saved_step = state.checkpoint()
    if saved_step:
        params, optimizer, scheduler = make_optimizer(1 if saved_step <= args.stage1_steps else 2)
    start_step, _ = state.resume()
    logger = common.Logger(args.output_dir, args, d, args.track, resume_step=start_step)
    parts = [split_example(tokenizer, ex, args, think, prompting, end_id) for ex in train[:1000]]
    longest = max(len(p) + sum(len(c) + 1 for c in ch) + len(a) + 1 for p, ch, a in parts)   # a layout, at most
    common.print_memory_plan(roles.decoder, d, args, micro, 3 * longest,   # stage 1 keeps 3 passes for backward
                             64, max(len(p) for p, _, _ in parts) + args.max_completion_length,   # evaluation rollouts
                             extra_modules=() if roles.lora else (roles.encoder,))

    def embeddings():  # the decoder's table (with LoRA: its own marker rows), whose span the latents mix
        return common.unwrap(roles.use("decoder")).get_input_embeddings().weight

    def run_eval(stage_step):
        model_now = roles.use("decoder")
        with torch.no_grad():
            res = common.evaluate(model_now, tokenizer, test, functools.partial(reasoning, model_now, tokenizer, cfg),
                                  max_new_tokens=args.max_completion_length, d=d, disable_progress=True)
        model_now.train()
        logger.log({"eval_acc": res["pass@1"], "eval_mean_L": res["mean_L"]}, stage_step)
        if d.main:
            tqdm.write(f"  eval: pass@1 {res['pass@1']:.3f}  #L {res['mean_L']:.1f}")
        return res

    for stage in (1, 2):
        total = totals[stage]
        if first[stage] + total - 1 <= start_step:   # done before the checkpoint this run resumed from
            continue
        if start_step < first[stage]:                # the stage starts here (a resumed one keeps resume()'s optimizer)
            params, optimizer, scheduler = make_optimizer(stage)
        window = {"s": 0.0, "tokens": 0, "steps": 0}
        done = max(0, start_step - first[stage] + 1)
        for i in tqdm(range(done, total), desc=f"latent-sft stage {stage}", disable=not d.main, initial=done, total=total):
            t0, n_positions = time.perf_counter(), 0
            picks = rng.sample(range(len(train)), args.train_batch_size)[d.rank::d.world]
            parts = [split_example(tokenizer, train[j], args, think, prompting, end_id) for j in picks]
            n_ce = common.all_sum(sum(sum(len(c) for c in p[1][1:]) + len(p[2]) + 1 if stage == 1 else len(p[2]) + 1
                                      for p in parts), d)
            n_slots = common.all_sum(sum(len(p[1]) for p in parts), d)
            n_answer = common.all_sum(sum(len(p[2]) + 1 for p in parts), d)
            stats = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "top1_weight": 0.0}
            for m in range(0, len(parts), micro):
                mb = parts[m:m + micro]
                E = embeddings()
                ids, mask, is_marker, attn = encoder_batch(mb, marker, pad, d.device)
                if stage == 1:
                    # encoder -> latent tokens -> decoder with CE on the next chunks and the answer
                    lat_ids, w = encode_latents(roles.use("encoder"), ids, mask, is_marker, attn, E, args.top_k)
                    dids, dmask, slot, loss_mask = decoder_batch(mb, think, pad, d.device)
                    latents = mixture(lat_ids, w, E)
                    lp = scored(roles.use("decoder"), dids, dmask, slot, scatter_slots(latents, slot))
                    ce, kl = token_ce(lp.token, loss_mask, n_ce), torch.zeros(())
                    n_positions += int(mask.sum() + dmask.sum())
                    if args.latent_only_pass:  # the same latents, no text between them: the answer must come from them
                        sids, smask, sslot, sloss_mask = student_batch(mb, think, pad, d.device)
                        lp = scored(roles.decoder, sids, smask, sslot, scatter_slots(latents, sslot))
                        ce = ce + token_ce(lp.token, sloss_mask, n_answer)
                        n_positions += int(smask.sum())
                else:
                    # the frozen encoder's soft labels, noised, fed to the student; CE + KL on the slots
                    with torch.no_grad():
                        lat_ids, q = encode_latents(roles.use("encoder", train=False), ids, mask, is_marker, attn, E, args.top_k)
                    q_noisy = noisy_soft_labels(q, args.gumbel_noise, args.gumbel_tau)
                    sids, smask, slot, loss_mask = student_batch(mb, think, pad, d.device)
                    # the teacher's top-k at the position before each slot (position t predicts t + 1)
                    support = lat_ids.new_zeros((len(sids), sids.shape[1] - 1, args.top_k))
                    support[slot[:, 1:]] = lat_ids
                    lp = scored(roles.use("decoder"), sids, smask, slot, scatter_slots(mixture(lat_ids, q_noisy, E), slot), support)
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
            grad_norm = common.clip_grad_norm(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step = first[stage] + i
            window = {"s": window["s"] + time.perf_counter() - t0, "tokens": window["tokens"] + n_positions, "steps": window["steps"] + 1}
            if (i + 1) % args.log_every == 0 or i + 1 == total:
                row = {k: common.all_sum(v, d) for k, v in stats.items()}
                row.update(stage=stage, grad_norm=grad_norm, lr=scheduler.get_last_lr()[0],   # step_s, tok_per_s: this rank's
                           step_s=window["s"] / window["steps"], tok_per_s=window["tokens"] / window["s"])
                logger.log(row, step)
                window = {"s": 0.0, "tokens": 0, "steps": 0}
            if stage == 2 and (i + 1) % args.eval_every == 0 and i + 1 != total:
                run_eval(step)
            state.maybe_save(step, tokenizer, cfg)   # (with LoRA the decoder's adapter is the active one: the one merged)
    final = run_eval(args.stage1_steps + args.stage2_steps)
    out_model = roles.final_model()
    common.finish(out_model, tokenizer, cfg, args, d, final, plot_keys=["ce", "kl", "top1_weight", "eval_acc", "eval_mean_L"])
    return out_model


if __name__ == "__main__":
    main(common.parse_args(Args))
