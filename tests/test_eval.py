"""eval.py: one command for every checkpoint, asking the file that defines its mode how it reasons."""
import json

import pytest
import torch

import common
import toy
from conftest import main_error


def test_evaluate_takes_any_methods_reasoning():
    """common.evaluate drives a step function it knows nothing about: here, one that always answers 7."""
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    answer = tok.encode("### 7", add_special_tokens=False) + [tok.eos_token_id]
    calls = []

    def reasoning(temperature, top_p):
        calls.append(temperature)

        def step(t, logits, hidden, done):
            ids = torch.full(done.shape, answer[min(t, len(answer) - 1)], dtype=torch.long)
            return ids, None, torch.full(done.shape, common.TOKEN, dtype=torch.int8)
        return (lambda questions: [common.encode_prompt(tok, q) for q in questions]), step

    data = [{"question": "Q1", "answer": "7"}, {"question": "Q2", "answer": "8"}, {"question": "Q3", "answer": "7"}]
    res = common.evaluate(model, tok, data, reasoning, num_samples=4, temperature=0.5, max_new_tokens=8)
    assert calls == [0.0, 0.5]                                   # greedy first, then sampled at the given temperature
    assert res["pass@1"] == pytest.approx(2 / 3) and res["pass@4"] == pytest.approx(2 / 3)
    assert res["mean_L"] == 0 and res["mean_length"] == len(answer) and res["examples"][1]["completion"] == "### 7"


def test_pass_at_k_by_hand():
    assert common.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert common.pass_at_k(4, 1, 2) == pytest.approx(1 - (3 / 4) * (2 / 3))
    assert common.pass_at_k(4, 0, 4) == 0 and common.pass_at_k(4, 1, 4) == 1


def test_unknown_mode_and_missing_file_are_one_line(tmp_path):
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    common.save_checkpoint(model, tok, tmp_path / "m", {"mode": "telepathy"})
    assert "unknown reasoning mode 'telepathy'" in main_error("eval", "--model", tmp_path / "m", "--max_samples", "2")
    assert "--show_latents needs a checkpoint with a latent decoder" in main_error(
        "eval", "--model", toy.COT, "--max_samples", "2", "--show_latents")


def test_a_plain_model_is_evaluated_as_language_cot(tmp_path):
    import eval as evaluation
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    res = evaluation.main(common.parse_args(evaluation.Args, [
        "--model", str(tmp_path / "plain"), "--max_samples", "3", "--max_completion_length", "4",
        "--output_file", str(tmp_path / "r.json")]))
    assert res["mode"] == "cot" and res["n"] == 3 and json.loads((tmp_path / "r.json").read_text())["mode"] == "cot"


def test_an_intermediate_checkpoint_is_evaluated_on_the_task_it_was_trained_on(tmp_path):
    """checkpoint-<step> folders (--save_steps) are ordinary checkpoints for eval.py, and a checkpoint
    trained on a built-in task (here prosqa-toy) is evaluated on that task's test split by default."""
    import eval as evaluation
    import grpo_latent
    grpo_latent.main(common.parse_args(grpo_latent.Args, [
        "--model", toy.COT, "--dataset", "prosqa-toy:64", "--max_steps", "1", "--save_steps", "1",
        "--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2", "--max_completion_length", "8",
        "--max_eval_samples", "2", "--output_dir", str(tmp_path / "run")]))
    res = evaluation.main(common.parse_args(evaluation.Args, [
        "--model", str(tmp_path / "run" / "checkpoint-1"), "--max_samples", "2", "--max_completion_length", "4"]))
    assert res["dataset"] == "prosqa-toy" and res["n"] == 2 and res["mode"] == "cot"
    assert res["examples"][0]["question"] == common.load_data("prosqa-toy", "test")[0]["question"]
