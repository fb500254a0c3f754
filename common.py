"""Plumbing shared by every method file: models, data, answer checking, the KV-cached rollout
loop, evaluation, distributed setup, logging and checkpoints.

No algorithm lives here and nothing imports a method file; the rollout and evaluation loops are
driven by the step function a method file passes in.

Contents (each is a `# ----` banner below; search for "# <name>:"):
  errors                 one-line exits for bad input (die, warn, read_json, parse_args)
  models and tokenizers  load_model, added tokens, LoRA, gradient checkpointing
  data                   datasets as {question, steps, answer}; train/eval pools
  answer checking        extract_answer, is_correct (numbers, words, math-verify)
  latent inputs          the forward hooks, lm_forward, chunked lm_logprobs, sampling
  the rollout loop       Rollout, rollout, generate, completion_logprobs
  prompts                plain or chat-template prompts and the system prompt
  evaluation             pass@k, evaluate
  the memory plan        print_memory_plan (the estimate lives in benchmarks/memory_plan.py)
  distributed            Dist, check_args, wrap_model, all_reduce and friends
  logging                Logger, metrics.jsonl, plots
  checkpoints            save_checkpoint, finish, TrainState (resume)
The toy task and the tiny model live in toy.py.
"""
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Context, Decimal
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
LATENT_CONFIG = "latent_config.json"
ANSWER_MARKER = "###"          # what SFT targets put before the final answer (the checker also reads "####")


# ----------------------------------------------------------------------------------------------
# errors: bad input ends the program with one line, never a stack trace from deep inside torch

def die(msg):
    raise SystemExit(f"error: {msg}")


def warn(msg):
    """One line on the first process (a run that can go on correctly, but should say so)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {msg}", flush=True)


def first_line(e, width=200):
    """The first line of an exception's message, for a one-line error."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:width]


