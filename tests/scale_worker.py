"""Run by test_scale.py, under torchrun or alone: `scale_worker.py fsdp|ddp|none OUT` trains the toy
model with LoRA (an added token's row trainable) and gradient checkpointing for two steps on four
rows split over the ranks, then saves the merged checkpoint to OUT."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    strategy, out = sys.argv[1], sys.argv[2]
    d = common.setup_distributed(0)
    model, tok, _ = common.load_model("toy", d.device, torch.float32)
    ids = common.add_special_tokens(model, tok, ["<|a|>"], init_from=None)
    model = common.enable_gradient_checkpointing(common.apply_lora(model, 4, 8, trainable_token_ids=ids))
    model = common.wrap_model(model, d, strategy)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = torch.randint(3, 30, (4, 10), generator=torch.Generator().manual_seed(0))
    x[:, 5] = ids[0]
    x = x[d.rank::d.world]
    for _ in range(2):
        logits, _ = common.lm_forward(model, x, torch.ones_like(x))
        loss = -logits[:, :-1].float().log_softmax(-1).gather(-1, x[:, 1:, None]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    common.save_checkpoint(model, tok, out, {"mode": "cot"}, d=d)
    common.barrier(d)
    sys.stdout.flush()
    os._exit(0)  # see dist_worker.py: no gloo teardown
