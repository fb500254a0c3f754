"""scripts/toy_results.py: its statistics against hand-computed values, and the tables, JSON and
README blocks it writes from finished runs (fake eval files, no training)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tr(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("toy_results", ROOT / "scripts" / "toy_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RUNS", tmp_path / "runs")
    return mod


def test_mean_and_t_interval_by_hand(tr):
    m, h = tr.mean_ci([0.10, 0.20, 0.30])
    # sd = 0.1, t(0.975, 2) = 4.303: half-width 4.303 * 0.1 / sqrt(3) = 0.24843
    assert m == pytest.approx(0.2) and h == pytest.approx(0.248434, abs=1e-6)
    assert tr.mean_ci([0.5]) == (0.5, None)
    assert tr.mean_ci([0.3, 0.3, 0.3])[1] == 0


def test_wilson_interval_by_hand(tr):
    lo, hi = tr.wilson(0.5, 1000)
    # centre 0.5, half-width 1.96 * sqrt(0.25/1000 + 1.96^2/4e6) / (1 + 1.96^2/1000) = 0.030931
    assert lo == pytest.approx(0.5 - 0.030931, abs=1e-5) and hi == pytest.approx(0.5 + 0.030931, abs=1e-5)
    lo, hi = tr.wilson(0.0, 1000)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.003 < hi < 0.004   # never below 0, unlike p +- 1.96 se


def test_jobs_run_every_method_with_every_seed_and_wait_for_their_start(tr):
    jobs = tr.jobs(seeds=(0, 1, 2))
    names = {(j[0], j[1]) for j in jobs}
    for name, *_ in tr.METHODS:
        assert {(name, 0), (name, 1), (name, 2)} <= names
    by_name = {(j[0], j[1]): j for j in jobs}
    assert by_name[("atp_rl", 1)][4] == "toy-atp-sft" and by_name[("prosqa-coconut", 0)][4] == "prosqa-cot"
    assert "--seed" in by_name[("latent_grpo", 2)][3] and by_name[("latent_grpo", 2)][3][-1] == "2"
    # every method's first seed comes before any second seed
    order = [(j[0], j[1]) for j in jobs]
    assert max(order.index((n, 0)) for n, *_ in tr.METHODS) < min(order.index((n, 1)) for n, *_ in tr.METHODS)


def _fake_eval(folder, p1, p8, L, steps=0, valid=(1.0, 1.0)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval1000.json").write_text(json.dumps({"pass@1": p1, "pass@8": p8, "mean_L": L, "n": 1000,
                                                      "train_seconds": 120.0}))
    rows = [{"step": s, "reward": 0.1, "valid_frac": valid[0] if s <= 10 else valid[1], "n_latents": 10.0}
            for s in range(1, steps + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_collect_tables_and_readme_blocks(tr, tmp_path):
    _fake_eval(tr.RUNS / "toy-latent-sft", 0.11, 0.36, 14.7)
    for seed, (p1, L) in enumerate([(0.10, 15.0), (0.20, 16.0), (0.30, 17.0)]):
        _fake_eval(tr.RUNS / "latent_grpo" / f"seed{seed}", p1, 0.4, L, steps=20, valid=(1.0, 0.5))
    res = tr.collect([0, 1, 2])
    m = res["methods"]["latent_grpo"]
    assert m["pass@1"] == pytest.approx(0.2) and m["pass@1_ci"] == pytest.approx(0.248434, abs=1e-6)
    assert m["mean_L"] == pytest.approx(16.0) and len(m["seeds"]) == 3
    assert m["seeds"][0]["valid_frac_1-10"] == 1.0 and m["seeds"][0]["valid_frac_11-20"] == 0.5
    assert set(res["methods"]) == {"latent_grpo"}          # runs that are missing are left out
    rl = tr.table(res, "rl")
    assert "| **Latent-SFT" in rl and "11.0 [" in rl
    assert ("| Latent-GRPO (all three designs) | 3 (10.0, 20.0, 30.0) | 20.0 ± 24.8 | 40.0 ± 0.0 | "
            "16.0 ± 2.5 | 2 |") in rl
    assert "1.00 -> 0.50" in tr.collapse_table(res)
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- toy_results:rl -->\nold\n<!-- /toy_results:rl -->\nb\n")
    tr.write_readme(res, readme)
    text = readme.read_text()
    assert "old" not in text and rl in text and text.startswith("a\n") and text.endswith("b\n")
    tr.write_readme(res, readme)                            # idempotent
    assert readme.read_text() == text
    pytest.importorskip("matplotlib")
    tr.figure(res, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_prosqa_steps_by_hand(tr):
    q = "Every gut is a gug. Every gug is a beg. Every gut is a pif. Ann is a gut. Is Ann a beg or a pif?"
    examples = [
        # 2 facts, offered
        {"question": q, "completion": "Every gut is a gug.\nEvery gug is a beg.\n### beg", "correct": True},
        # 0 of 2
        {"question": q, "completion": "Every gut is a beg.\nEvery beg is a beg.\n### vilus", "correct": False},
        # offered, wrong
        {"question": q, "completion": "### pif", "correct": False},
        # 1 fact, no answer
        {"question": q, "completion": "Every gut is a pif.\n", "correct": False},
    ]
    out = tr.prosqa_steps(examples)
    # 2 of 4; 1 of 2; 3 of 5 steps
    assert out == {"answer_offered": 0.5, "offered_right": 0.5, "steps_in_question": 0.6}
    assert tr.prosqa_steps(examples[2:3])["steps_in_question"] is None     # latents only: nothing to check
    assert tr.prosqa_steps(examples[1:2])["offered_right"] is None         # no answer among the options


def test_prosqa_table_has_the_step_columns(tr):
    res = {"n_test": 1000, "k": 8, "methods": {}, "starts": {"prosqa-cot": {
        "label": "CoT SFT on ProsQA-toy", "task": "prosqa-toy", "pass@1": 0.06, "pass@8": 0.2, "mean_L": 74.1,
        "pass@1_ci": (0.046, 0.075), "n": 1000, "answer_offered": 0.131, "offered_right": 0.45,
        "steps_in_question": None}}}
    res["methods"]["prosqa_grpo_cot"] = {"label": "GRPO on CoT", "table": "prosqa", "start": "prosqa-cot",
                                         "seeds": {0: {"pass@1": 0.08, "train_seconds": 60}}, "pass@1": 0.08,
                                         "mean_L": 80.0, "answer_offered": 0.2, "answer_offered_ci": 0.05,
                                         "offered_right": 0.5, "steps_in_question": 0.03}
    lines = tr.table(res, "prosqa").splitlines()
    assert lines[0].count("|") == lines[1].count("|") == 10          # 9 columns
    assert lines[2].endswith("| 13.1 | 45.0 | — |") and lines[3].endswith("| 1 | 20.0 ± 5.0 | 50.0 | 3.0 |")
    assert "facts of the question" not in tr.table(res, "rl")
