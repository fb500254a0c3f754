"""The toy task and the tiny model: the CartPole of this project.

GSM8K-Aug-format arithmetic generated from a seed ("Tom has 3 boxes of 4 pens. Tom gets 2 more.
How many pens does Tom have?", steps `<<3*4=12>>`, `<<12+2=14>>`, answer 14), and the tiny Qwen2
model of ../shared/FINDINGS.md with a character tokenizer, which learns it in about 10 CPU
minutes. `common.load_data("toy")` and `common.load_model("toy")` come here; every script's
no-argument run uses them, starting from the trained toy checkpoints committed under
checkpoints/ (remade by scripts/make_toy_checkpoints.sh). Without checkpoints/ (a method file
copied out with common.py and this file), common.load_model starts from the untrained toy model
instead, with a warning. This file imports nothing of the project.
"""
import random
from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
COT = str(CHECKPOINTS / "toy-cot")                 # stage 0: CoT SFT
COCONUT = str(CHECKPOINTS / "toy-coconut")         # the Coconut curriculum on top of it
LATENT_SFT = str(CHECKPOINTS / "toy-latent-sft")   # Latent-SFT on top of toy-cot


NAMES = ["Tom", "Ann", "Bob", "Eve", "Sam", "Mia", "Leo", "Zoe", "Max", "Ivy"]
ITEMS = ["apples", "pens", "cards", "books", "eggs", "coins", "shells", "stamps"]


def problem(rng):
    """One problem {question, steps, answer}. 2-3 steps; "a boxes of b" (a, b <= 9), then adding or
    taking away at most 9, or doubling/tripling. Results stay in 0..999."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    value = a * b
    sentences = [f"{name} has {a} boxes of {b} {item}."]
    steps = [f"<<{a}*{b}={value}>>"]
    for _ in range(rng.randint(1, 2)):
        op = rng.choice(["+", "-", "*"] if value > 0 else ["+"])
        if op == "+":
            n = rng.randint(1, 9)
            sentences.append(rng.choice([f"{name} gets {n} more.", f"{name} buys {n} more."]))
            new = value + n
        elif op == "-":
            n = rng.randint(1, min(9, value))
            sentences.append(rng.choice([f"{name} gives away {n}.", f"{name} loses {n}."]))
            new = value - n
        else:
            n = rng.randint(2, 3)
            sentences.append(f"Then the {item} {'double' if n == 2 else 'triple'}.")
            new = value * n
        steps.append(f"<<{value}{op}{n}={new}>>")
        value = new
    sentences.append(f"How many {item} does {name} have?")
    return {"question": " ".join(sentences), "steps": steps, "answer": str(value)}


def dataset(split, n=None, seed=0):
    """Deterministic splits: train and test come from disjoint seeds and share no question."""
    n = n or {"train": 12800, "test": 500}.get(split, 500)
    rng = random.Random(f"toy-{split}-{seed}")
    out, seen = [], set()
    held_out = set() if split == "test" else {ex["question"] for ex in dataset("test", seed=seed)}
    while len(out) < n:
        ex = problem(rng)
        if ex["question"] in seen or ex["question"] in held_out:
            continue
        seen.add(ex["question"])
        out.append(ex)
    return out


CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,?!'\"$%&()*+-/:;<=>#@[]_{}|\\^")


def tokenizer():
    """A character-level tokenizer: a Qwen2 (byte-level BPE) tokenizer with one token per character
    and no merges, so that AutoTokenizer reloads it as the same Qwen2Tokenizer from a saved folder."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_char = bytes_to_unicode()
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{byte_char[ord(c)]: i + 2 for i, c in enumerate(CHARS)}}
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<unk>", eos_token="<|endoftext|>",
                          pad_token="<|endoftext|>", bos_token=None)


def model(vocab_size):
    """The tiny Qwen2 of ../shared/FINDINGS.md: hidden 128, 4 layers, 4 heads / 2 KV heads, tied
    embeddings (about 1M parameters)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=512, max_position_embeddings=1024,
                         tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)