def read_json(path):
    """A JSON file the project wrote (latent_config.json, ...), or one line saying why it can't be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        die(f"{path} is not readable JSON ({first_line(e)})")


@dataclass
class TrainArgs:
    """The flags every trainer shares (TRL's names). A method file's `Args(TrainArgs)` declares its own
    flags, then re-declares the shared ones whose default (or help) it changes; --help lists its own first."""
    model_name_or_path: str = field(default="toy", metadata={
        "aliases": ["--model"], "help": "start model: toy, a local folder or a hub id"})
    dataset: str = field(default="", metadata={
        "help": "training data: a hub dataset, a local .jsonl/.parquet, or toy (the default for the toy model)"})
    eval_dataset: str = field(default="", metadata={
        "help": "evaluation data (default: the test split of --dataset, or a held-out tenth of one file)"})
    output_dir: str = field(default="runs/train", metadata={"help": "checkpoint, metrics.jsonl and plots"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    chat_template: bool = field(default=False, metadata={"help": "format prompts with the tokenizer's chat template"})
    system_prompt: str = field(default="auto", metadata={
        "help": "system turn with --chat_template (auto: the checkpoint's, else the answer format)"})
    train_batch_size: int = field(default=16, metadata={"help": "prompts per step, all ranks together"})
    max_completion_length: int = field(default=64, metadata={"help": "generated positions per rollout, latents too"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N training rows (0 = all)"})
    max_eval_samples: int = field(default=200, metadata={"help": "evaluation questions (0 = all)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "LoRA's layers: all-linear, or comma-separated names (q_proj,v_proj)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder layer in backward"})
    save_steps: int = field(default=0, metadata={"help": "a checkpoint-<step> every N steps (0 = only at the end)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest N checkpoint-<step>"})
    resume_from_checkpoint: str = field(default="", metadata={
        "help": "continue a run: a checkpoint-<step> folder, or latest (the newest in --output_dir)"})
    bf16: Optional[bool] = field(default=None, metadata={
        "help": "bf16 compute on fp32 master weights (default: on for a bf16-capable GPU)"})
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "dtype of the saved weights (auto: the start model's published dtype)"})
    track: bool = field(default=False, metadata={"help": "log to Weights & Biases"})


def flag_fields(cls):
    """(own, shared): cls's flags as (name, type, field), with cls's defaults; a shared flag that cls
    re-declares keeps the rest of TrainArgs' metadata (aliases, help)."""
    shared = {f.name: f for f in dataclasses.fields(TrainArgs)} if issubclass(cls, TrainArgs) else {}
    own, common = [], []
    for f in dataclasses.fields(cls):
        meta = {**shared[f.name].metadata, **f.metadata} if f.name in shared else f.metadata
        spec = (f.name, f.type, field(default=f.default, default_factory=f.default_factory, metadata=meta))
        (common if f.name in shared else own).append(spec)
    return own, common


def parse_args(cls, argv=None):
    """HfArgumentParser on a file's Args. With `Args(TrainArgs)`, the method's own flags come first in
    --help and the shared ones after, in their own group; an unknown flag or a bad value is one line."""
    from transformers import HfArgumentParser
    own, shared = flag_fields(cls)
    views = [dataclasses.make_dataclass("Own", own)]
    if shared:
        views.append(dataclasses.make_dataclass("Shared", shared, namespace={
            "_argument_group_name": "flags every trainer shares"}))
    parser = HfArgumentParser(views)
    # argparse would print the whole usage first, and name a flag with its dashed alias (--a_b/--a-b)
    parser.error = lambda message: die(re.sub(r"(--\w+)/--[\w-]+", r"\1", message) + " (see --help)")
    *parts, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        die(f"unknown argument {' '.join(rest)} (see --help)")
    return cls(**{k: v for part in parts for k, v in vars(part).items()})


# ----------------------------------------------------------------------------------------------
# models and tokenizers: loading, added tokens, LoRA, gradient checkpointing

def default_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def default_dtype(device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(name_or_path, device=None, dtype=None):
    """(model, tokenizer, latent_config or None) from "toy", a local folder or a hub id.
    The tokenizer pads on the left and has a pad token; `model.published_dtype` is the dtype the
    weights were published in (checkpoints are saved in it). A missing default toy checkpoint falls
    back to the untrained toy model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    import toy
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    latent_config, published = None, torch.float32
    if str(name_or_path) in (toy.COT, toy.COCONUT, toy.LATENT_SFT) and not Path(name_or_path).exists():
        print(f"warning: {name_or_path} is missing (make it with scripts/make_toy_checkpoints.sh); "
              "starting from the untrained toy model instead", flush=True)
        name_or_path = "toy"
    if name_or_path == "toy":
        tokenizer = toy.tokenizer()
        torch.manual_seed(0)
        model = toy.model(len(tokenizer)).to(dtype)
    elif str(name_or_path).endswith(".gguf"):
        die(f"{name_or_path} is a GGUF file: convert it first (python scripts/gguf_to_hf.py {name_or_path} DIR)")
    else:
        local = Path(name_or_path)
        if local.exists() and not (local / "config.json").is_file():
            die(f"{name_or_path!r} is a folder without config.json: not a model checkpoint")
        if not local.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1):
            die(f"model {name_or_path!r} is neither a local folder nor a hub id (org/name)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            published = getattr(AutoConfig.from_pretrained(name_or_path), "dtype", None) or torch.float32
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except Exception as e:  # a truncated weights file, a config that is not JSON, no such hub model, offline
            where = ("a damaged checkpoint folder" if local.exists() else
                     "not a local folder, and the hub is unreachable or has no such model")
            die(f"could not load model {name_or_path!r} ({where}): {first_line(e)}")
        if (local / LATENT_CONFIG).is_file():
            latent_config = read_json(local / LATENT_CONFIG)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.published_dtype = published if isinstance(published, torch.dtype) else getattr(torch, str(published))
    return model.to(device), tokenizer, latent_config


def stop_ids(model, tokenizer):
    """Every id that ends a completion: the tokenizer's eos and the generation config's eos ids (an
    instruct model ends its turn with <|im_end|> or <|eot_id|>, which may differ from the former)."""
    ids = unwrap(model).generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({tokenizer.eos_token_id, *ids})


def use_bf16(flag, device):
    """--bf16: None (the default) means on for a bf16-capable GPU and off elsewhere."""
    if flag is None:
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(flag)


def check_start(cfg, accepts, script):
    """One line naming the script that fits when a checkpoint of another method is given to
    `script` (None = a plain model, without latent_config.json)."""
    mode = (cfg or {}).get("mode")
    if mode not in accepts:
        fits = {"coconut": "grpo_latent.py or latent_value_rl.py", "mixture": "latent_grpo.py or soft_grpo.py",
                "hybrid": "hrpo.py", "atp": "atp_rl.py", "multiplex": "multiplex_thinking.py",
                "cot": "any RL script"}.get(mode, "eval.py")
        die(f"{script} does not train {mode!r} checkpoints (made by {(cfg or {}).get('method', '?')}); "
            f"use {fits}")


def add_special_tokens(model, tokenizer, tokens, init_from="<<"):
    """Add the `tokens` the tokenizer lacks; return the ids of all `tokens`. New input (and untied
    output) rows copy the first token of `init_from`, or with `init_from=None` are the table's mean
    plus seeded noise (0.1 x its std), so they tie no existing token's logit."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        old = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > old:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        ids = tokenizer.convert_tokens_to_ids(new)
        tables = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
            tables.append(out.weight)
        gen = torch.Generator().manual_seed(len(tokenizer))
        with torch.no_grad():
            for w in tables:
                if init_from is not None:
                    w[ids] = w[tokenizer.encode(init_from, add_special_tokens=False)[0]].clone()
                else:
                    base = w[:min(old, tokenizer.convert_tokens_to_ids(new[0]))].float()
                    noise = torch.randn((len(ids), w.shape[1]), generator=gen) * 0.1 * base.std()
                    w[ids] = (base.mean(0) + noise.to(w.device)).to(w.dtype)
    return tokenizer.convert_tokens_to_ids(list(tokens))


def mask_row_grads(model, rows):
    """Zero the input-embedding and LM-head gradients except at `rows` (added tokens); call after
    backward, before the step, with the tables in a no-weight-decay group (Adam then leaves the other
    rows exactly unchanged). Works on FSDP2's DTensor gradients too."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    m, seen = unwrap(model), set()
    for module in (m.get_input_embeddings(), m.get_output_embeddings()):
        w = getattr(module, "weight", None)
        if w is None or w.grad is None or id(w) in seen:
            continue
        seen.add(id(w))
        keep = torch.zeros((w.shape[0], 1), dtype=w.dtype, device=w.device)
        keep[list(rows)] = 1
        if isinstance(w.grad, DTensor):
            keep = distribute_tensor(keep, w.grad.device_mesh, w.grad.placements)
        w.grad.mul_(keep)


def apply_lora(model, r, alpha, dropout=0.0, target_modules="all-linear", trainable_token_ids=()):
    """--lora_r: peft LoRA of rank `r` (scaling alpha / r) on `target_modules` ("all-linear" or a
    comma-separated list of names), the rest frozen; the rows of `trainable_token_ids` (added tokens)
    stay trainable. r = 0 returns the model as it is. Saves merge the adapters (`save_checkpoint`)."""
    assert r >= 0 and 0 <= dropout < 1, (r, dropout)  # check_args gives scripts the one-line error
    if r == 0:
        return model
    from peft import LoraConfig, get_peft_model
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tokens = sorted({int(i) for i in trainable_token_ids})
    token_modules = None
    if tokens:
        token_modules = {names[emb]: tokens}
        if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
            token_modules[names[head]] = tokens
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        trainable_token_indices=token_modules)
    import warnings
    with warnings.catch_warnings():  # peft 0.21 asks transformers >= 5.24 for a renamed property
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def merge_lora(model, state):
    """A peft model's full state dict as the plain model's: W + scaling B A per LoRA layer, trainable
    token rows written in, peft's prefixes dropped. Only the gathered copy changes (training goes on);
    any other model's state is returned as is."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer
    m = unwrap(model)
    if not isinstance(m, PeftModel) or not state:  # (FSDP2 gathers the full state on rank 0 only)
        return state
    state = dict(state)
    for name, layer in m.named_modules():
        if isinstance(layer, LoraLayer):
            for a in layer.active_adapters:
                A, B = state.pop(f"{name}.lora_A.{a}.weight").float(), state.pop(f"{name}.lora_B.{a}.weight").float()
                w = state[f"{name}.base_layer.weight"]
                state[f"{name}.base_layer.weight"] = (w.float() + layer.scaling[a] * (B @ A)).to(w.dtype)
        elif isinstance(layer, TrainableTokensLayer):
            for a in layer.active_adapters:
                key = f"{name}.trainable_tokens_delta.{a}"
                if key in state:  # a tied LM head's layer shares the input table's rows
                    w, idx = state[f"{name}.base_layer.weight"], torch.as_tensor(layer.token_indices[a])
                    state[f"{name}.base_layer.weight"] = w.index_copy(0, idx, state.pop(key).to(w.dtype))
    prefix = "base_model.model."
    return {k[len(prefix):].replace(".base_layer", "").replace(".token_adapter", ""): v
            for k, v in state.items()
            if k.startswith(prefix) and "lora_" not in k and "trainable_tokens_delta" not in k}


def plain_model(model):
    """The transformers model under any wrapper (DDP, peft): what save_pretrained is called on."""
    m = unwrap(model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def reference_model(model, args, d, bf16=False):
    """--beta > 0: the KL reference, a frozen copy of the start model (bf16 when computing in bf16; under
    FSDP2 sharded like the policy). None without a KL term, or with --lora_r, where the reference is the
    policy with its adapters off (`scoring_reference`)."""
    if args.beta <= 0 or args.lora_r:
        return None
    ref = copy.deepcopy(model).to(torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
    return wrap_model(ref, d, "fsdp") if getattr(args, "distributed", "fsdp") == "fsdp" else ref


def scoring_reference(model, ref):
    """(the model that scores the KL reference, the context to score it in): the frozen copy, or the
    policy with its LoRA adapters off."""
    return (ref, contextlib.nullcontext()) if ref is not None else (model, unwrap(model).disable_adapter())


def enable_gradient_checkpointing(model, recompute_context=None):
    """--gradient_checkpointing: non-reentrant checkpointing of every decoder layer that keeps the KV
    cache (transformers' own drops it in training). A recomputed layer reads its cache as the forward
    saw it and does not write it again. `recompute_context(layer)`, if given, returns the context
    manager each recomputation runs under."""
    for i, layer in enumerate(plain_model(model).get_decoder().layers):
        layer.forward = functools.partial(_checkpointed_layer, layer, i, type(layer).forward.__get__(layer),
                                          recompute_context)
    return model


def _checkpointed_layer(layer, idx, forward, recompute_context, *args, **kwargs):
    """Decoder layer `idx`'s forward under torch.utils.checkpoint, in training with gradients only."""
    from torch.utils.checkpoint import checkpoint
    if not (layer.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # (named past_key_values before transformers 5.24)
    n = cache.get_seq_length(idx) if cache is not None else 0  # what the layer's cache holds before it appends
    extra = recompute_context(layer) if recompute_context is not None else contextlib.nullcontext()

    def update(keys, values, layer_idx, *rest, **kw):  # the recomputation's Cache.update: n cached + the new
        if n == 0:
            return keys, values
        held = cache.layers[idx]
        return torch.cat([held.keys[..., :n, :], keys], -2), torch.cat([held.values[..., :n, :], values], -2)

    @contextlib.contextmanager
    def recompute():
        if cache is not None:
            cache.update = update
        try:
            with extra:
                yield
        finally:  # (also when torch stops a recomputation early)
            if cache is not None:
                del cache.update
    return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), recompute()),
                      **kwargs)


def require_tokens(tokenizer, tokens, what):
    """The ids of `tokens`, or one line naming the missing ones (cheap: no get_vocab, runs per batch)."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    missing = [t for t, i in zip(tokens, ids)
               if i is None or (i == tokenizer.unk_token_id and t != tokenizer.unk_token)]
    if missing:
        die(f"{what}: the tokenizer has no {', '.join(missing)} (is this a checkpoint of that mode?)")
    return tokenizer.convert_tokens_to_ids(list(tokens))


# ----------------------------------------------------------------------------------------------
# data: every dataset becomes a list of {question, steps: [str], answer: str}

HF_DATASETS = {  # name -> (config, split names)
    "openai/gsm8k": ("main", {"train": "train", "test": "test"}),
    "whynlp/gsm8k-aug": (None, {"train": "train", "test": "test"}),
    "whynlp/gsm8k-aug-nl": (None, {"train": "train", "test": "test"}),
    "HuggingFaceH4/MATH-500": (None, {"train": "test", "test": "test"}),
}
QUESTION_FIELDS = ("question", "problem", "input", "Question", "query", "prompt")
ANSWER_FIELDS = ("answer", "target", "Answer", "final_answer", "label")


def _strip_number(s):
    """ "1,000" -> "1000", "145.0" -> "145", "2.50" stays (its precision is part of the answer);
    anything that is not a plain number stays as it is. Exact: no float in between."""
    x = as_number(s)
    if x is None:
        return str(s).strip()
    if abs(x.adjusted()) >= 100:
        return str(x)
    artifact = re.search(r"\.(\d*?)(?:9{5,}|0{5,})\d{0,3}$", format(x, "f"))  # GSM-Hard's 3244047.0999999996
    if artifact:
        x = x.quantize(Decimal(1).scaleb(-len(artifact.group(1))), ROUND_HALF_UP)
    return str(int(x)) if x == x.to_integral_value() else format(x, "f")  # 5.158e-07 -> "0.0000005158"


def normalize_example(row, where="dataset"):
    """Map a row of GSM8K, GSM8K-Aug, MATH, GSM-Hard, SVAMP, MultiArith, ... to the common form."""
    q = next((row[k] for k in QUESTION_FIELDS if k in row and row[k] is not None), None)
    if q is None:
        die(f"{where} has no question field (looked for {', '.join(QUESTION_FIELDS)}; it has {', '.join(row)})")
    if "Body" in row:  # SVAMP splits the question in two
        q = f"{row['Body'].strip()} {q.strip()}"
    steps, answer = [], None
    if isinstance(row.get("steps"), list):
        steps = [str(s) for s in row["steps"]]
    if "solution" in row and row["solution"]:
        steps = [p.strip() for p in str(row["solution"]).split("\n\n") if p.strip()]
        answer = row.get("answer") or extract_boxed(row["solution"])
    raw = next((row[k] for k in ANSWER_FIELDS if k in row and row[k] is not None), None)
    if answer is None and raw is not None:
        raw = str(raw)
        if "####" in raw:  # GSM8K: "reasoning lines\n#### 42"
            body, answer = raw.rsplit("####", 1)
            steps = steps or [line.strip() for line in body.strip().split("\n") if line.strip()]
        else:
            answer = raw
    if answer is None:
        die(f"{where} has no answer field (looked for {', '.join(ANSWER_FIELDS)}, solution; it has {', '.join(row)})")
    return {"question": str(q).strip(), "steps": steps, "answer": _strip_number(answer)}


def toy_task(name):
    """The generator of a built-in task of toy.py named by `name` ("toy": arithmetic, "prosqa-toy":
    graph reachability; either with ":N" for N training rows), else None."""
    import toy
    return toy.DATASETS.get(str(name).partition(":")[0])


def load_data(name, split, limit=None):
    """A built-in toy task ("toy" or "prosqa-toy", or "toy:N" / "prosqa-toy:N" for N training
    problems), a local .jsonl/.json/.parquet file, or a hub dataset from HF_DATASETS (or any hub id)."""
    generate = toy_task(name)
    if generate is not None:
        count = name.partition(":")[2]
        if ":" in name and not (count.isdigit() and int(count) > 0):
            die(f"dataset {name!r}: the number after ':' must be a positive count of training rows")
        rows = generate(split, int(count) if count and split == "train" else None)  # one split, whatever --seed
    elif Path(name).suffix in (".jsonl", ".json", ".parquet"):
        if not Path(name).is_file():
            die(f"dataset file {name!r} does not exist")
        import datasets
        datasets.disable_progress_bars()  # a local file: no "Generating train split" bars
        try:
            rows = list(datasets.load_dataset("parquet" if name.endswith(".parquet") else "json", data_files=name,
                                              split="train"))
        except Exception as e:  # a field whose type differs between rows (tabmwp's answers) fails in arrow
            try:
                lines = Path(name).read_text(encoding="utf-8").splitlines()
                rows = [json.loads(line) for line in lines if line.strip()]
            except UnicodeDecodeError as u:
                line = u.object[:u.start].count(b"\n") + 1
                byte = u.object[u.start:u.start + 1]
                die(f"dataset file {name!r} is not UTF-8 text: line {line} has the byte {byte!r}")
            except json.JSONDecodeError:
                die(f"could not read dataset file {name!r}: {first_line(e)}")
        finally:
            datasets.enable_progress_bars()
    elif Path(name).is_dir():
        files = sorted(Path(name).glob(f"{split}*.jsonl")) or sorted(Path(name).glob(f"*{split}*.parquet"))
        if not files:
            die(f"dataset folder {name!r} has no {split}*.jsonl or *{split}*.parquet file")
        return load_data(str(files[0]), split, limit)
    else:
        import datasets
        config, splits = HF_DATASETS.get(name, (None, {}))
        try:
            rows = list(datasets.load_dataset(name, config, split=splits.get(split, split)))
        except Exception as e:  # offline, unknown name, unknown split: one line, not a trace
            die(f"could not load dataset {name!r} split {split!r}: {first_line(e)}")
    if not rows:
        die(f"dataset {name!r} ({split}) is empty")
    out = [normalize_example(r, where=f"dataset {name!r}") for r in (rows[:limit] if limit else rows)]
    return out


def one_pool(name, eval_name=""):
    """True when evaluating `eval_name` (default: `name` itself) would draw from `name`'s training rows:
    a local file (one file is one pool of rows), or a hub dataset whose training split is its test
    split (HuggingFaceH4/MATH-500 has only a test split). Such a pool keeps a tenth for evaluation."""
    if eval_name and Path(eval_name).resolve() != Path(name).resolve():
        return False
    splits = HF_DATASETS.get(name, (None, {}))[1]
    return Path(name).is_file() or (bool(splits) and splits.get("train") == splits.get("test"))


def hold_out(rows):
    """(train, test) of one pool: a tenth of the rows, chosen by a hash of the question (the same
    whatever --seed, and for eval.py as for the training script), is kept for evaluation."""
    import zlib
    held = [zlib.crc32(ex["question"].encode()) % 10 == 0 for ex in rows]
    return [ex for ex, h in zip(rows, held) if not h], [ex for ex, h in zip(rows, held) if h]


def load_train_eval(args, cfg=None):
    """(train, eval) rows from args (dataset, eval_dataset, max_*_samples; not the seed). Never trains
    on an eval question: one pool (`one_pool`) holds out a tenth, else training rows asking an eval
    question are dropped with a warning. Without --dataset: the toy task, only for toy models or a
    checkpoint's own toy task. Records the dataset in `cfg`."""
    import toy
    name, start = args.dataset, (cfg or {}).get("dataset", "")
    if not name:
        toy_model = args.model_name_or_path in ("toy", toy.COT, toy.COCONUT, toy.LATENT_SFT)  # (or its fallback)
        if not toy_model and not toy_task(start):
            die(f"--dataset is required with {args.model_name_or_path!r} (the toy task is the default only for "
                "the toy model): e.g. --dataset openai/gsm8k or a local .jsonl")
        name = start or "toy"
    train = load_data(name, "train")  # the toy tasks: one pool and one test split whatever --seed
    if one_pool(name, args.eval_dataset):
        train, test = hold_out(train)
        if not train or not test:
            die(f"{name!r} is too small to hold out evaluation rows: pass another --eval_dataset")
        if os.environ.get("RANK", "0") == "0":
            print(f"note: {name} is one pool of rows: {len(test)} of them (a tenth, by question hash) are held out "
                  "for evaluation and not trained on; pass another --eval_dataset to choose", flush=True)
    else:
        test = load_data(args.eval_dataset or name, "test")
        seen = {ex["question"] for ex in test}
        kept = [ex for ex in train if ex["question"] not in seen]
        if not kept:
            die(f"every training question of {name!r} is an evaluation question of {args.eval_dataset or name!r}: "
                "pass another --eval_dataset")
        if len(kept) < len(train):
            warn(f"{len(train) - len(kept)} of {len(train)} training rows of {name} ask an evaluation question: "
                 "left out of training")
        train = kept
    if cfg is not None:
        cfg["dataset"] = name
    return train[:args.max_train_samples or None], test[:args.max_eval_samples or None]


# ----------------------------------------------------------------------------------------------
# answer checking: plain numbers and words exactly, anything else by math-verify; never raises, never hangs

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")  # 1,000 / 2.5 / 1e5
WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")  # a gold answer of words (shorter: x, xy, (A) go to math-verify)
VERIFY_TIMEOUT = 5.0  # seconds per symbolic check


def extract_boxed(text):
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


def extract_answer(text):
    """The final answer in a completion: the last \\boxed{}, else what follows the last "###"/"####"
    marker (its first number if it has one), else the last number. None if there is none."""
    text = str(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if ANSWER_MARKER in text:
        tail = text.rsplit(ANSWER_MARKER, 1)[1].lstrip("#").strip()
        m = NUMBER.search(tail)
        return m.group(0).replace(",", "") if m else (tail.splitlines()[0].strip() if tail else None)
    nums = NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


def as_number(s):
    """A plain number ("-1,234.50", "$18", "\\$18.", "1e5") as an exact Decimal, else None."""
    s = str(s).replace("\\$", "").replace("$", "").strip().rstrip(".")
    return Decimal(s.replace(",", "")) if NUMBER.fullmatch(s) else None


DOUBLE_DIGITS = 15  # significant digits a double carries exactly (decimal -> double -> decimal)


def _same_number(gold, pred):
    """Integer golds exactly; a decimal gold at its own number of places (pred rounded half-up), or
    at 15 significant digits if it has more: a gold printed from a double (GSM-Hard's
    1234567890534.400391) has no real digits past those, so 1234567890534.40 is right."""
    places = gold.as_tuple().exponent
    if places >= 0:
        return pred == gold
    ctx, q = Context(prec=200), Decimal(1).scaleb(max(places, gold.adjusted() - DOUBLE_DIGITS + 1))
    return pred.quantize(q, ROUND_HALF_UP, ctx) == gold.quantize(q, ROUND_HALF_UP, ctx)


# math-verify runs in a child process with its own timeouts off (they use signal.alarm, which only
# works in a main thread and cannot stop a long C-level power): every call has a hard deadline in
# any thread or process, and a child that runs past it is killed and started again at the next call.
_VERIFIER = """
import functools, json, sys
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
read = functools.lru_cache(4096)(
    lambda s: parse(s, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None))
out, sys.stdout = sys.stdout, sys.stderr
print("ready", file=out, flush=True)
for line in sys.stdin:
    gold, pred = json.loads(line)
    try:
        ok = bool(verify(read(gold), read(pred), timeout_seconds=None))
    except Exception:
        ok = False
    print(int(ok), file=out, flush=True)
"""
_verifier = {"proc": None, "lock": threading.Lock()}
os.register_at_fork(after_in_child=lambda: _verifier.update(proc=None, lock=threading.Lock()))


def _read_line(proc, timeout):
    out, deadline = b"", time.monotonic() + timeout
    while not out.endswith(b"\n"):
        if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            return None
        out += chunk
    return out.decode().strip()


def _math_verify(gold, pred):
    """math-verify's verify(parse(gold), parse(pred)) (LaTeX and expression extraction) in the child
    process; False after VERIFY_TIMEOUT seconds."""
    with _verifier["lock"]:
        proc, answer = _verifier["proc"], None
        try:
            if proc is None or proc.poll() is not None:
                proc = _verifier["proc"] = subprocess.Popen([sys.executable, "-c", _VERIFIER], stdin=subprocess.PIPE,
                                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                if _read_line(proc, 120) != "ready":
                    return False
            proc.stdin.write((json.dumps([gold, pred]) + "\n").encode())
            proc.stdin.flush()
            answer = _read_line(proc, VERIFY_TIMEOUT)
        finally:
            if answer is None and proc is not None:  # past the deadline, dead, or never ready
                proc.kill()
                proc.wait()
                _verifier["proc"] = None
        return answer == "1"


def _as_words(s):
    """A word answer as compared: \\text{} unwrapped, spaces collapsed, no trailing period, lower case."""
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", str(s))
    return " ".join(s.split()).rstrip(".").strip().lower()


def is_correct(completion, gold):
    """True if the completion's final answer (extract_answer) matches `gold`: plain numbers exactly (a
    decimal gold at its own precision), plain words (letters only, 3 or more) up to case, spacing and a
    trailing period, anything else by math-verify on both wrapped in \\boxed{}. Never raises."""
    try:
        pred = extract_answer(completion)
        if pred is None or gold is None:
            return False
        words = " ".join(str(gold).split()).rstrip(".").strip()
        if WORDS.fullmatch(words) and sum(c.isalpha() for c in words) >= 3:
            return _as_words(pred) == words.lower()
        g, p = as_number(gold), as_number(pred)
        if g is not None and (p is not None or not re.search(r"\d", pred)):  # no digit: never a number
            return p is not None and _same_number(g, p)
        if len(pred) > 500:  # long garbage is not worth a symbolic parse
            return False
        return _math_verify(f"\\boxed{{{gold}}}", f"\\boxed{{{pred}}}")
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# latent inputs: forward hooks let any HF causal LM take vectors in place of some tokens and hand back
# its last hidden state through its own forward (FSDP2, DDP and peft keep working); the LM head's
# forward returns chunked per-position log-probs instead of logits when `lm_logprobs` asks.

class _LatentIO:
    def __init__(self, model):
        self.vectors = None  # (B, T, d) or None; used where self.mask is True
        self.mask = None
        self.hidden = None
        self.bf16 = False    # compute under bf16 autocast (set by wrap_model)
        self.request = None  # what lm_logprobs asks the LM head for (one forward), or None
        forward = inspect.signature(plain_model(model).forward).parameters  # the KV cache's argument:
        self.cache_kwarg = "cache" if "cache" in forward else "past_key_values"  # renamed in transformers 5.24
        model.get_input_embeddings().register_forward_hook(self._embed_hook)
        model.get_decoder().register_forward_hook(self._decoder_hook)
        self.head = model.get_output_embeddings()
        self.head_forward = None if self.head is None else self.head.forward  # the head's own
        if self.head is not None:
            self.head.forward = self._head_forward  # on the instance: FSDP2/DDP/peft still call the module

    def _embed_hook(self, module, args, out):
        if self.mask is None:
            return out
        if isinstance(self.vectors, tuple):  # (ids, weights) (B, T, K): sum_k w_k E[id_k], embedded here, in the
            ids, w = self.vectors            # forward (the table whole under FSDP2), so gradients reach its rows
            mixed = (w[self.mask].unsqueeze(-1).to(out.dtype) * module.forward(ids[self.mask])).sum(-2)
            return out.masked_scatter(self.mask.unsqueeze(-1), mixed)
        return torch.where(self.mask.unsqueeze(-1), self.vectors.to(out.dtype), out)

    def _decoder_hook(self, module, args, out):
        self.hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state

    def _head_forward(self, hidden):
        """The head's own forward, unless lm_logprobs armed a request: then the packed statistics (n x T,
        columns) of all but the last position, computed inside the model's forward (FSDP2 has the weight
        unsharded) as a real output, not a view, so FSDP2's backward hooks run on them."""
        req, self.request = self.request, None  # None also tells lm_logprobs the request was served
        if req is None:
            return self.head_forward(hidden)
        return _chunked_stats(hidden[:, :-1], self.head.weight, getattr(self.head, "bias", None), **req)


def _io(model):
    inner = model.module if hasattr(model, "module") and not hasattr(model, "get_decoder") else model
    if not hasattr(inner, "_latent_io"):
        inner._latent_io = _LatentIO(inner)
    return inner._latent_io


def lm_forward(model, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
               latent_mask=None, latent_vectors=None, logits_to_keep=0):
    """One forward pass: `latent_vectors[b, t]` replaces the token embedding wherever `latent_mask[b, t]`
    is True; `latent_vectors` = (ids, weights), each (B, T, K), feeds sum_k weights[.., k] E[ids[.., k]]
    instead. Returns (logits, last hidden state after the final norm)."""
    io = _io(model)
    if latent_mask is not None and not latent_mask.any():
        latent_mask = None
    io.mask, io.vectors = latent_mask, latent_vectors
    try:
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=io.bf16):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=past_key_values is not None, logits_to_keep=logits_to_keep,
                        **{io.cache_kwarg: past_key_values})
    finally:
        io.mask = io.vectors = None
    hidden, io.hidden = io.hidden, None
    return out.logits, hidden


# Log-probs without whole logits (fp32 logits of 4 x 4,096 positions at a 151,936 vocabulary are 10 GB):
# lm_logprobs works a chunk of positions at a time and recomputes each chunk's logits in backward.


LOGPROB_CHUNK_ELEMENTS = 2 ** 26   # logits per chunk of positions (fp32: 256 MB; 441 positions at 151,936)
# config fields that change logits after the head unless "off" (their value when off)
_AFTER_HEAD = {"final_logit_softcapping": None, "logit_scale": 1, "logits_scaling": 1}


class LogProbs(NamedTuple):
    token: torch.Tensor            # (n, T) log softmax(z / temperature)[token]
    ids: torch.Tensor | None       # (n, T, K) log softmax(z / ids_temperature)[ids], if ids were given
    lse: torch.Tensor              # (n, T) logsumexp(z / temperature)
    entropy: torch.Tensor | None   # (n, T) entropy of softmax(z / temperature), if asked for


def _logit_stats(z, tokens, ids, t, t_ids, entropy):
    """Columns [token log-prob, lse, (entropy), (one per id)] of fp32 logits z (m, V)."""
    zt = z if t == 1 else z / t   # (a chunk's logits fewer at temperature 1)
    lse = zt.logsumexp(-1)
    cols = [zt.gather(-1, tokens[:, None]).squeeze(-1) - lse, lse]
    if entropy:
        cols.append(lse - (zt.softmax(-1) * zt).sum(-1))
    out = torch.stack(cols, -1)
    if ids is None:
        return out
    zi = zt if t_ids == t else z / t_ids
    lse_i = lse if t_ids == t else zi.logsumexp(-1)
    return torch.cat([out, zi.gather(-1, ids) - lse_i[:, None]], -1)


def _chunked_stats(hidden, weight, bias, tokens, ids, t, t_ids, entropy, chunk):
    """_logit_stats of hidden (n, T, d) @ weight.T + bias, max(1, chunk // V) positions at a time, as
    (n x T, columns). With gradients and several chunks each chunk is checkpointed, so neither pass
    holds more than one chunk's logits."""
    h, tokens, ids = hidden.flatten(0, 1), tokens.flatten(), None if ids is None else ids.flatten(0, 1)
    step = max(1, chunk // weight.shape[0])

    def stats(h, weight, bias, tokens, ids):  # the logits as the head makes them (bf16 under autocast), in fp32
        return _logit_stats(torch.nn.functional.linear(h, weight, bias).float(), tokens, ids, t, t_ids, entropy)

    run = stats
    if torch.is_grad_enabled() and len(h) > step:
        from torch.utils.checkpoint import checkpoint
        run = lambda *args: checkpoint(stats, *args, use_reentrant=False, preserve_rng_state=False)  # noqa: E731
    out = [run(h[a:a + step], weight, bias, tokens[a:a + step], None if ids is None else ids[a:a + step])
           for a in range(0, len(h), step)]
    return out[0] if len(out) == 1 else torch.cat(out)


def lm_logprobs(model, input_ids, attention_mask, position_ids, tokens, temperature=1.0, latent_mask=None,
                latent_vectors=None, ids=None, ids_temperature=None, entropy=False, chunk_elements=None,
                past_key_values=None):
    """Score `tokens` (n, T), the last T input ids, in one forward (as `lm_forward`) without (n, T, V)
    logits; returns (LogProbs, last hidden). LogProbs at `temperature`; `ids` (n, T, K) at
    `ids_temperature` (default temperature; 0 means 1). Values and gradients equal the whole logits';
    for SFT pass tokens=input_ids[:, 1:] (real ids, not -100)."""
    t = temperature if temperature > 0 else 1.0
    t_ids = t if ids_temperature is None else ids_temperature if ids_temperature > 0 else 1.0
    n, T = tokens.shape
    io, config = _io(model), unwrap(model).config.get_text_config()
    # A model that changes logits after its head (Gemma-2 softcapping, Cohere's logit_scale, Granite's
    # logits_scaling) falls back to whole (n, T, V) logits.
    chunked = io.head is not None and all(getattr(config, k, None) in (None, off) for k, off in _AFTER_HEAD.items())
    if chunked:
        io.request = dict(tokens=tokens, ids=ids, t=t, t_ids=t_ids, entropy=entropy,
                          chunk=chunk_elements or LOGPROB_CHUNK_ELEMENTS)
    try:
        out, hidden = lm_forward(model, input_ids, attention_mask, position_ids, past_key_values,
                                 latent_mask=latent_mask, latent_vectors=latent_vectors, logits_to_keep=T + 1)
    finally:
        unserved, io.request = io.request is not None, None
    if unserved:
        raise RuntimeError("the LM head was not the one common patched (was it replaced, e.g. by "
                           "resize_token_embeddings, after the model's first lm_forward?)")
    if not chunked:
        out = _logit_stats(out[:, :-1].float().flatten(0, 1), tokens.flatten(),
                           None if ids is None else ids.flatten(0, 1), t, t_ids, entropy)
    out, k = out.view(n, T, -1), 3 if entropy else 2
    return LogProbs(out[..., 0], None if ids is None else out[..., k:], out[..., 1],
                    out[..., 2] if entropy else None), hidden


def positions(attention_mask):
    """Position ids for a left-padded batch."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_left(seqs, pad_id, device=None):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Greedy when temperature == 0, else ancestral sampling with optional top-k / top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# the rollout loop: batched, left-padded, KV-cached; G rollouts per prompt from one prefill

TOKEN, LATENT_STEP, FORCED = 0, 1, 2   # what each generated position is


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # (N, P) left-padded, N = prompts * G, rows of a group adjacent
    prompt_mask: torch.Tensor      # (N, P)
    tokens: torch.Tensor           # (N, T) the id fed at each generated position (pad after the end)
    kinds: torch.Tensor            # (N, T) TOKEN (sampled: scored by a loss), LATENT_STEP or FORCED
    mask: torch.Tensor             # (N, T) 1 up to and including EOS, 0 after
    lengths: torch.Tensor          # (N,) generated positions, latents included
    finished: torch.Tensor         # (N,) True if EOS was produced (False: truncated)
    latents: torch.Tensor | None   # (N, T, d) vectors fed at LATENT_STEP positions (if stored)
    logprobs: torch.Tensor         # (N, T) log softmax(logits)[token] of the raw logits at each step
    extras: dict = field(default_factory=dict)  # per-position tensors (N, T, ...) a method records

    def inputs(self, rows=slice(None)):
        """What a forward over prompt + completion of `rows` takes: (ids, attention mask, latent mask,
        latent vectors or None). Only the selected rows are built (it runs per micro-batch)."""
        ids = torch.cat([self.prompt_ids[rows], self.tokens[rows]], 1)
        mask = torch.cat([self.prompt_mask[rows], self.mask[rows]], 1)
        if self.latents is None:
            return ids, mask, None, None
        is_latent = (self.kinds[rows] == LATENT_STEP) & self.mask[rows].bool()
        no = torch.zeros_like(self.prompt_mask[rows], dtype=torch.bool)
        lat = self.latents[rows]
        return ids, mask, torch.cat([no, is_latent], 1), torch.cat([lat.new_zeros(no.shape + lat.shape[-1:]), lat], 1)


def _preallocated_cache(model, capacity):
    """A DynamicCache whose full-attention layers write in place into buffers sized for the whole
    rollout and return views of the filled part (no torch.cat of the whole cache per step)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self.get_seq_length(), key_states.shape[-2]
            buf = getattr(self, "_buf", None)
            if (buf is None or buf[0].shape[0] != key_states.shape[0] or n + m > buf[0].shape[-2]
                    or (n and self.keys.data_ptr() != buf[0].data_ptr())):  # first use, resized or repeated batch
                buf = tuple(s.new_empty(s.shape[:2] + (max(capacity, n + m),) + s.shape[3:])
                            for s in (key_states, value_states))
                if n:
                    buf[0][:, :, :n], buf[1][:, :, :n] = self.keys, self.values
                self._buf = buf
            buf[0][:, :, n:n + m], buf[1][:, :, n:n + m] = key_states, value_states
            self.keys, self.values = buf[0][:, :, :n + m], buf[1][:, :, :n + m]
            return self.keys, self.values

    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def rollout(model, prompts, step_fn, max_new_tokens, eos_id, pad_id, num_generations=1, store_latents=True):
    """`num_generations` rollouts per prompt (token id lists) from one prefill. `step_fn(t, logits (N, V),
    hidden (N, d), done)` returns (ids (N,), vectors (N, d) or None, kinds (N,)); LATENT_STEP rows are fed
    their vector. A row stops after feeding an `eos_id` (int or list) as a TOKEN or FORCED id. Runs under
    inference_mode; the returned tensors are ordinary ones a loss can use."""
    with _full_weights(model), torch.inference_mode():  # gather outside inference mode
        r = _rollout(model, prompts, step_fn, max_new_tokens, eos_id, pad_id, num_generations, store_latents)
    return Rollout(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in vars(r).items()})


@contextlib.contextmanager
def _full_weights(model):
    """Under FSDP2, gather every shard once for the whole rollout (no collective per step; ranks may stop
    at different steps), resharded afterwards."""
    from torch.distributed.fsdp import FSDPModule
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def _rollout(model, prompts, step_fn, max_new_tokens, eos_id, pad_id, num_generations, store_latents):
    device = next(model.parameters()).device
    ids, pmask = pad_left(prompts, pad_id, device)
    cache = _preallocated_cache(unwrap(model), ids.shape[1] + max_new_tokens)
    logits, hidden = lm_forward(model, ids, pmask, positions(pmask), cache, logits_to_keep=1)
    G = num_generations
    if G > 1:
        cache.batch_repeat_interleave(G)
        ids, pmask = ids.repeat_interleave(G, 0), pmask.repeat_interleave(G, 0)
        logits, hidden = logits.repeat_interleave(G, 0), hidden.repeat_interleave(G, 0)
    N, P = ids.shape
    eos = torch.as_tensor(eos_id, device=device).view(-1)
    attn = torch.cat([pmask, pmask.new_ones(N, max_new_tokens)], 1)   # preallocated, sliced per step
    if unwrap(model).config._attn_implementation == "sdpa":  # one query per step: sdpa takes the key mask as is
        attn = attn.bool()[:, None, None, :]                       # (transformers won't rebuild it each step)
    pos = pmask.sum(1, keepdim=True) - 1
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    kinds = torch.zeros((N, max_new_tokens), dtype=torch.int8, device=device)
    logprobs = torch.zeros((N, max_new_tokens), device=device)
    latents = None
    done = torch.zeros(N, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    T = 0
    for t in range(max_new_tokens):
        last_logits, last_hidden = logits[:, -1].float(), hidden[:, -1]
        tok, vec, kind = step_fn(t, last_logits, last_hidden, done)
        tok = tok.masked_fill(done, pad_id)
        is_latent = (kind == LATENT_STEP) & ~done
        tokens[:, t], kinds[:, t] = tok, kind
        logprobs[:, t] = last_logits.log_softmax(-1).gather(1, tok[:, None]).squeeze(1)
        lengths += (~done).long()
        if vec is not None and store_latents and is_latent.any():
            if latents is None:
                latents = torch.zeros((N, max_new_tokens, vec.shape[-1]), dtype=vec.dtype, device=device)
            latents[:, t] = torch.where(is_latent[:, None], vec, 0)
        ended = ~done & (kind != LATENT_STEP) & torch.isin(tok, eos)
        finished |= ended
        done = done | ended
        T = t + 1
        if t == max_new_tokens - 1 or done.all():
            break
        pos = pos + 1
        logits, hidden = lm_forward(model, tok[:, None], attn[..., :P + t + 1], pos, cache,
                                    latent_mask=is_latent[:, None] if vec is not None else None,
                                    latent_vectors=vec[:, None] if vec is not None else None)
    tokens, kinds, logprobs = tokens[:, :T], kinds[:, :T], logprobs[:, :T]
    mask = (torch.arange(T, device=device)[None] < lengths[:, None]).long()
    return Rollout(ids, pmask, tokens, kinds, mask, lengths, finished,
                   latents[:, :T] if latents is not None else None, logprobs * mask)


def sampling_step(temperature=1.0, top_k=0, top_p=1.0):
    """A step_fn for plain language generation (explicit CoT)."""
    def step(t, logits, hidden, done):
        return sample_token(logits, temperature, top_k, top_p), None, torch.full_like(done, TOKEN, dtype=torch.int8)
    return step


def generate(model, prompts, make_step, max_new_tokens, eos_id, pad_id, num_generations=1, batch_size=0,
             store_latents=True):
    """`rollout` in pieces of at most `batch_size` rows (whole groups; 0 = all at once), joined into one
    Rollout. `make_step()` gives a fresh step function per piece; its `extras()`, if any, become the
    piece's `r.extras`. Rows come out as from one piece, except for the order random numbers are drawn."""
    G, pieces = num_generations, []
    assert batch_size >= 0 and batch_size % G == 0, (batch_size, G)  # check_args gives scripts the error line
    per_piece = len(prompts) if batch_size == 0 else batch_size // G
    for i in range(0, len(prompts), per_piece):
        step = make_step()
        r = rollout(model, prompts[i:i + per_piece], step, max_new_tokens, eos_id, pad_id, G, store_latents)
        if hasattr(step, "extras"):
            r.extras.update(step.extras())
        pieces.append(r)
    return pieces[0] if len(pieces) == 1 else concat_rollouts(pieces, pad_id)


def concat_rollouts(rs, pad_id):
    """One Rollout from several (pieces of a step's generation, rounds of dynamic sampling): prompts
    re-padded on the left, completions, latents and per-position extras on the right."""
    def pad(x, width, value=0, left=False):
        extra = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), value)
        return torch.cat([extra, x] if left else [x, extra], 1)
    P, T = max(r.prompt_ids.shape[1] for r in rs), max(r.tokens.shape[1] for r in rs)
    some = next((r.latents for r in rs if r.latents is not None), None)  # a piece without latent steps stores none
    latents = None if some is None else torch.cat([
        pad(r.latents if r.latents is not None else some.new_zeros(r.tokens.shape + some.shape[-1:]), T) for r in rs])
    return Rollout(
        prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_id, left=True) for r in rs]),
        prompt_mask=torch.cat([pad(r.prompt_mask, P, 0, left=True) for r in rs]),
        tokens=torch.cat([pad(r.tokens, T, pad_id) for r in rs]),
        kinds=torch.cat([pad(r.kinds, T, TOKEN) for r in rs]),
        mask=torch.cat([pad(r.mask, T) for r in rs]),
        lengths=torch.cat([r.lengths for r in rs]), finished=torch.cat([r.finished for r in rs]),
        latents=latents, logprobs=torch.cat([pad(r.logprobs, T) for r in rs]),
        extras={k: torch.cat([pad(r.extras[k], T) for r in rs]) for k in rs[0].extras})


