"""The toy task and the tiny model: the CartPole of this project.

GSM8K-Aug-format arithmetic generated from a seed ("Tom has 3 boxes of 4 pens. Tom gets 2 more.
How many pens does Tom have?", steps `<<3*4=12>>`, `<<12+2=14>>`, answer 14), and the tiny Qwen2
model (1M parameters) with a character tokenizer, which learns it in about 10 CPU
minutes. `common.load_data("toy")` and `common.load_model("toy")` come here; every script's
no-argument run uses them, starting from the trained toy checkpoints committed under
checkpoints/ (remade by scripts/make_toy_checkpoints.sh). Without checkpoints/ (a method file
copied out with common.py and this file), common.load_model starts from the untrained toy model
instead, with a warning.

The second task, ProsQA-toy (`common.load_data("prosqa-toy")`), is graph reachability in the style
of Coconut's ProsQA, where continuous thoughts beat language CoT: shuffled facts "Every gut is a
gug." over made-up concepts, "Ann is a gut.", "Is Ann a vilus or a pidat?"; the steps are the facts
along the path, the answer the reachable concept (`prosqa_problem`). This file imports nothing of
the project.
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
    return _split(problem, "toy", 12800, split, n, seed)


def _split(make, name, n_train, split, n, seed):
    """n problems from make(rng) seeded by (name, split, seed); train never repeats a test question."""
    n = n or {"train": n_train, "test": 1000}.get(split, 1000)
    rng = random.Random(f"{name}-{split}-{seed}")
    out, seen = [], set()
    held_out = set() if split == "test" else {ex["question"] for ex in _split(make, name, n_train, "test", None, seed)}
    while len(out) < n:
        ex = make(rng)
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
    """The tiny Qwen2: hidden 128, 4 layers, 4 heads / 2 KV heads, tied
    embeddings (about 1M parameters)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=512, max_position_embeddings=1024,
                         tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


# ----------------------------------------------------------------------------------------------
# ProsQA-toy: graph reachability over made-up concepts, the task where Coconut's latents beat CoT

def _concept_names():
    """64 made-up lowercase names of 3-5 letters (consonant-vowel patterns), none a prefix of another
    and none a person's name. Fixed: the same list on every machine."""
    rng, names = random.Random("prosqa-names"), set()
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    while len(names) < 64:
        pattern = rng.choice(["cvc", "cvcv", "cvcvc"])
        name = "".join(rng.choice(consonants if p == "c" else vowels) for p in pattern)
        if name in ("tom", "ann", "bob", "eve", "sam", "max", "leo", "zoe", "ivy", "mia", "every"):
            continue
        if any(n.startswith(name) or name.startswith(n) for n in names):
            continue
        names.add(name)
    return sorted(names)


CONCEPTS = _concept_names()
PROSQA_MAX_CHARS = 450    # question, newline, the steps (one a line), "### answer"


def prosqa_reachable(facts, start):
    """Every concept reachable from `start` along facts (a, b) ("Every a is a b."), by BFS."""
    children = {}
    for a, b in facts:
        children.setdefault(a, []).append(b)
    seen, frontier = {start}, [start]
    while frontier:
        frontier = [c for node in frontier for c in children.get(node, []) if c not in seen]
        seen.update(frontier)
    return seen


def prosqa_problem(rng):
    """One ProsQA-style problem {question, steps, answer} (Hao et al. 2024's ProsQA, shrunk for the
    character model). A random DAG of 10-16 facts "Every a is a b." over 8-14 made-up concepts, in
    two parts:
      - the reachable part: the answer path from the person's concept (2-4 hops), and dead-end
        branches leaving it (the first concept always has one) that never lead to the answer: a
        walk that takes a wrong turn ends nowhere;
      - the unreachable part: a chain about as long from another root, ending in the other option,
        with more concepts around it and edges into the reachable part, never out of it, so both
        options have ancestors, either may have children, and only reachability tells them apart.
    The facts come shuffled; the steps are the path's facts in order; the answer is the reachable
    option, asked in random order with the unreachable one. Reachability is checked by BFS, and the
    question, steps and "### answer" fit in PROSQA_MAX_CHARS characters."""
    person = rng.choice(NAMES)
    while True:
        names, target = rng.sample(CONCEPTS, 14), rng.randint(10, 16)
        hops = rng.randint(2, 4)
        path, pool = names[:hops + 1], names[hops + 1:]
        answer = path[-1]
        side = [pool.pop()]                        # dead ends: reachable, never reaching the answer
        facts = list(zip(path, path[1:])) + [(path[0], side[0])]
        length = hops + rng.randint(-1, 1)        # the other option: about as deep below its own root
        chain = [pool.pop() for _ in range(length + 1)]
        other, unreachable = chain[-1], chain[:-1]
        facts += list(zip(chain, chain[1:]))
        # the two options alike: each gets, with the same odds, one more parent (a new root) and a child
        for option in (answer, other):
            if rng.random() < 0.3:
                unreachable.append(pool.pop())
                facts.append((unreachable[-1], option))
            if rng.random() < 0.3:
                facts.append((option, rng.choice(side)))
        while len(facts) < target:                 # more distractors, mirrored on the two sides
            kind = rng.random()
            if kind < 0.3 and pool:                # a dead end below a reachable concept
                side.append(pool.pop())
                facts.append((rng.choice(path[:-1] + side[:-1]), side[-1]))
            elif kind < 0.5 and pool:              # a new root above the path or above the chain
                unreachable.append(pool.pop())
                facts.append((unreachable[-1], rng.choice(path[:-1] if rng.random() < 0.5 else chain[:-1])))
            elif kind < 0.6 and pool:              # a dead end below an unreachable concept
                new = pool.pop()
                facts.append((rng.choice(unreachable), new))
                unreachable.append(new)
            elif kind < 0.8:                       # unreachable -> a dead end (never the other way)
                facts.append((rng.choice(unreachable), rng.choice(side)))
            else:                                  # reachable -> a dead end, in creation order (no cycle)
                j = rng.randrange(len(side))
                facts.append((rng.choice(path[:-1] + side[:j]), side[j]))
            facts = list(dict.fromkeys(facts))
        seen = prosqa_reachable(facts, path[0])
        if answer not in seen or other in seen:
            continue
        rng.shuffle(facts)
        options = [answer, other] if rng.random() < 0.5 else [other, answer]
        question = " ".join([*(f"Every {a} is a {b}." for a, b in facts), f"{person} is a {path[0]}.",
                             f"Is {person} a {options[0]} or a {options[1]}?"])
        steps = [f"Every {a} is a {b}." for a, b in zip(path, path[1:])]
        if len(question) + sum(len(s) + 1 for s in steps) + len(answer) + 5 <= PROSQA_MAX_CHARS:
            return {"question": question, "steps": steps, "answer": answer}


def prosqa_dataset(split, n=None, seed=0):
    """Like `dataset`: deterministic splits from disjoint seeds sharing no question (10000 train, 1000 test)."""
    return _split(prosqa_problem, "prosqa-toy", 10000, split, n, seed)


DATASETS = {"toy": dataset, "prosqa-toy": prosqa_dataset}   # common.load_data's names for them
