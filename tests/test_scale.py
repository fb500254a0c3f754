"""Plumbing for real model sizes: LoRA with merged saves, gradient checkpointing that keeps a KV
cache, generation in pieces, and the memory plan."""
import copy
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

import common

_spec = importlib.util.spec_from_file_location("memory_plan_bench", common.ROOT / "benchmarks" / "memory_plan.py")
memory_plan_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_plan_bench)


def toy_model(extra_tokens=()):
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    ids = common.add_special_tokens(model, tok, list(extra_tokens), init_from=None) if extra_tokens else []
    return model, tok, ids


# ---------------------------------------------------------------------------------------------- LoRA

def test_lora_trains_adapters_and_added_rows_only():
    model, tok, ids = toy_model(["<|a|>", "<|b|>"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = common.apply_lora(model, 4, 8, trainable_token_ids=ids)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=10.0)
    x = torch.tensor([[1, 2, ids[0], 3, ids[1], 4]])
    for _ in range(2):  # lora_B starts at 0: the second step moves every adapter
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = common.merge_lora(pm, common.full_state_dict(pm))
    emb = merged["model.embed_tokens.weight"]
    others = [i for i in range(emb.shape[0]) if i not in ids]
    assert torch.equal(emb[others], before["model.embed_tokens.weight"][others])   # the old rows are frozen
    assert not torch.allclose(emb[ids], before["model.embed_tokens.weight"][ids])  # the added ones train
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              before["model.layers.0.self_attn.q_proj.weight"])


def test_merged_checkpoint_equals_peft_merge_and_reloads(tmp_path):
    model, tok, ids = toy_model(["<|a|>"])
    pm = common.apply_lora(model, 4, 16, target_modules="q_proj,v_proj,down_proj", trainable_token_ids=ids)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.tensor([[1, 2, 3, ids[0], 4]])
    with torch.no_grad():
        want = pm(input_ids=x).logits
    mine = common.merge_lora(pm, common.full_state_dict(pm))
    theirs = copy.deepcopy(pm).merge_and_unload().state_dict()  # peft's own merge
    assert set(mine) == set(theirs)
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine)
    common.save_checkpoint(pm, tok, tmp_path / "ck", {"mode": "cot"})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, want, atol=1e-5)
    assert any(p.requires_grad for p in pm.parameters() if p.dim() == 2 and p.shape[0] == 4)  # training model untouched
    assert "lora_A" in "".join(n for n, _ in pm.named_parameters())


def test_lora_untied_head_rows_train_too(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    head_before = model.lm_head.weight.detach().clone()
    pm = common.apply_lora(model, 2, 4, trainable_token_ids=[37, 38])
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=10.0)
    x = torch.tensor([[1, 37, 2, 38, 3]])
    pm(input_ids=x, labels=x).loss.backward()
    opt.step()
    head = common.merge_lora(pm, common.full_state_dict(pm))["lm_head.weight"]
    assert not torch.allclose(head[[37, 38]], head_before[[37, 38]])
    assert torch.equal(head[:37], head_before[:37])


def test_lora_r0_is_full_finetuning():
    model, _, _ = toy_model()
    assert common.apply_lora(model, 0, 16) is model


# ---------------------------------------------------------------------------------------------- gradient checkpointing