def decode_completion(tokenizer, r: Rollout, i):
    """The text of rollout row i's sampled tokens (latent slots and forced markers left out)."""
    keep = (r.mask[i].bool() & (r.kinds[i] == TOKEN)).nonzero().squeeze(-1)
    return tokenizer.decode(r.tokens[i, keep].tolist(), skip_special_tokens=True)


def completion_logprobs(model, r: Rollout, rows=None, temperature=1.0, ids=None, ids_temperature=None, entropy=False,
                        detach_latents=True, chunk_elements=None):
    """`lm_logprobs` of the generated positions of rollout rows `rows`: one forward over prompt +
    completion with the stored latents fed back (detached: inputs, not actions); `ids` are the rows'
    own (n, T, K), e.g. r.extras["ids"][rows]."""
    rows = slice(None) if rows is None else rows
    input_ids, mask, latent_mask, latents = r.inputs(rows)
    if latents is not None and detach_latents:
        latents = latents.detach()
    return lm_logprobs(model, input_ids, mask, positions(mask), r.tokens[rows], temperature, latent_mask, latents,
                       ids, ids_temperature, entropy, chunk_elements)[0]


# ----------------------------------------------------------------------------------------------
# prompts: plain or the chat template, and the system prompt stating the answer format

SYSTEM_PROMPTS = {  # the answer format each reward checks (--system_prompt auto, with --chat_template)
    "number": "Solve the math problem step by step. End with the final answer, a number, on its own line "
              "after '####', like: #### 42",
    "latex": "Solve the math problem step by step. Put the final answer in \\boxed{}.",
}


