"""Coconut: curriculum construction and the multi-pass forward."""
from types import SimpleNamespace

import torch

import common
from coconut_sft import build_example, coconut_forward, collate

EX = {"question": "Q?", "steps": ["<<2*3=6>>", "<<6+1=7>>", "<<7*2=14>>"], "answer": "14"}


def args(**kw):
    base = dict(max_latent_stage=2, c_thought=2, removal="step", chat_template=False)
    return SimpleNamespace(**{**base, **kw})


def text(tok, ids):
    return tok.decode([i for i in ids if i != -100])


def test_stepwise_curriculum(toy):
    _, tok, special = toy
    start, end, latent = special
    for stage, n_lat, rest in [(0, 0, "<<2*3=6>>\n<<6+1=7>>\n<<7*2=14>>\n### 14"),
                               (1, 2, "<<6+1=7>>\n<<7*2=14>>\n### 14"), (2, 4, "<<7*2=14>>\n### 14"),
                               (3, 4, "### 14"), (7, 4, "### 14")]:
        prompt, n, tail, labels = build_example(tok, EX, stage, args(), special, 0)
        assert prompt[-1] == start and text(tok, prompt[:-1]) == "Q?\n"
        assert n == n_lat and tail[:n] == [latent] * n and tail[n] == end
        assert labels[:n + 1] == [-100] * (n + 1)
        assert text(tok, labels[n + 1:-1]) == rest and labels[-1] == tok.eos_token_id


def test_tokenwise_curriculum(toy):
    _, tok, special = toy
    cot = "<<2*3=6>>\n<<6+1=7>>\n<<7*2=14>>\n"
    for stage, n_lat in [(1, 2), (2, 4), (3, 4)]:
        _, n, tail, labels = build_example(tok, EX, stage, args(removal="token"), special, 7)
        assert n == n_lat
        kept = "" if stage > 2 else cot[7 * stage:]  # the char tokenizer: one token per character
        assert text(tok, labels[n + 1:-1]) == kept + "### 14"


def test_fewer_steps_than_stage_and_cot_mode(toy):
    _, tok, special = toy
    short = {**EX, "steps": ["<<2*7=14>>"]}
    _, n, _, labels = build_example(tok, short, 2, args(), special, 0)
    assert n == 2 and text(tok, labels[3:-1]) == "### 14"
    prompt, n, tail, labels = build_example(tok, EX, 0, args(), special, 0, markers=False)
    assert n == 0 and special[0] not in prompt and tail == labels


def naive_coconut_logits(model, ids, mask, n_latent, c0):
    """One full forward per latent: slot c0+k gets the hidden state at c0+k-1 of a forward over
    everything before it (with the earlier slots already filled)."""
    vectors = torch.zeros(ids.shape + (model.config.hidden_size,))
    is_latent = torch.zeros(ids.shape, dtype=torch.bool)
    pos = common.positions(mask)
    for k in range(int(n_latent.max())):
        _, h = common.lm_forward(model, ids[:, :c0 + k], mask[:, :c0 + k], pos[:, :c0 + k],
                                 latent_mask=is_latent[:, :c0 + k], latent_vectors=vectors[:, :c0 + k])
        rows = k < n_latent
        vectors[rows, c0 + k] = h[rows, -1]
        is_latent[rows, c0 + k] = True
    logits, _ = common.lm_forward(model, ids, mask, pos, latent_mask=is_latent, latent_vectors=vectors)
    return logits


def test_multipass_forward_equals_naive_recompute(toy):
    model, tok, special = toy
    data = common.toy_dataset("test")[:3]
    exs = [build_example(tok, ex, s, args(), special, 0) for ex, s in zip(data, [1, 2, 0])]
    ids, mask, labels, n_latent, c0 = collate(exs, tok.pad_token_id, torch.device("cpu"))
    assert n_latent.tolist() == [2, 4, 0]
    with torch.no_grad():
        fast, thoughts = coconut_forward(model, ids, mask, n_latent, c0)
        slow = naive_coconut_logits(model, ids, mask, n_latent, c0)
    real = mask.bool()
    assert torch.allclose(fast[real], slow[real], atol=1e-4), (fast[real] - slow[real]).abs().max()
    assert sum(int(rows.sum()) for _, rows in thoughts) == 6


def test_gradient_flows_through_the_latent_chain(toy):
    model, tok, special = toy
    exs = [build_example(tok, common.toy_dataset("test")[0], 2, args(), special, 0)]
    ids, mask, labels, n_latent, c0 = collate(exs, tok.pad_token_id, torch.device("cpu"))
    logits, thoughts = coconut_forward(model, ids, mask, n_latent, c0)
    for v, _ in thoughts:
        v.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    assert len(thoughts) == 4  # every thought gets gradient, the first one through the three after it too
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v, _ in thoughts)
    model.zero_grad()


def test_stage_schedule_starts_at_1_and_continues_a_coconut_checkpoint():
    from coconut_sft import stage_schedule
    a = SimpleNamespace(start_stage=-1, end_stage=-1, max_latent_stage=3, no_curriculum=False)
    assert stage_schedule(a) == stage_schedule(a, {"mode": "cot"}) == [1, 2, 3, 4]
    assert stage_schedule(a, {"mode": "coconut", "stage": 2}) == [3, 4]               # the stage after its own
    assert stage_schedule(a, {"mode": "coconut", "stage": 4}) == [4]                  # never past the last
    assert stage_schedule(a, {"mode": "coconut", "n_latents": 2}) == [1, 2, 3, 4]      # no stage recorded
    assert stage_schedule(SimpleNamespace(**{**vars(a), "end_stage": 0})) == [0]       # --end_stage 0 alone: CoT
    assert stage_schedule(SimpleNamespace(**{**vars(a), "start_stage": 2}), {"mode": "coconut", "stage": 3}) == [2, 3, 4]
