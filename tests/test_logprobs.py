"""common.lm_logprobs / completion_logprobs: per-position log-probs computed in chunks of positions
from the hidden states, never as whole (rows, T, vocabulary) logits. Values and gradients equal
those of the whole logits (by hand on a head whose logits are its bias, then against whole logits
under fp32, bf16 autocast, peft LoRA, a rollout with latents, FSDP2 and DDP), and no vocabulary-sized
tensor is kept for backward."""
import copy
import json

import pytest
import torch

import common
from conftest import ROOT, run_script


def fresh_toy():
    model, _, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    return model.eval()


def batch(V, d, n=3, L=12, T=7, K=4, seed=1):
    """A left-padded batch (row 0 starts 3 later, the last row one later) with latent vectors at two
    completion positions, its last T ids as tokens, and K ids per position."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (n, L), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3], mask[-1, :1] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    latent_mask = torch.zeros_like(ids, dtype=torch.bool)
    latent_mask[:, L - T + 1:L - T + 3] = True
    vectors = torch.randn(n, L, d, generator=g)
    return ids, mask, latent_mask, vectors, ids[:, -T:], torch.randint(0, V, (n, T, K), generator=g)


def gather_logprobs(logits, tokens):
    """log softmax(logits)[token], the unchunked way."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def whole_logits(model, r, rows):
    """Whole (n, T, V) fp32 logits over a rollout's completion, latents fed back (what the losses
    computed before lm_logprobs)."""
    ids, mask, latent_mask, latents = r.inputs(rows)
    T = r.tokens.shape[1]
    logits, _ = common.lm_forward(model, ids, mask, common.positions(mask), latent_mask=latent_mask,
                                  latent_vectors=latents, logits_to_keep=T + 1)
    return logits[:, :-1].float()


def whole(model, ids, mask, latent_mask, vectors, tokens, K, t=1.0, t_ids=None):
    """The same quantities the unchunked way: whole logits, then log-softmax."""
    T = tokens.shape[1]
    logits, _ = common.lm_forward(model, ids, mask, common.positions(mask), latent_mask=latent_mask,
                                  latent_vectors=vectors, logits_to_keep=T + 1)
    z = logits[:, :-1].float()
    p = (z / t).softmax(-1)
    return common.LogProbs(gather_logprobs(z / t, tokens), (z / (t_ids or t)).log_softmax(-1).gather(-1, K),
                           (z / t).logsumexp(-1), -(p * (z / t).log_softmax(-1)).sum(-1))


def loss_of(lp):
    """A loss that uses every column with different weights (so a swapped column shows)."""
    return lp.token.sum() + 0.5 * lp.ids[..., 1:].sum() - 0.3 * lp.lse.sum() + 0.7 * lp.entropy.sum()


def grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


# ----------------------------------------------------------------------------------------------
# by hand

