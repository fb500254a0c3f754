"""Run under torchrun by test_coconut_sft.py and test_grpo_latent.py: `dist_worker.py <script module> <its arguments>`
runs a short training with that script's main(), then every rank reports a fingerprint of the
full weights it ends with, so the test can check that ranks agree."""
import importlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    script = importlib.import_module(sys.argv[1])
    args = common.parse_args(script.Args, sys.argv[2:])
    model = script.main(args)
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
