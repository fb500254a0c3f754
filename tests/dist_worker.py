"""Run under torchrun by test_coconut_sft.py and test_grpo_latent.py: `dist_worker.py <script module> <its arguments>`
runs a short training with that script's main(), then every rank reports a fingerprint of the
full weights it ends with, so the test can check that ranks agree.

`dist_worker.py resume <script module> <its arguments> --output_dir OUT` instead trains three times in
the same processes: straight to OUT/straight, then to OUT/run with --save_steps 2, stopped right after
its checkpoint at step 2 (a killed job), then OUT/run again with --resume_from_checkpoint latest."""
import importlib
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


class Stopped(Exception):
    pass


def stop_after(step):
    """TrainState.maybe_save that stops the run right after writing its checkpoint at `step`."""
    original = common.TrainState.maybe_save

    def save_then_stop(self, s, *args, **kwargs):
        original(self, s, *args, **kwargs)
        if s == step:
            raise Stopped()
    return mock.patch.object(common.TrainState, "maybe_save", save_then_stop)


if __name__ == "__main__":
    torch.set_num_threads(1)
    resume = sys.argv[1] == "resume"
    argv = sys.argv[2:] if resume else sys.argv[1:]
    script = importlib.import_module(argv[0])
    if resume:
        i = argv.index("--output_dir")
        out, rest = Path(argv[i + 1]), argv[1:i] + argv[i + 2:]
        script.main(common.parse_args(script.Args, [*rest, "--output_dir", str(out / "straight")]))
        try:
            with stop_after(2):
                script.main(common.parse_args(script.Args, [*rest, "--output_dir", str(out / "run"),
                                                            "--save_steps", "2"]))
        except Stopped:
            pass
        args = common.parse_args(script.Args, [*rest, "--output_dir", str(out / "run"), "--save_steps", "2",
                                               "--resume_from_checkpoint", "latest"])
    else:
        args = common.parse_args(script.Args, argv[1:])
    model = script.main(args)
    model = model[0] if isinstance(model, tuple) else model
    d = common.setup_distributed()
    from torch.distributed.tensor import DTensor
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v)   # every rank gathers FSDP's shards
             for k, v in common.unwrap(model).state_dict().items()}
    flat = torch.cat([v.flatten().float() for _, v in sorted(state.items())])
    mine = torch.tensor([flat.sum().item(), flat.abs().sum().item(), flat[::101].sum().item()], dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(d.world)]
    torch.distributed.all_gather(everyone, mine)
    if d.main:
        Path(args.output_dir, "fingerprints.json").write_text(json.dumps([e.tolist() for e in everyone]))
    torch.distributed.barrier()  # nobody tears down gloo while a peer still talks to it
    # Leave without running C++ destructors: under heavy load, tearing gloo down (destroy or plain
    # interpreter exit) now and then aborted a rank with "terminate called without an active
    # exception" after all the work was done and checked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