def format_prompt(tokenizer, question, chat=False, system_prompt=""):
    """Plain "question\n" (GSM8K-Aug / Coconut) or the tokenizer's chat template, with
    `system_prompt` as the system turn when given."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            die("--chat_template was given but the tokenizer has no chat template")
        turns = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        turns.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return question + "\n"


def prompt_settings(args, cfg, data):
    """How a run prompts: {"prompt_format": "chat"|"plain", "system_prompt": str}. A checkpoint
    keeps prompting as it was trained (its latent_config.json), --chat_template turns the chat
    template on, and --system_prompt auto picks the answer format the reward checks (a number
    after ####, or \\boxed{} when the gold answers are not all numbers)."""
    chat = bool(args.chat_template) or (cfg or {}).get("prompt_format") == "chat"
    system = args.system_prompt
    if system == "auto":
        numeric = all(re.fullmatch(r"-?[\d,]*\.?\d+", str(ex["answer"]).strip()) for ex in data[:200])
        system = (cfg or {}).get("system_prompt", SYSTEM_PROMPTS["number" if numeric else "latex"]) if chat else ""
    if system and not chat:
        die("--system_prompt needs --chat_template (plain prompts have no system turn)")
    return {"prompt_format": "chat" if chat else "plain", "system_prompt": system}


def answer_end_id(tokenizer, prompting, stop):
    """The id that ends every SFT target: with chat prompts the token closing an assistant turn (if it
    is in `stop`), else the tokenizer's eos."""
    if prompting["prompt_format"] == "chat":
        mark = "ANSWER_ENDS_HERE"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}],
                                             tokenize=False)
        after = tokenizer.encode(text.rsplit(mark, 1)[-1], add_special_tokens=False) if mark in text else []
        if after and after[0] in stop:
            return after[0]
    return tokenizer.eos_token_id


