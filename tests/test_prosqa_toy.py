"""ProsQA-toy (toy.prosqa_dataset): the graph read back from each question's text and searched here,
the splits, the sizes for the character model, load_data's names and the checking of word answers."""
import random
import re
from collections import Counter
from types import SimpleNamespace

import pytest

import common
import toy

FACT = re.compile(r"Every (\w+) is a (\w+)\.")
QUESTION = re.compile(r"((?:Every \w+ is a \w+\. )+)(\w+) is a (\w+)\. Is \2 a (\w+) or a (\w+)\?")


def read(question):
    """(facts [(a, b)], the person's concept, option 1, option 2), parsed from the text alone."""
    m = QUESTION.fullmatch(question)
    assert m, question
    return FACT.findall(m.group(1)), m.group(3), m.group(4), m.group(5)


def reachable(facts, start):
    """Breadth-first search of our own (not toy.prosqa_reachable)."""
    children = {}
    for a, b in facts:
        children.setdefault(a, set()).add(b)
    seen, queue = {start}, [start]
    while queue:
        node = queue.pop(0)
        for c in children.get(node, ()):
            if c not in seen:
                seen.add(c)
                queue.append(c)
    return seen


def count_paths(facts, start, end):
    children = {}
    for a, b in facts:
        children.setdefault(a, []).append(b)
    return 1 if start == end else sum(count_paths(facts, c, end) for c in children.get(start, []))


@pytest.fixture(scope="module")
def splits():
    return toy.prosqa_dataset("train"), toy.prosqa_dataset("test")


def test_deterministic_per_seed_and_disjoint(splits):
    train, test = splits
    assert len(train) == 10000 and len(test) == 1000
    assert toy.prosqa_dataset("train", 200) == train[:200] and toy.prosqa_dataset("test") == test
    assert (toy.prosqa_dataset("test", seed=1) != test
            and toy.prosqa_dataset("test", seed=1) == toy.prosqa_dataset("test", seed=1))
    assert len({ex["question"] for ex in train}) == len(train) and len({ex["question"] for ex in test}) == len(test)
    assert not {ex["question"] for ex in train} & {ex["question"] for ex in test}
    assert toy.prosqa_problem(random.Random(3)) == toy.prosqa_problem(random.Random(3))


def test_the_answer_is_reachable_and_the_other_option_is_not(splits):
    for ex in splits[0] + splits[1]:
        facts, root, x, y = read(ex["question"])
        assert ex["answer"] in (x, y) and x != y
        other = y if ex["answer"] == x else x
        seen = reachable(facts, root)
        assert ex["answer"] in seen and other not in seen, ex
        assert len(set(facts)) == len(facts) and 10 <= len(facts) <= 16
        concepts = {c for f in facts for c in f}
        assert 6 <= len(concepts) <= 14 and concepts <= set(toy.CONCEPTS)


def test_steps_are_the_facts_along_the_only_path(splits):
    for ex in splits[0] + splits[1]:
        facts, root, _, _ = read(ex["question"])
        assert 2 <= len(ex["steps"]) <= 4
        node = root
        for step in ex["steps"]:
            m = FACT.fullmatch(step)
            assert m and (m.group(1), m.group(2)) in facts and m.group(1) == node, (step, ex)
            node = m.group(2)
        assert node == ex["answer"]
        assert count_paths(facts, root, ex["answer"]) == 1                     # one right CoT
        assert len([b for a, b in facts if a == root]) >= 2                    # the first step is a choice


def test_no_shallow_cue_picks_the_answer(splits):
    """Order, in- and out-degree: each as good as a coin (on 2500 problems), so only reachability
    tells the options apart; a random walk from the person's concept often ends in a dead end."""
    data = splits[1] + splits[0][:2000]
    cues, walks, rng = Counter(), 0, random.Random(0)
    for ex in data:
        facts, root, x, y = read(ex["question"])
        a = ex["answer"]
        o = y if a == x else x
        parents, children = Counter(b for _, b in facts), Counter(p for p, _ in facts)
        for name, va, vo in [("first", a == x, o == x), ("parents", parents[a], parents[o]),
                             ("children", children[a], children[o])]:
            cues[name] += 1 if va > vo else 0.5 if va == vo else 0
        node = root
        while node not in (a, o) and children[node]:
            node = rng.choice([b for p, b in facts if p == node])
        walks += node == a
    for name, right in cues.items():
        assert 0.45 < right / len(data) < 0.55, (name, right / len(data))
    assert walks / len(data) < 0.5