def test_a_head_whose_logits_are_its_bias_by_hand():
    """Final norm weight 0: the hidden state is 0, so every position's logits are the head's bias
    log [1, 2, 3, 4], i.e. p = [.1, .2, .3, .4], lse = log 10. At temperature 2, p is proportional
    to sqrt([1, 2, 3, 4]). The gradient of the summed token log-probs w.r.t. the bias is
    count(token) - positions x p = 1 - 4p for tokens [2, 3, 0, 1]."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    model.lm_head = torch.nn.Linear(8, 4, bias=True)  # before the first forward (common patches the head then)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.lm_head.bias.copy_(torch.tensor([1.0, 2, 3, 4]).log())
    ids = torch.tensor([[1, 0, 2, 3, 0, 1]])
    mask = torch.ones_like(ids)
    tokens, K = ids[:, 2:], torch.tensor([[[0, 3]] * 4])
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    sq = torch.tensor([1.0, 2, 3, 4]).sqrt()
    for chunk in (4, None):  # one position per chunk (V = 4), and one chunk
        model.zero_grad()
        lp, _ = common.lm_logprobs(model, ids, mask, common.positions(mask), tokens, ids=K, ids_temperature=2.0,
                                   entropy=True, chunk_elements=chunk)
        torch.testing.assert_close(lp.token, p[[2, 3, 0, 1]].log()[None])
        torch.testing.assert_close(lp.lse, torch.full((1, 4), 10.0).log())
        torch.testing.assert_close(lp.entropy, torch.full((1, 4), -(p * p.log()).sum().item()))   # 1.2799 nats
        torch.testing.assert_close(lp.ids, (sq[[0, 3]] / sq.sum()).log().expand(1, 4, 2))
        lp.token.sum().backward()
        torch.testing.assert_close(model.lm_head.bias.grad, torch.tensor([0.6, 0.2, -0.2, -0.6]))


# ----------------------------------------------------------------------------------------------
# against whole logits

@pytest.mark.parametrize("chunk_positions", [4, 1, None])   # 21 positions: 5 chunks and a remainder; 21; one
def test_chunked_equals_whole_logits_values_and_gradients(chunk_positions):
    """Left-padded rows with latent inputs (not detached), tokens at temperature 0.7 and ids at 1.0:
    every column and the gradients w.r.t. every parameter and the latent vectors match."""
    model = fresh_toy()
    V, d = model.config.vocab_size, model.config.hidden_size
    ids, mask, latent_mask, vectors, tokens, K = batch(V, d)
    params = [*model.parameters()]
    out = {}
    for name in ("chunked", "whole"):
        model.zero_grad()
        vec = vectors.clone().requires_grad_(True)
        if name == "chunked":
            lp, hidden = common.lm_logprobs(model, ids, mask, common.positions(mask), tokens, 0.7, latent_mask, vec,
                                            K, 1.0, True, chunk_elements=chunk_positions and chunk_positions * V)
            assert hidden.shape == (3, 12, d)
        else:
            lp = whole(model, ids, mask, latent_mask, vec, tokens, K, 0.7, 1.0)
        loss_of(lp).backward()
        out[name] = (lp, grads(params), vec.grad)
    (a, ga, va), (b, gb, vb) = out["chunked"], out["whole"]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert va.abs().sum() > 0
    torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5)


def test_columns_without_ids_or_entropy_and_sft_targets(toy):
    """Only the token and lse columns; tokens = ids[:, 1:] scores every position like cross-entropy."""
    model, _, _ = toy
    ids, mask, *_ = batch(model.config.vocab_size, model.config.hidden_size)
    mask = torch.ones_like(mask)
    with torch.no_grad():
        lp, _ = common.lm_logprobs(model, ids, mask, common.positions(mask), ids[:, 1:], chunk_elements=100)
        logits, _ = common.lm_forward(model, ids, mask, common.positions(mask))
    assert lp.ids is None and lp.entropy is None
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(lp.token, -ce.view_as(lp.token), rtol=1e-5, atol=1e-5)


def test_completion_logprobs_matches_whole_logits(toy):
    """A rollout with latent steps and rows that ended early: rows 1-2, temperature 0.7 (and 0,
    which means 1), the stored ids at temperature 1."""
    model, _, _ = toy
    V, d = model.config.vocab_size, model.config.hidden_size
    g = torch.Generator().manual_seed(2)
    prompt_ids, prompt_mask = common.pad_left([[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]], 0)
    N, T = 4, 6
    kinds = torch.full((N, T), common.TOKEN, dtype=torch.int8)
    kinds[:, :2] = common.LATENT_STEP
    mask = torch.ones((N, T), dtype=torch.long)
    mask[1, 4:] = 0
    r = common.Rollout(prompt_ids, prompt_mask, torch.randint(2, V, (N, T), generator=g), kinds, mask, mask.sum(1),
                       torch.ones(N, dtype=torch.bool), torch.randn(N, T, d, generator=g), torch.zeros(N, T),
                       {"ids": torch.randint(0, V, (N, T, 3), generator=g)})
    rows = slice(1, 3)
    with torch.no_grad():
        lp = common.completion_logprobs(model, r, rows, 0.7, r.extras["ids"][rows], 1.0, entropy=True,
                                        chunk_elements=2 * V)
        z = whole_logits(model, r, rows)
        torch.testing.assert_close(lp.token, gather_logprobs(z / 0.7, r.tokens[rows]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp.ids, z.log_softmax(-1).gather(-1, r.extras["ids"][rows]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(common.completion_logprobs(model, r, rows, 0.0).token,
                                   gather_logprobs(z, r.tokens[rows]), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_the_whole_bf16_logits():
    """io.bf16 (wrap_model's --bf16): the chunked matmul is a bf16 matmul under autocast, then fp32,
    as the unchunked path's head, so the values are the same; backward recomputes each chunk under
    the same autocast. The gradients are the same too, but for the head's weight: autocast casts it
    to bf16 once, so its gradient is summed over chunks in bf16, and it differs from the whole
    path's by bf16 rounding; it is as close to the fp32 gradient as the whole path's is."""
    model = fresh_toy()
    V, d = model.config.vocab_size, model.config.hidden_size
    ids, mask, latent_mask, vectors, tokens, K = batch(V, d)
    names, params = zip(*model.named_parameters())

    def run(chunked, bf16):
        model.zero_grad()
        common.wrap_model(model, common.Dist(), bf16=bf16)
        lp = (common.lm_logprobs(model, ids, mask, common.positions(mask), tokens, 0.7, latent_mask, vectors, K, 1.0,
                                 True, chunk_elements=3 * V)[0] if chunked else
              whole(model, ids, mask, latent_mask, vectors, tokens, K, 0.7, 1.0))
        loss_of(lp).backward()
        return lp, grads(params)
    _, g32 = run(False, False)
    (a, ga), (b, gb) = run(True, True), run(False, True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    err = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
    for name, x, y, z in zip(names, ga, gb, g32):
        if name == "model.embed_tokens.weight":   # the (tied) head
            assert err(x, y) < 1e-2 and err(x, z) < 1.5 * err(y, z), (err(x, y), err(x, z), err(y, z))
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_peft_lora_gradients_match():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(fresh_toy(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    V, d = model.config.vocab_size, model.config.hidden_size
    ids, mask, latent_mask, vectors, tokens, K = batch(V, d)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    lp, _ = common.lm_logprobs(model, ids, mask, common.positions(mask), tokens, 0.7, latent_mask, vectors, K, 1.0,
                               True, chunk_elements=2 * V)
    loss_of(lp).backward()
    g_chunked = grads(lora)
    model.zero_grad()
    ref = whole(model, ids, mask, latent_mask, vectors, tokens, K, 0.7, 1.0)
    loss_of(ref).backward()
    for x, y in zip(lp, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in g_chunked)
    for x, y in zip(g_chunked, grads(lora)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_a_deep_copy_scores_with_its_own_weights(toy):
    """The reference model of the RL scripts is a deepcopy: its patched head uses its own weights."""
    model, _, _ = toy
    ids, mask, latent_mask, vectors, tokens, K = batch(model.config.vocab_size, model.config.hidden_size)
    with torch.no_grad():
        common.lm_logprobs(model, ids, mask, common.positions(mask), tokens)  # the hooks exist before the copy
        ref = copy.deepcopy(model)
        ref.get_output_embeddings().weight.mul_(2.0)
        lp, _ = common.lm_logprobs(ref, ids, mask, common.positions(mask), tokens, ids=K, chunk_elements=100)
        want = whole(ref, ids, mask, None, None, tokens, K)
        mine, _ = common.lm_logprobs(model, ids, mask, common.positions(mask), tokens, chunk_elements=100)
    torch.testing.assert_close(lp.token, want.token, rtol=1e-5, atol=1e-5)
    assert (mine.token - lp.token).abs().max() > 0.1


def test_a_softcapped_model_falls_back_to_whole_logits():
    """Gemma-2 caps the logits after its head (final_logit_softcapping), which would cap the packed
    columns too: lm_logprobs then scores the whole, capped logits instead."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=1.0)).eval()
    ids, mask, latent_mask, vectors, tokens, K = batch(50, 16)
    with torch.no_grad():
        lp, _ = common.lm_logprobs(model, ids, mask, common.positions(mask), tokens, 0.7, latent_mask, vectors, K,
                                   entropy=True, chunk_elements=50)
        ref = whole(model, ids, mask, latent_mask, vectors, tokens, K, 0.7)
    for x, y in zip(lp, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# memory

def test_no_vocabulary_sized_tensor_is_kept_for_backward():
    """What autograd saves for backward (saved_tensors_hooks sees every tensor the graph keeps):
    chunked, no tensor whose last dimension is the vocabulary, so the forward leaves nothing that
    grows with positions x vocabulary (checkpoint keeps only each chunk's inputs); whole logits, or
    the single-chunk path that the tiny models take, keep at least rows x T x V of them."""
    model = fresh_toy()
    V, d = model.config.vocab_size, model.config.hidden_size
    ids, mask, latent_mask, vectors, tokens, K = batch(V, d, n=2, L=40, T=32)

    def kept(score):
        sizes = []
        def pack(x):
            if x.dim() and x.shape[-1] == V:
                sizes.append(x.numel())
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = score()
        loss.backward()   # the recomputation in backward works
        return sum(sizes)

    def chunked(elements):
        return lambda: loss_of(common.lm_logprobs(model, ids, mask, common.positions(mask), tokens, 0.7, latent_mask,
                                                  vectors, K, 1.0, True, chunk_elements=elements)[0])
    assert kept(chunked(4 * V)) == 0
    assert kept(chunked(None)) >= 2 * 32 * V
    assert kept(lambda: loss_of(whole(model, ids, mask, latent_mask, vectors, tokens, K, 0.7, 1.0))) >= 2 * 32 * V


# ----------------------------------------------------------------------------------------------
# FSDP2 and DDP

@pytest.mark.slow
@pytest.mark.parametrize("strategy,port", [("fsdp", "29541"), ("ddp", "29542")])
def test_two_processes_match_one_process(strategy, port, tmp_path):
    """torchrun, 2 CPU processes (gloo), FSDP2 or DDP on the toy model, after a rollout: each rank's
    chunked values for its rows equal one process's on the whole batch, and the averaged (under
    FSDP2 sharded) gradients equal one process's gradient (tests/logprobs_worker.py)."""
    out = tmp_path / "report.json"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               ROOT / "tests" / "logprobs_worker.py", out, strategy, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    report = json.loads(out.read_text())
    assert len(report) == 2
    for value_err, grad_err, missing in report:
        assert value_err < 1e-5 and grad_err < 1e-5 and missing == 0, report