def coconut_passes(model, ids):
    """Coconut's training forward: a prefix, three passes that feed the last hidden state back as the
    next input through the KV cache (with gradients), then the rest. Returns loss, gradients."""
    mask = torch.ones_like(ids)
    pos = common.positions(mask)
    cache = DynamicCache(config=common.unwrap(model).config)
    logits, hidden = common.lm_forward(model, ids[:, :4], mask[:, :4], pos[:, :4], cache)
    outs = [logits]
    for k in range(4, 7):
        logits, hidden = common.lm_forward(model, ids[:, k:k + 1], mask[:, :k + 1], pos[:, k:k + 1], cache,
                                           latent_mask=torch.ones((ids.shape[0], 1), dtype=torch.bool),
                                           latent_vectors=hidden[:, -1:])
        outs.append(logits)
    logits, _ = common.lm_forward(model, ids[:, 7:], mask, pos[:, 7:], cache)
    outs.append(logits)
    loss = -torch.cat(outs, 1)[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(fn):
    total = [0]
    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_keeps_the_cache_and_the_gradients(lora):
    model, _, _ = toy_model()
    if lora:
        model = common.apply_lora(model, 4, 8)
        with torch.no_grad():  # non-zero B, so every adapter has a gradient
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    model.train()
    ids = torch.randint(3, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    plain, ckpt = copy.deepcopy(model), common.enable_gradient_checkpointing(copy.deepcopy(model))
    loss1, g1 = coconut_passes(plain, ids)
    loss2, g2 = coconut_passes(ckpt, ids)
    assert loss1 == pytest.approx(loss2, abs=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-6), k
    # it does checkpoint: far fewer tensors are kept for the backward
    assert saved_bytes(lambda: coconut_passes(ckpt, ids)) < saved_bytes(lambda: coconut_passes(plain, ids)) / 5


def test_gradient_checkpointing_plain_forward_and_eval_mode():
    model, _, _ = toy_model()
    ids = torch.randint(3, 30, (3, 10), generator=torch.Generator().manual_seed(1))
    ckpt = common.enable_gradient_checkpointing(copy.deepcopy(model)).train()
    plain = copy.deepcopy(model).train()
    for m in (plain, ckpt):
        m(input_ids=ids, labels=ids).loss.backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    ckpt.eval()  # rollouts (eval mode, inference) do not checkpoint and still use the cache
    with torch.no_grad():
        r1 = common.rollout(ckpt, [[1, 2, 3]], common.sampling_step(0.0), 6, 0, 0)
        r2 = common.rollout(plain.eval(), [[1, 2, 3]], common.sampling_step(0.0), 6, 0, 0)
    assert torch.equal(r1.tokens, r2.tokens)


# ---------------------------------------------------------------------------------------------- generation in pieces

class CountingLatentStep:
    """A stateful step: two latent steps (the hidden state fed back), then greedy tokens; records
    the step index of every position as an extra."""
    def __init__(self):
        self.seen = []

    def __call__(self, t, logits, hidden, done):
        self.seen.append(torch.full(done.shape, t + 1.0))
        kind = common.LATENT_STEP if t < 2 else common.TOKEN
        return logits.argmax(-1), hidden if t < 2 else None, torch.full(done.shape, kind, dtype=torch.int8)

    def extras(self):
        return {"t": torch.stack(self.seen, 1)}


def test_generate_in_pieces_equals_one_piece():
    model, tok, _ = toy_model()
    model.eval()
    prompts = [tok.encode(q) for q in ["3+4=", "12*3=", "7-2=", "1+1+1+1=", "9*9=", "5="]]
    whole = common.generate(model, prompts, CountingLatentStep, 10, tok.eos_token_id, tok.pad_token_id, 2, batch_size=0)
    parts = common.generate(model, prompts, CountingLatentStep, 10, tok.eos_token_id, tok.pad_token_id, 2, batch_size=4)
    assert whole.tokens.shape[0] == parts.tokens.shape[0] == 12
    for i in range(12):
        n = int(whole.lengths[i])
        assert parts.lengths[i] == n
        assert torch.equal(whole.tokens[i, :n], parts.tokens[i, :n])
        assert torch.equal(whole.kinds[i, :n], parts.kinds[i, :n])
        assert torch.allclose(whole.latents[i, :n], parts.latents[i, :n], atol=1e-5)
        assert torch.equal(whole.extras["t"][i, :n], parts.extras["t"][i, :n])
        p = whole.prompt_mask[i].bool()
        assert torch.equal(whole.prompt_ids[i][p], parts.prompt_ids[i][parts.prompt_mask[i].bool()])
    # the joined rollout scores like the whole one
    with torch.no_grad():
        a = common.completion_logprobs(model, whole).token * whole.mask
        b = common.completion_logprobs(model, parts).token * parts.mask
    T = min(a.shape[1], b.shape[1])
    assert torch.allclose(a[:, :T], b[:, :T], atol=1e-4)


# ---------------------------------------------------------------------------------------------- the memory plan

def test_memory_plan_by_hand():
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    plan = memory_plan_bench.memory_plan(config, n_params=1_000_000, n_trainable=100_000, world=4, sharded=True,
                                         bf16=True, micro_rows=2, seq_len=10, gen_rows=8, gen_len=20,
                                         frozen_params=1_000_000)
    assert plan["weights"] == 4e6 / 4 + 2e6 / 4
    assert plan["gradients"] == 4e5 / 4 and plan["optimizer"] == 8e5 / 4
    assert plan["activations"] == 20 * (10 * 64 + 4 * 256) * 2 * 2  # tokens x per layer x bf16 x layers
    assert plan["kv_cache"] == 8 * 20 * 2 * 2 * 2 * 16 * 2          # rows x len x layers x (k, v) x heads x dim x bf16
    assert plan["gathered_weights"] == 2e6                          # the rollout's unsharded bf16 model
    assert plan["logits"] == 12 * 20 * 1000 and plan["autocast_copies"] == 0
    held = 4e6 / 4 + 2e6 / 4 + 4e5 / 4 + 8e5 / 4
    assert plan["total"] == held + max(plan["kv_cache"] + 2e6, plan["activations"] + plan["logits"])
    ckpt = memory_plan_bench.memory_plan(config, 1_000_000, 100_000, bf16=True, micro_rows=2, seq_len=10,
                                         checkpointing=True, logit_positions=5)
    assert ckpt["activations"] == 20 * (64 * 2 * 2 + (10 * 64 + 4 * 256) * 2)
    assert ckpt["logits"] == 12 * 5 * 1000
    assert ckpt["weights"] == 4e6 and ckpt["gathered_weights"] == 0  # one device holds everything
    assert ckpt["autocast_copies"] == 2e5


def test_print_memory_plan_warns_in_one_line(capsys, monkeypatch):
    model, _, _ = toy_model()
    args = type("A", (), {"gradient_checkpointing": False})()
    plan = common.print_memory_plan(model, common.Dist(), args, 4, 64, 32, 64)
    n = sum(p.numel() for p in model.parameters())
    assert plan["weights"] == 4 * n and plan["optimizer"] == 8 * n
    out = capsys.readouterr().out
    assert out.startswith("memory plan per device (GB): weights") and "warning" not in out
    monkeypatch.setattr(common.memory_plan_module(), "device_memory", lambda device: 1000)
    common.print_memory_plan(model, common.Dist(), args, 4, 64, 32, 64)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("warning: the memory plan") and "exceeds" in lines[1]


@pytest.mark.slow
def test_lora_and_checkpointing_under_fsdp2_and_ddp(tmp_path):
    """Two processes (FSDP2, then DDP) train LoRA + gradient checkpointing + an added token's row
    and save merged weights equal to one process's on the same four rows."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    worker = Path(__file__).with_name("scale_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(worker), "none", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    weights = {}
    for strategy in ("fsdp", "ddp"):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                            strategy, str(tmp_path / strategy)], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        weights[strategy] = AutoModelForCausalLM.from_pretrained(tmp_path / strategy).state_dict()
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    start, _, _ = toy_model(["<|a|>"])
    assert not torch.allclose(one["model.layers.0.mlp.up_proj.weight"],
                              start.state_dict()["model.layers.0.mlp.up_proj.weight"])
    for strategy, w in weights.items():
        for k in one:
            assert torch.allclose(w[k], one[k], atol=1e-5), (strategy, k)


def test_lora_run_saves_merged_checkpoints_and_resumes_its_adapters(tmp_path):
    """An intermediate checkpoint of a LoRA run: merged weights plain transformers loads, and a
    training state holding only the adapters and the new token's row, from which a resumed run
    continues with the same adapters and Adam moments."""
    args = type("A", (), {"output_dir": str(tmp_path), "save_steps": 2, "resume_from_checkpoint": ""})()

    def build():
        model, tok, ids = toy_model(["<|a|>"])
        model = common.apply_lora(model, 4, 8, trainable_token_ids=ids)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, tok, ids, opt, common.TrainState(args, common.Dist(), {"model": model}, [opt])

    model, tok, ids, opt, state = build()
    x = torch.tensor([[1, 2, ids[0], 3, 4, 5]])
    for step in (1, 2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        state.maybe_save(step, tok, {"mode": "cot"})
    folder = tmp_path / "checkpoint-2"
    plain = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    args.resume_from_checkpoint = "latest"
    model2, _, _, opt2, state2 = build()
    assert state2.resume()[0] == 2
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(torch.equal(p, trained[n]) for n, p in model2.named_parameters() if p.requires_grad)
    m1 = [s["exp_avg_sq"] for s in opt.state.values()]
    m2 = [s["exp_avg_sq"] for s in opt2.state.values()]
    assert len(m1) == len(m2) == len(trained) and all(torch.equal(a, b) for a, b in zip(m1, m2))


def test_a_lora_subfolder_model_is_saved_merged_too(tmp_path):
    """save_checkpoint's subfolders (ATP's decoder) are merged like the main model."""
    model, tok, _ = toy_model()
    second, _, _ = toy_model()
    second = common.apply_lora(second, 4, 8)
    with torch.no_grad():
        for n, p in second.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = second(input_ids=x).logits
    common.save_checkpoint(model, tok, tmp_path / "ck", {"mode": "cot"}, subfolders={"decoder": second})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck" / "decoder")
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, want, atol=1e-5)


def test_bad_lora_and_generation_sizes_are_one_line():
    """check_args is where the sizes are checked (apply_lora and generate only assert)."""
    def args(**kw):
        return type("A", (), {"num_generations": 4, "lora_r": 0, "lora_dropout": 0.0, "generation_batch_size": 0,
                              **kw})()
    with pytest.raises(SystemExit, match="--lora_r must be >= 0"):
        common.check_args(args(lora_r=-1))
    with pytest.raises(SystemExit, match="multiple of --num_generations 4"):
        common.check_args(args(generation_batch_size=6))
    model, tok, _ = toy_model()
    with pytest.raises(AssertionError):
        common.apply_lora(model, -1, 8)
    with pytest.raises(AssertionError):
        common.generate(model, [[1, 2]], CountingLatentStep, 4, tok.eos_token_id, tok.pad_token_id, 4, batch_size=6)
