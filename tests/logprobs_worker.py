"""Run under torchrun by test_logprobs.py: `logprobs_worker.py <report.json> <fsdp|ddp>`. Every rank
builds the same toy model and batch, computes one process's values and gradient on the whole batch,
then wraps the model (common.wrap_model), rolls out a little (under FSDP2 that gathers the weights
and then reshards the root after each forward, as in training), scores its own rows with
common.lm_logprobs in chunks and backpropagates. Rank 0 writes, per rank, [max value difference,
max gradient difference, number of parameters without a gradient]."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def score(model, ids, mask, latent_mask, vectors, K, rows, chunk_elements):
    return common.lm_logprobs(model, ids[rows], mask[rows], common.positions(mask[rows]), ids[rows, -6:], 0.7,
                              latent_mask[rows], vectors[rows], K[rows], 1.0, True, chunk_elements)[0]


def loss_of(lp):
    return lp.token.sum() + 0.5 * lp.ids.sum() - 0.3 * lp.lse.sum() + 0.7 * lp.entropy.sum()


if __name__ == "__main__":
    torch.set_num_threads(1)
    d = common.setup_distributed()
    model, _, _ = common.load_model("toy", torch.device("cpu"), torch.float32)   # seeded: the same on every rank
    model.eval()
    V, dim, n = model.config.vocab_size, model.config.hidden_size, 2 * d.world
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (n, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3], mask[-1, :1] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    latent_mask = torch.zeros_like(ids, dtype=torch.bool)
    latent_mask[:, 5:7] = True
    vectors, K = torch.randn(n, 10, dim, generator=g), torch.randint(0, V, (n, 6, 3), generator=g)

    full = score(model, ids, mask, latent_mask, vectors, K, slice(None), None)   # one process, one chunk
    (loss_of(full) / d.world).backward()   # FSDP2 and DDP average the ranks' gradients
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    model = common.wrap_model(model, d, sys.argv[2])
    common.rollout(model, [[5, 6, 7]], common.sampling_step(1.0), 4, eos_id=0, pad_id=0)
    rows = slice(2 * d.rank, 2 * d.rank + 2)
    mine = score(model, ids, mask, latent_mask, vectors, K, rows, 2 * V)   # 6 chunks of 2 positions
    loss_of(mine).backward()
    value_err = max((a - b[rows]).abs().max().item() for a, b in zip(mine, full))
    got = {name: p.grad for name, p in common.unwrap(model).named_parameters()}
    # FSDP2 shards, gathered whole
    whole = {k: g.full_tensor() if hasattr(g, "full_tensor") else g for k, g in got.items() if g is not None}
    grad_err = max((whole[k] - w).abs().max().item() for k, w in want.items() if k in whole)
    missing = sum(v is None for v in got.values())
    report = torch.tensor([value_err, grad_err, missing], dtype=torch.float64)
    everyone = [torch.zeros_like(report) for _ in range(d.world)]
    torch.distributed.all_gather(everyone, report)
    if d.main:
        Path(sys.argv[1]).write_text(json.dumps([e.tolist() for e in everyone]))
    torch.distributed.barrier()
    sys.stdout.flush()   # leave without C++ destructors, as dist_worker.py (gloo teardown under load)
    sys.stderr.flush()
    os._exit(0)