def test_lengths_fit_the_character_model(splits):
    chars = set(toy.CHARS)
    lengths = []
    for ex in splits[0] + splits[1]:
        text = ex["question"] + "\n" + "".join(s + "\n" for s in ex["steps"]) + f"{common.ANSWER_MARKER} {ex['answer']}"
        assert set(text) <= chars
        assert all(3 <= len(c) <= 5 for c in {c for f in read(ex["question"])[0] for c in f})
        lengths.append(len(text))
    assert max(lengths) <= toy.PROSQA_MAX_CHARS == 450 and 350 < sum(lengths) / len(lengths) < 420
    tok = toy.tokenizer()
    ex = splits[1][0]
    assert len(tok.encode(ex["question"], add_special_tokens=False)) == len(ex["question"])  # one token a character


def test_load_data_names():
    train, test = common.load_data("prosqa-toy", "train"), common.load_data("prosqa-toy", "test")
    assert train == toy.prosqa_dataset("train") and test == toy.prosqa_dataset("test")
    assert common.load_data("prosqa-toy:300", "train") == train[:300]
    assert common.load_data("prosqa-toy:300", "test") == test                    # N counts training rows only
    assert common.load_data("prosqa-toy", "test", limit=7) == test[:7]
    assert common.load_data("toy:30", "train") == toy.dataset("train", 30)       # the arithmetic toy as before
    for bad in ("prosqa-toy:x", "prosqa-toy:0", "toy:"):
        with pytest.raises(SystemExit, match="positive count"):
            common.load_data(bad, "train")


def test_load_train_eval_treats_prosqa_toy_as_a_toy_task():
    args = SimpleNamespace(dataset="", eval_dataset="", max_train_samples=50, max_eval_samples=20, seed=0,
                           model_name_or_path="/some/finetuned/checkpoint")
    cfg = {}
    train, test = common.load_train_eval(args, {"dataset": "prosqa-toy"})     # a checkpoint trained on it
    assert train == toy.prosqa_dataset("train")[:50] and test == toy.prosqa_dataset("test")[:20]
    args.model_name_or_path, args.dataset = "toy", "prosqa-toy:100"
    train, test = common.load_train_eval(args, cfg)
    assert len(train) == 50 and cfg["dataset"] == "prosqa-toy:100"
    args.dataset = ""
    with pytest.raises(SystemExit, match="--dataset is required"):
        common.load_train_eval(SimpleNamespace(**{**vars(args), "model_name_or_path": "/x"}),
                               {"dataset": "other.jsonl"})


@pytest.mark.parametrize("pred,expected", [
    ("Every gut is a gug.\nEvery gug is a vilus.\n### vilus", True), ("### Vilus", True), ("### vilus.", True),
    ("###  VILUS ", True), ("\\boxed{vilus}", True), ("\\boxed{\\text{vilus}}", True),
    ("### pidat", False),                                     # the other option
    ("### sivlu", False),                                     # math-verify took this for vilus (a product of letters)
    ("### vilu", False), ("### viluss", False), ("### vilus or pidat", False), ("### 7", False),
    ("vilus", False), ("", False),                            # no "###": no answer
])
def test_word_answers_compare_exactly(pred, expected):
    assert common.is_correct(pred, "vilus") is expected


def test_word_answers_of_real_rows_and_what_stays_math():
    ex = toy.prosqa_dataset("test")[0]
    facts, _, x, y = read(ex["question"])
    other = y if ex["answer"] == x else x
    assert common.is_correct("\n".join(ex["steps"]) + f"\n### {ex['answer']}", ex["answer"])
    assert not common.is_correct("\n".join(ex["steps"]) + f"\n### {other}", ex["answer"])
    assert common.is_correct("### monday", "Monday.") and common.is_correct("### They are  equal", "They are equal")
    assert common.is_correct("### 18", "18") and not common.is_correct("### eighteen", "18")     # numbers as before
    assert common.is_correct("\\boxed{yx}", "xy") and common.is_correct("\\boxed{(C)}", "C")      # short: math-verify
    assert common.is_correct("\\boxed{\\frac{1}{2}}", "0.5") and common.is_correct("\\boxed{q-p}", "-p + q")