def encode_prompt(tokenizer, question, chat=False, system_prompt=""):
    return tokenizer.encode(format_prompt(tokenizer, question, chat, system_prompt), add_special_tokens=False)


# ----------------------------------------------------------------------------------------------
# evaluation: greedy pass@1, sampled pass@k and reasoning length, for any method's step function

def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021) from n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def reasoning_length(tokenizer, r: Rollout, i):
    """#L as the seeds count it: latent slots plus the sampled tokens before the answer marker."""
    text = decode_completion(tokenizer, r, i)
    before = text.split(ANSWER_MARKER, 1)[0]
    n_latent = int(((r.kinds[i] == LATENT_STEP) & r.mask[i].bool()).sum())
    return n_latent + len(tokenizer.encode(before, add_special_tokens=False)) if before.strip() else n_latent


def _generate(model, tokenizer, data, reasoning, G, temperature, top_p, batch_size, max_new_tokens, desc, disable):
    """Roll out every question G times; per question a list of (completion, correct, #L, length)."""
    from tqdm import tqdm
    prompts_of, step = reasoning(temperature, top_p)
    per_batch, out = max(1, batch_size // G), []
    model.eval()
    for i in tqdm(range(0, len(data), per_batch), desc=desc, leave=False, disable=disable):
        chunk = data[i:i + per_batch]
        r = rollout(model, prompts_of([ex["question"] for ex in chunk]), step, max_new_tokens,
                    stop_ids(model, tokenizer), tokenizer.pad_token_id, num_generations=G, store_latents=False)
        for j, ex in enumerate(chunk):
            rows = []
            for n in range(j * G, (j + 1) * G):
                text = decode_completion(tokenizer, r, n)
                rows.append((text, is_correct(text, ex["answer"]), reasoning_length(tokenizer, r, n),
                             int(((r.kinds[n] == TOKEN) & r.mask[n].bool()).sum())))
            out.append(rows)
    return out


def evaluate(model, tokenizer, data, reasoning, num_samples=1, temperature=0.7, top_p=1.0, batch_size=64,
             max_new_tokens=128, d=None, disable_progress=False):
    """Greedy pass@1, mean #L and answer length; with num_samples > 1 also sampled pass@k.
    `reasoning(temperature, top_p)` returns the method's (prompts(questions) -> token ids, step function).
    Under torchrun (`d`) each rank evaluates an equal share and the means are averaged."""
    if d is not None and d.world > 1:
        data = data[:len(data) // d.world * d.world][d.rank::d.world]
        res = evaluate(model, tokenizer, data, reasoning, num_samples, temperature, top_p, batch_size, max_new_tokens,
                       disable_progress=disable_progress or not d.main)
        return {k: (all_reduce(v, d) if isinstance(v, float) else v) for k, v in res.items()}
    greedy = _generate(model, tokenizer, data, reasoning, 1, 0.0, 1.0, batch_size, max_new_tokens, "greedy",
                       disable_progress)
    res = {"pass@1": float(np.mean([g[0][1] for g in greedy])), "mean_L": float(np.mean([g[0][2] for g in greedy])),
           "mean_length": float(np.mean([g[0][3] for g in greedy])), "n": len(data),
           "examples": [{"question": ex["question"], "answer": ex["answer"], "completion": g[0][0], "correct": g[0][1]}
                        for ex, g in zip(data, greedy)]}
    if num_samples > 1:
        sampled = _generate(model, tokenizer, data, reasoning, num_samples, temperature, top_p, batch_size,
                            max_new_tokens, f"pass@{num_samples}", disable_progress)
        res[f"pass@{num_samples}"] = float(np.mean([pass_at_k(num_samples, sum(s[1] for s in rows), num_samples)
                                                     for rows in sampled]))
        res["sampled_acc"] = float(np.mean([s[1] for rows in sampled for s in rows]))
        res["sampled_mean_L"] = float(np.mean([s[2] for rows in sampled for s in rows]))
    return res


# ----------------------------------------------------------------------------------------------
# the memory plan: what one device will hold, printed before the first step

GB = 2 ** 30


@functools.lru_cache(maxsize=None)
def memory_plan_module():
    """benchmarks/memory_plan.py, or None where that file is absent (a method file copied out)."""
    import importlib.util
    path = ROOT / "benchmarks" / "memory_plan.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_latent_rl_memory_plan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def print_memory_plan(model, d, args, micro_rows, seq_len, gen_rows, gen_len, frozen=None, extra_modules=()):
    """Print this run's memory plan per device, and a warning line when it exceeds the device
    (benchmarks/memory_plan.py's `print_plan`); returns the plan, or None without that file."""
    module = memory_plan_module()
    return module and module.print_plan(model, d, args, micro_rows, seq_len, gen_rows, gen_len, frozen, extra_modules)


def peak_memory_gb(device):
    """The process's peak memory so far: allocated GPU memory, or the peak resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


# ----------------------------------------------------------------------------------------------
# distributed: torchrun detection, FSDP2 or DDP, per-rank seeds, rank-0 logging

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(seed=None):
    """Initialise torch.distributed when launched by torchrun (nccl on GPUs, gloo on CPU), and seed
    python, numpy and torch with seed + rank (`transformers.set_seed`) when `seed` is given."""
    from transformers import set_seed
    if "RANK" not in os.environ:
        if seed is not None:
            set_seed(seed)
        return Dist(device=default_device())
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if seed is not None:
        set_seed(seed + dist.get_rank())
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, default_device())


def check_args(args, d: Dist = Dist()):
    """Shared bad-input checks on whichever TRL-named fields `args` has (group size, LoRA, batch sizes vs
    processes, paths), one line each, before any model loads."""
    G, world = getattr(args, "num_generations", None), d.world
    if G is not None and G < 2:
        die(f"--num_generations must be at least 2: the advantages compare rollouts within a group (got {G})")
    if getattr(args, "lora_r", 0) < 0:
        die(f"--lora_r must be >= 0 (0 = full fine-tuning; got {args.lora_r})")
    if not 0 <= getattr(args, "lora_dropout", 0) < 1:
        die(f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")
    gen = getattr(args, "generation_batch_size", 0)
    if gen < 0 or (G and gen % G):
        die(f"--generation_batch_size must be 0 (all at once) or a multiple of --num_generations {G}: "
            f"a group is generated together (got {gen})" if G
            else f"--generation_batch_size must be >= 0 (0 = all at once; got {gen})")
    train, mini = getattr(args, "train_batch_size", None), getattr(args, "mini_batch_size", None)
    if mini is not None and (mini < 1 or train % mini or mini % world):
        die(f"--train_batch_size {train} must be a multiple of --mini_batch_size {mini}, "
            f"itself a multiple of the {world} processes")
    if train is not None and (train < 1 or train % world):
        die(f"--train_batch_size {train} must be a positive multiple of the {world} processes")
    if getattr(args, "max_completion_length", 1) < 1:
        die(f"--max_completion_length must be at least 1 generated position (got {args.max_completion_length})")
    for name, value in sorted(vars(args).items()):
        if name.endswith("learning_rate") and value < 0:
            die(f"--{name} must be >= 0 (got {value})")
    for flag, want_dir in (("output_dir", True), ("output_file", False)):
        path = getattr(args, flag, "")
        if path and Path(path).exists() and Path(path).is_dir() != want_dir:
            die(f"--{flag} {path} is an existing {'file' if want_dir else 'folder'}: name a "
                f"{'folder' if want_dir else 'file'} to write")


def wrap_model(model, d: Dist, strategy="fsdp", bf16=False):
    """FSDP2 (`fully_shard` per decoder layer, then the model) or DDP; nothing on one process. With
    `bf16` the parameters stay fp32 master weights and forwards compute in bf16 (autocast in
    `lm_forward`; under FSDP2 also MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32))."""
    _io(model).bf16 = bool(bf16)
    if d.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "get_decoder") else model


def full_state_dict(model):
    """The whole model's weights on the CPU (gathered from FSDP shards when sharded)."""
    from torch.distributed.tensor import DTensor
    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def clip_grad_norm(model, max_norm):
    """Clip the gradients' global norm (across FSDP shards too) of a model or a list of
    parameters, and return it as a float."""
    params = [p for p in (model.parameters() if hasattr(model, "parameters") else model) if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def average_gradients(modules, d: Dist):
    """Average the gradients of modules kept whole on every rank, outside the DDP/FSDP wrapper
    (small heads, gates, a frozen-at-RL decoder)."""
    if d.world == 1:
        return
    import torch.distributed as dist
    for m in modules:
        for p in m.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= d.world


def all_gather(x, d: Dist):
    """The rows of every rank, concatenated (each rank holds the same number of rows)."""
    if d.world == 1:
        return x
    import torch.distributed as dist
    out = [torch.zeros_like(x) for _ in range(d.world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce(x, d, op="mean"):
    """A number reduced over processes (op: mean | sum | max): mean and sum as a float, max as given.
    `d` None reads torch.distributed itself (for callers without a Dist)."""
    import torch.distributed as dist
    x = x if op == "max" else float(x)
    if d is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return x
        world, device = dist.get_world_size(), "cuda" if dist.get_backend() == "nccl" else "cpu"
    else:
        world, device = d.world, d.device
    if world == 1:
        return x
    t = torch.tensor([x], device=device)  # float32 for a float, int64 for an int
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.item() / world if op == "mean" else t.item()


def barrier(d: Dist):
    if d.world > 1:
        import torch.distributed as dist
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# logging: a line per step, metrics.jsonl, optional wandb, and plots

class Logger:
    """metrics.jsonl, args.json, a printed line, optionally wandb; rows with a loss or *_loss get
    peak_mem_gb. With `resume_step`, metrics.jsonl and completions.jsonl keep their rows up to that
    step, and rows logged again for steps <= resume_step are dropped."""
    def __init__(self, output_dir, args, d: Dist = Dist(), track=False, project="latent-rl", resume_step=0):
        self.main, self.path, self.resume_step = d.main, Path(output_dir) / "metrics.jsonl", resume_step
        self.device = d.device
        self.wandb = None
        if self.main:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self.path.touch()
            for f in (self.path, Path(output_dir) / "completions.jsonl"):  # keep the rows up to resume_step
                if f.is_file():
                    f.write_text("".join(x for x in f.read_text().splitlines(keepends=True)
                                         if resume_step and x.strip() and json.loads(x)["step"] <= resume_step))
            (Path(output_dir) / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
            if track:
                import wandb  # imported only when asked for
                self.wandb = wandb.init(project=project, config=vars(args), name=Path(output_dir).name)

    def log(self, metrics, step, quiet=False):
        if not self.main or (self.resume_step and step <= self.resume_step):
            return
        if any(k == "loss" or k.endswith("_loss") for k in metrics):  # a training step: the memory needed so far
            metrics = {**metrics, "peak_mem_gb": peak_memory_gb(self.device)}
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if not quiet:
            from tqdm import tqdm
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_runs(runs, keys, out, title=None):
    """One panel per metric against step, one line per run ({label: run folder}); noisy per-step
    series are drawn faintly with a moving average on top. Saved as PNG."""
    try:
        import matplotlib
    except ImportError:  # plots are optional: metrics.jsonl has every number
        print("note: matplotlib is not installed; no plot drawn (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = {label: read_metrics(Path(d) / "metrics.jsonl") for label, d in runs.items()}
    keys = [k for k in keys if any(k in r for rows in data.values() for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for i, (label, rows) in enumerate(data.items()):
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if not pts:
                continue
            x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)
            color = f"C{i}"
            if len(pts) >= 20:
                w = max(3, len(pts) // 10)
                ax.plot(x, y, color=color, alpha=0.25, lw=1)
                ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color=color, lw=2, label=label)
            else:
                ax.plot(x, y, color=color, marker="o", ms=3, label=label)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_metrics(run_dir, keys, out=None, title=None):
    """A run's training curves as <run_dir>/curves.png."""
    return plot_runs({Path(run_dir).name: run_dir}, keys, out or Path(run_dir) / "curves.png", title)


# ----------------------------------------------------------------------------------------------
# checkpoints: save_pretrained folders + latent_config.json + extra modules, written atomically

def save_checkpoint(model, tokenizer, output_dir, latent_config, extra_modules=None, d: Dist = Dist(),
                    subfolders=None, save_dtype="auto", training_state=None):
    """Write to `<output_dir>.tmp`, then rename (never half a checkpoint). Every rank calls it; rank 0
    writes. `subfolders` ({name: model}) become save_pretrained folders inside; `save_dtype` "auto" is the
    start model's published dtype. `training_state(tmp)` runs on every rank before the rename; an
    output_dir's checkpoint-<step> folders and logs are kept."""
    from safetensors.torch import save_file
    dtype = (getattr(unwrap(model), "published_dtype", torch.float32) if save_dtype == "auto"
             else getattr(torch, save_dtype))
    def cast(m, sd):  # the saved dtype; a tied head is not written twice (FSDP2's gathered state has both keys)
        tied = {}
        if getattr(plain_model(m).config, "tie_word_embeddings", False):
            tied = getattr(plain_model(m), "_tied_weights_keys", None) or {}
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items() if k not in tied}
    state = cast(model, merge_lora(model, full_state_dict(model)))  # LoRA adapters merged in
    sub_states = {name: cast(m, merge_lora(m, full_state_dict(m))) for name, m in (subfolders or {}).items()}
    extra = {name: {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}
             for name, m in (extra_modules or {}).items()}
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        plain_model(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, sd in extra.items():
            save_file(sd, tmp / f"{name}.safetensors")
        for name, sd in sub_states.items():
            plain_model(subfolders[name]).save_pretrained(tmp / name, state_dict=sd, safe_serialization=True)
        for config in [tmp / "config.json", *(tmp / name / "config.json" for name in sub_states)]:
            saved = {**json.loads(config.read_text()), "dtype": str(dtype).split(".")[1]}
            config.write_text(json.dumps(saved, indent=2))
        (tmp / LATENT_CONFIG).write_text(json.dumps(latent_config, indent=2))
    if training_state:
        barrier(d)
        training_state(tmp)
        barrier(d)
    if d.main:
        old = out.with_name(out.name + ".old")
        if out.exists():  # keep the run's logs (metrics.jsonl, plots, args.json) beside the weights
            for f in out.iterdir():
                if re.fullmatch(r"checkpoint-\d+", f.name):  # intermediate checkpoints (TrainState) stay
                    f.rename(tmp / f.name)
                elif not (tmp / f.name).exists() and f.suffix in (".jsonl", ".json", ".png", ".txt", ".log"):
                    shutil.copy2(f, tmp / f.name)
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return output_dir


def finish(model, tokenizer, cfg, args, d: Dist, final, start=None, plot_keys=(), extra_modules=None,
           subfolders=None, note=""):
    """The end of a training run: save the checkpoint (latent_config.json = cfg) in --save_dtype,
    draw the curves, and print the before/after line."""
    save_checkpoint(model, tokenizer, args.output_dir, cfg, extra_modules, d, subfolders, args.save_dtype)
    if d.main:
        plot_metrics(args.output_dir, list(plot_keys))
        acc, length = f"{final['pass@1']:.3f}", f"{final['mean_L']:.1f}"
        if start:
            acc, length = f"{start['pass@1']:.3f} -> {acc}", f"{start['mean_L']:.1f} -> {length}"
        print(f"pass@1 {acc}   #L {length}{'   ' + note if note else ''}   saved {args.output_dir}", flush=True)


def write_completions(output_dir, step, rows, d: Dist = Dist()):
    """--log_completions: one JSON line per row ({question, completion, reward, ...}) appended to
    completions.jsonl, and the first one printed."""
    if not d.main or not rows:
        return
    with (Path(output_dir) / "completions.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}) + "\n")
    from tqdm import tqdm
    tqdm.write(f"  e.g. {rows[0]['completion']!r} -> reward {rows[0]['reward']:.2f}")


def load_extra_module(checkpoint, name, module):
    """Load `<checkpoint>/<name>.safetensors` (written by save_checkpoint's extra_modules) into `module`."""
    from safetensors.torch import load_file
    path = Path(checkpoint) / f"{name}.safetensors"
    if not path.is_file():
        die(f"checkpoint {str(checkpoint)!r} has no {name}.safetensors")
    try:
        module.load_state_dict(load_file(str(path)))
    except Exception as e:  # truncated, or another module's weights
        die(f"could not load {path}: {first_line(e)}")
    return module


def checkpoints(output_dir):
    """{step: folder} of the intermediate checkpoints TrainState finished in output_dir."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return {int(p.name.split("-")[1]): p for p in found if (p / "training_state").is_dir()}


def _dcp(fn, state, path):
    """torch.distributed.checkpoint's save or load, in one process without a process group too (quietly)."""
    import warnings
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        getattr(dcp, fn)(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())


class TrainState:
    """Intermediate checkpoints and exact resumption (--save_steps, --save_total_limit,
    --resume_from_checkpoint PATH|latest). `modules` ({name: module}, "model" included) and `optimizers`
    go through torch.distributed.checkpoint (sharded, fp32; frozen parameters only with save_frozen);
    schedulers, `rngs`, random states and `extra` are saved per rank: resume with the same world size."""

    def __init__(self, args, d: Dist, modules, optimizers=(), schedulers=(), rngs=(), save_frozen=False):
        self.args, self.d, self.modules, self.save_frozen = args, d, torch.nn.ModuleDict(modules), save_frozen
        self.optimizers, self.schedulers, self.rngs = list(optimizers), list(schedulers), list(rngs)
        self.save_steps, self.limit = getattr(args, "save_steps", 0) or 0, getattr(args, "save_total_limit", None) or 0
        if self.save_steps < 0 or self.limit < 0:
            die(f"--save_steps and --save_total_limit must be >= 0 (got {self.save_steps} and {self.limit})")

    def _sharded(self):  # the DCP state: what each rank holds of the modules and optimizers
        from torch.distributed.checkpoint.state_dict import get_state_dict
        modules, optimizers = get_state_dict(self.modules, self.optimizers)
        frozen = {n for n, p in self.modules.named_parameters(remove_duplicate=False)
                  if not (p.requires_grad or self.save_frozen)}
        return {"modules": {k: v for k, v in modules.items() if k not in frozen}, "optimizers": optimizers}

    def _local(self, step, extra):  # this rank's own state
        import random
        return {"step": step, "extra": extra, "schedulers": [s.state_dict() for s in self.schedulers],
                "random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "rngs": [r.getstate() if hasattr(r, "getstate") else r.get_state() for r in self.rngs]}

    def maybe_save(self, step, tokenizer, latent_config, extra=None, extra_modules=None, subfolders=None):
        """Every --save_steps steps: save (see `save`). Call it last in the step, after logging and eval."""
        if self.save_steps and step % self.save_steps == 0:
            self.save(step, tokenizer, latent_config, extra, extra_modules, subfolders)

    def save(self, step, tokenizer, latent_config, extra=None, extra_modules=None, subfolders=None):
        """Write <output_dir>/checkpoint-<step> atomically (every rank calls this), then keep the
        newest --save_total_limit of them (a later step left by an abandoned run counts as oldest)."""
        local = self._local(step, extra or {})  # first: nothing below draws random numbers into it

        def training_state(tmp):
            _dcp("save", self._sharded(), tmp / "training_state")
            torch.save(local, tmp / "training_state" / f"rank-{self.d.rank}.pt")
        save_checkpoint(self.modules["model"], tokenizer, Path(self.args.output_dir) / f"checkpoint-{step}",
                        latent_config, extra_modules, self.d, subfolders, getattr(self.args, "save_dtype", "auto"),
                        training_state)
        if self.d.main and self.limit:
            found = checkpoints(self.args.output_dir)
            for s in sorted(found, key=lambda s: (s <= step, s))[:-self.limit]:
                shutil.rmtree(found[s])

    def checkpoint(self):
        """(folder, step) of the checkpoint --resume_from_checkpoint names ("latest": the highest
        checkpoint-<step> in output_dir), checked; (None, 0) without the flag. A script that makes
        its optimizer per stage finds the stage to rebuild with it, before resume()."""
        name = getattr(self.args, "resume_from_checkpoint", "") or ""
        if not name:
            return None, 0
        if name == "latest":
            found = checkpoints(self.args.output_dir)
            if not found:
                die(f"--resume_from_checkpoint latest: {self.args.output_dir} has no checkpoint-<step> folder "
                    "to resume from")
            name = str(found[max(found)])
        path = Path(name)
        if not (path / "training_state" / "rank-0.pt").is_file():
            die(f"--resume_from_checkpoint {name}: " + ("no such folder" if not path.is_dir() else
                "not a checkpoint to resume from (no training_state/: only the checkpoint-<step> folders "
                "of --save_steps have one)"))
        return path, torch.load(path / "training_state" / "rank-0.pt", weights_only=False)["step"]

    def resume(self):
        """(step, extra) of the checkpoint (see `checkpoint`), with modules, optimizers, schedulers and
        random states restored; (0, {}) without --resume_from_checkpoint. Call it after making the
        optimizers and schedulers, right before the step loop; continue at step + 1."""
        import random
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        path, _ = self.checkpoint()
        if path is None:
            return 0, {}
        ranks = len(list((path / "training_state").glob("rank-*.pt")))
        if ranks != self.d.world:
            die(f"{path} was saved by {ranks} processes and this run has {self.d.world}: resume with {ranks} "
                "(the random states and data of each rank are its own)")
        local = torch.load(path / "training_state" / f"rank-{self.d.rank}.pt", weights_only=False)
        if (len(local["schedulers"]), len(local["rngs"])) != (len(self.schedulers), len(self.rngs)):
            die(f"{path} holds {len(local['schedulers'])} schedulers and {len(local['rngs'])} random generators; "
                f"this run has {len(self.schedulers)} and {len(self.rngs)}")
        state = self._sharded()  # asks for the state of every parameter an optimizer holds: keep those saved
        metadata = dcp.FileSystemReader(path / "training_state").read_metadata().state_dict_metadata
        saved = {k.rsplit(".", 1)[0] for k in metadata}
        state["optimizers"]["state"] = {k: v for k, v in state["optimizers"]["state"].items()
                                        if f"optimizers.state.{k}" in saved}
        try:
            _dcp("load", state, path / "training_state")
        except (Exception, dcp.api.CheckpointException) as e:  # another script, model, LoRA setting or optimizer
            why = next(iter(getattr(e, "failures", {}).values()), (e,))[0]  # (exception, traceback) per rank
            die(f"{path} does not fit this run's modules and optimizers: {str(why).strip()[:200]}")
        set_state_dict(self.modules, self.optimizers, model_state_dict=state["modules"],  # strict: dcp.load checked
                       optim_state_dict=state["optimizers"], options=StateDictOptions(strict=False))
        for s, sd in zip(self.schedulers, local["schedulers"]):
            s.load_state_dict(sd)
        for r, rs in zip(self.rngs, local["rngs"]):
            r.setstate(rs) if hasattr(r, "setstate") else r.set_state(rs)
        random.setstate(local["random"])
        np.random.set_state(local["numpy"])
        torch.set_rng_state(local["torch"])
        if local["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(local["cuda"])
        if self.d.main:
            print(f"resumed from {path} at step {local['step']}", flush=True)
        return local["step"], local["extra"]


@contextlib.contextmanager
def timer(store, key):
    t0 = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - t0
