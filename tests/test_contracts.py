"""The internals of transformers, peft and torch that common.py relies on, one test each, checked directly on a
tiny model (not through the project's functions where a direct check is possible). common.py reaches past the
public API in a few places: it replaces the KV cache's layers and its `update`, wraps decoder layers' and the LM
head's `forward` on the instance, hooks the embedding and the decoder, passes a 4-D boolean mask to sdpa, reads
peft's parameter names to merge LoRA by hand, and gathers FSDP2 shards for a rollout. When a new release moves one
of these, the test named after it fails with a message naming the internal and the versions it was last checked
on, instead of several method tests failing in odd ways. Each test says which function of common.py relies on it.
"""
import contextlib
import copy
import functools
import inspect

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

import common

CHECKED = "transformers 5.17.0 and 5.25.0, peft 0.21.2, torch 2.13.0"
TRANSFORMERS = Version(transformers.__version__)
CPU = torch.device("cpu")
PEFT_ON_525 = pytest.mark.filterwarnings(  # peft 0.21.2 reads a property transformers 5.25 deprecates
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def contract(ok, internal, detail=""):
    assert ok, (f"{internal}: {detail} (checked on {CHECKED}; this is transformers {transformers.__version__}, "
                f"peft {peft.__version__}, torch {torch.__version__})")


def toy():
    """A fresh tiny Qwen2 (4 layers, 4 heads / 2 KV heads, tied head, sdpa), the same weights every call."""
    return common.load_model("toy", CPU, torch.float32)[0].eval()


def tiny_llama(tied=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def cache_kwarg(model):
    """The model forward's KV cache argument, read from its signature (as common._LatentIO does)."""
    params = inspect.signature(type(model).forward).parameters
    names = [n for n in ("cache", "past_key_values") if n in params]
    contract(len(names) == 1, "the model forward's cache argument",
             f"{type(model).__name__}.forward should take exactly one of cache / past_key_values, takes {names}")
    return names[0]


def head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def record_layer_calls(model, log):
    """Wrap every decoder layer's forward on the instance: log[-1] is the index of the layer running."""
    def run(i, forward, *args, **kwargs):
        log.append(i)
        return forward(*args, **kwargs)
    for i, layer in enumerate(model.get_decoder().layers):
        layer.forward = functools.partial(run, i, layer.forward)


def prefill(model, ids, **kw):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}, **kw)
    return cache, out


X = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


# common._preallocated_cache (a DynamicLayer subclass in DynamicCache(config=...).layers)
def test_dynamic_cache_layers():
    model = toy()
    cfg = model.config
    cache = DynamicCache(config=cfg)
    contract(isinstance(cache.layers, list) and len(cache.layers) == cfg.num_hidden_layers,
             "DynamicCache(config=model.config).layers", f"one layer per decoder layer, got {cache.layers!r}")
    contract(all(type(layer) is DynamicLayer for layer in cache.layers), "DynamicCache(config=...).layers",
             f"every layer of a full-attention model is exactly transformers.cache_utils.DynamicLayer, got "
             f"{[type(layer).__name__ for layer in cache.layers]}")
    layer = cache.layers[0]
    contract(layer.is_initialized is False and layer.get_seq_length() == 0, "DynamicLayer.is_initialized",
             "a new layer is not initialized and holds 0 positions")
    k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    layer.lazy_initialization(k, v)
    contract(layer.is_initialized and layer.keys.numel() == 0 and layer.values.numel() == 0
             and layer.keys.dtype == k.dtype and layer.get_seq_length() == 0, "DynamicLayer.lazy_initialization(k, v)",
             "sets is_initialized and empty keys/values of k's dtype")
    keys, values = layer.update(k, v, 0, kwargs={})  # (Cache.update passes layer_idx / kwargs on: *args, **kwargs)
    contract(torch.equal(keys, k) and torch.equal(values, v) and layer.get_seq_length() == 3,
             "DynamicLayer.update(key_states, value_states, *args, **kwargs)", "the first update returns the states")
    k2, v2 = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    keys, values = layer.update(k2, v2)
    contract(torch.equal(keys, torch.cat([k, k2], -2)) and torch.equal(values, torch.cat([v, v2], -2))
             and keys is layer.keys and values is layer.values and layer.get_seq_length() == 4,
             "DynamicLayer.update", "appends along dim -2 and returns the full keys/values (layer.keys/.values)")
    buf = torch.zeros(2, 2, 10, 8)
    layer.keys, layer.values = buf[:, :, :6], buf[:, :, :6]
    contract(layer.get_seq_length() == 6, "DynamicLayer.get_seq_length()",
             "is keys.shape[-2] (the preallocated layer keeps keys a view of the filled part of a buffer)")
    contract(cache.get_seq_length(0) == 6 and cache.get_seq_length() == 6, "Cache.get_seq_length(layer_idx)",
             "reads cache.layers[layer_idx].get_seq_length()")


# common._checkpointed_layer (its replay replaces cache.update on the instance) and common._preallocated_cache
def test_attention_writes_through_cache_update():
    model = toy()
    cfg, kw = model.config, cache_kwarg(model)
    running, calls = [], []
    record_layer_calls(model, running)
    cache = DynamicCache(config=cfg)
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        calls.append((running[-1], layer_idx, tuple(key_states.shape), tuple(value_states.shape)))
        return update(key_states, value_states, layer_idx, *args, **kwargs)
    cache.update = recording_update
    with torch.no_grad():
        model(input_ids=X[:, :3], use_cache=True, **{kw: cache})
    shape = (2, cfg.num_key_value_heads, 3, head_dim(cfg))
    contract(calls == [(i, i, shape, shape) for i in range(cfg.num_hidden_layers)],
             "attention's call of Cache.update(key_states, value_states, layer_idx, ...)",
             f"decoder layer i calls the cache instance's update once with layer_idx i and (B, kv_heads, T, "
             f"head_dim) = {shape} states; recorded (running layer, layer_idx, k shape, v shape): {calls}")
    del cache.update

    # Cache.update dispatches to cache.layers[layer_idx].update
    seen = []
    sentinel = (torch.zeros(1), torch.ones(1))
    cache.layers[2].update = lambda k, v, *a, **kw: seen.append((k, v)) or sentinel
    k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    got = cache.update(k, v, 2)
    contract(got[0] is sentinel[0] and got[1] is sentinel[1] and len(seen) == 1 and seen[0][0] is k,
             "Cache.update(k, v, layer_idx)",
             "calls cache.layers[layer_idx].update(k, v, ...) and returns what it returns")

    # what attention uses is what update returns: the replay hands the held positions + the new ones, writes nothing
    ref, _ = prefill(model, X[:, :3])
    with torch.no_grad():
        want = model(input_ids=X[:, 3:], use_cache=True, **{kw: ref}).logits
    replayed, _ = prefill(model, X[:, :3])

    def replay(keys, values, layer_idx, *rest, **kwargs):
        held = replayed.layers[layer_idx]
        return torch.cat([held.keys, keys], -2), torch.cat([held.values, values], -2)
    replayed.update = replay
    with torch.no_grad():
        got = model(input_ids=X[:, 3:], use_cache=True, **{kw: replayed}).logits
    del replayed.update
    contract(torch.allclose(got, want, atol=1e-5) and replayed.get_seq_length() == 3,
             "attention's use of Cache.update's return value",
             "attention attends to the keys/values update returns (a replaced update that returns the cached "
             "positions + the new ones, writing nothing, gives the same logits and leaves the cache as it was)")
    contract(replayed.update.__func__ is type(replayed).update, "Cache.update on the instance",
             "deleting the instance's update restores the class's")


# common._LatentIO.cache_kwarg (lm_forward passes the cache by this name) and common._checkpointed_layer
def test_cache_argument_name():
    model = toy()
    kw = cache_kwarg(model)
    if TRANSFORMERS >= Version("5.25"):
        contract(kw == "cache", "the model forward's cache argument", f"is `cache` on 5.25, got {kw}")
    if TRANSFORMERS < Version("5.18"):
        contract(kw == "past_key_values", "the model forward's cache argument",
                 f"is `past_key_values` on 5.17, got {kw}")
    contract(common._io(model).cache_kwarg == kw, "common._LatentIO.cache_kwarg",
             f"picks {kw!r}, the name in {type(model).__name__}.forward's signature")
    seen = []
    layer = model.get_decoder().layers[1]
    forward = layer.forward

    def recording(*args, **kwargs):
        seen.append((args, kwargs))
        return forward(*args, **kwargs)
    layer.forward = recording
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=X[:, :2], use_cache=True, **{kw: cache})
    contract(len(seen) == 1 and seen[0][1].get(kw) is cache and not any(a is cache for a in seen[0][0]),
             "the decoder layers' cache argument", f"each decoder layer receives the cache as the keyword {kw!r} "
             f"(what _checkpointed_layer reads), got keywords {sorted(seen[0][1]) if seen else None}")


# common.enable_gradient_checkpointing (wraps each decoder layer's forward on the instance)
def test_decoder_layers_and_instance_forward():
    model = toy()
    layers = model.get_decoder().layers
    contract(isinstance(layers, torch.nn.ModuleList) and len(layers) == model.config.num_hidden_layers,
             "model.get_decoder().layers", "is the ModuleList of decoder layers")
    flags = [model.get_decoder().gradient_checkpointing] + [layer.gradient_checkpointing for layer in layers]
    contract(not any(flags), "transformers' gradient_checkpointing flags",
             f"are False on a new model (the project never sets them; transformers' wrapper then runs the layer "
             f"as is): {flags}")
    ran = []
    record_layer_calls(model, ran)
    contract(all("forward" in vars(layer) for layer in layers), "a decoder layer's forward",
             "is settable on the instance")
    model.train()
    cache = DynamicCache(config=model.config)
    out = model(input_ids=X[:, :3], use_cache=True, **{cache_kwarg(model): cache})
    out.logits.sum().backward()
    contract(ran == list(range(len(layers))), "nn.Module.__call__ of a decoder layer",
             f"runs the forward set on the instance (in train mode with gradients too), ran {ran}")
    contract(cache.get_seq_length() == 3, "DynamicCache under the instance forward", "is written in train mode")


# common.enable_gradient_checkpointing (why it does not use transformers' own checkpointing)
def test_transformers_checkpointing_drops_the_cache():
    model = toy()
    kw = cache_kwarg(model)
    filled, _ = prefill(model, X[:, :2])
    if hasattr(model, "activation_checkpointing_enable"):  # 5.25 (gradient_checkpointing_enable: a deprecated alias)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    fact = "transformers' own gradient checkpointing, train mode"
    empty = DynamicCache(config=model.config)
    out = model(input_ids=X[:, :2], use_cache=True, **{kw: empty})
    contract(empty.get_seq_length() == 0 and not any(layer.is_initialized for layer in empty.layers)
             and getattr(out, kw) is None, fact,
             "a forward with gradients leaves the DynamicCache it is given unwritten (the layers get cache=None) and "
             "returns no cache: if this fails, transformers now keeps the cache and common could use its checkpointing")
    with pytest.raises(RuntimeError):  # the mask counts the 2 cached positions, the layers see only the 2 new keys
        model(input_ids=X[:, 2:4], position_ids=torch.tensor([[2, 3]]), use_cache=True, **{kw: filled})
    contract(filled.get_seq_length() == 2, fact, "a forward with a filled cache fails and leaves it unwritten")
    nograd = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=X[:, :2], use_cache=True, **{kw: nograd})
    if TRANSFORMERS >= Version("5.25"):  # checkpoints (and drops the cache) only with gradients enabled
        contract(nograd.get_seq_length() == 2, fact, "under no_grad the cache is written on 5.25")
    if TRANSFORMERS < Version("5.18"):  # drops it in train mode whatever grad mode
        contract(nograd.get_seq_length() == 0, fact, "under no_grad the cache is still dropped on 5.17")


# common._LatentIO._embed_hook / _decoder_hook (lm_forward's latent inputs and returned hidden state)
def test_embedding_and_decoder_hooks():
    model = toy()
    emb, decoder = model.get_input_embeddings(), model.get_decoder()
    x = X[:1]
    y = x.clone()
    y[0, 2] = 40
    with torch.no_grad():
        want = model(input_ids=y).logits
        replacement = emb(y)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 2] = True
    handle = emb.register_forward_hook(lambda m, a, out: torch.where(mask.unsqueeze(-1), replacement, out))
    seen, last_layer = [], []
    decoder.register_forward_hook(lambda m, a, out: seen.append(out))
    decoder.layers[-1].register_forward_hook(lambda m, a, out: last_layer.append(out))
    with torch.no_grad():
        got = model(input_ids=x, output_hidden_states=True)
    handle.remove()
    contract(torch.allclose(got.logits, want, atol=1e-5), "register_forward_hook on get_input_embeddings()",
             "the tensor the hook returns is what the model uses as inputs_embeds")
    out = seen[-1]
    hidden = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", None)
    contract(torch.is_tensor(hidden) and hidden.shape == (1, x.shape[1], model.config.hidden_size),
             "the decoder's forward output", f"[0] (a tuple) or .last_hidden_state is (B, T, d), got {type(out)}")
    contract(torch.equal(hidden, got.hidden_states[-1]), "the decoder's forward output",
             "its final hidden state equals output_hidden_states=True's hidden_states[-1]")
    after = last_layer[-1][0] if isinstance(last_layer[-1], tuple) else last_layer[-1]
    with torch.no_grad():
        contract(torch.allclose(decoder.norm(after), hidden, atol=1e-6), "the decoder's forward output",
                 "its final hidden state is after the final norm (norm of the last decoder layer's output)")
        contract(torch.allclose(model.get_output_embeddings()(hidden), got.logits, atol=1e-5),
                 "the decoder's forward output", "the LM head of that hidden state gives the model's logits")


# common._LatentIO._head_forward and lm_logprobs (the head returns packed statistics as "logits")
@pytest.mark.parametrize("keep", [0, 1, 4])
def test_lm_head_called_once_with_last_positions(keep):
    model = toy()
    head = model.get_output_embeddings()
    calls, hidden = [], []
    sentinel = torch.zeros(7, 3)  # any shape: lm_logprobs' head returns (n x T, columns)
    model.get_decoder().register_forward_hook(
        lambda m, a, out: hidden.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))

    def forward(h):
        calls.append(h)
        return sentinel
    head.forward = forward
    with torch.no_grad():
        out = model(input_ids=X, logits_to_keep=keep)
    n = keep or X.shape[1]
    contract(len(calls) == 1, "the LM head (get_output_embeddings())",
             f"the model calls the head's forward set on the instance exactly once per forward, got {len(calls)}")
    contract(calls[0].shape == (2, n, model.config.hidden_size) and torch.equal(calls[0], hidden[0][:, -n:]),
             "logits_to_keep", f"logits_to_keep={keep} hands the head the last {n} positions' final hidden states "
             f"(B, {n}, d), got {tuple(calls[0].shape)}")
    contract(out.logits is sentinel, "the model's logits", "are exactly what the head's forward returns (any shape)")


# common._rollout (G rollouts per prompt from one prefill)
def test_batch_repeat_interleave():
    model = toy()
    cache, _ = prefill(model, X[:, :3])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    G = 3
    cache.batch_repeat_interleave(G)
    for layer, (k, v) in zip(cache.layers, before):
        ok = layer.keys.shape[0] == 2 * G and all(torch.equal(layer.keys[i * G + g], k[i]) and
                                                  torch.equal(layer.values[i * G + g], v[i])
                                                  for i in range(2) for g in range(G))
        contract(ok, "DynamicCache.batch_repeat_interleave(G)",
                 "repeats every layer's keys/values along the batch: row i becomes rows i*G .. i*G+G-1")
    contract(cache.get_seq_length() == 3, "DynamicCache.batch_repeat_interleave(G)", "keeps the length")


# common._rollout (the one-query decode steps pass a (B, 1, 1, S) boolean mask under sdpa)
def test_4d_boolean_mask_reaches_sdpa(monkeypatch):
    model = toy()
    contract(model.config._attn_implementation == "sdpa", "config._attn_implementation",
             f"is readable and 'sdpa' for the toy model, got {model.config._attn_implementation!r}")
    kw = cache_kwarg(model)
    ids, pmask = common.pad_left([[5, 6, 7, 8], [9, 10]], 0)
    pos = common.positions(pmask)
    tok = torch.tensor([[11], [12]])
    step_pos = pmask.sum(1, keepdim=True)
    attn2 = torch.cat([pmask, pmask.new_ones(2, 3)], 1)
    attn4 = attn2.bool()[:, None, None, :]  # preallocated for 3 steps, sliced per step as _rollout does
    step_mask = attn4[..., :5]

    def step(mask):
        cache, _ = prefill(model, ids, attention_mask=pmask, position_ids=pos)
        with torch.no_grad():
            out = model(input_ids=tok, attention_mask=mask, position_ids=step_pos, use_cache=True, **{kw: cache})
        return out.logits
    want = step(attn2[:, :5])
    sdpa, masks = torch.nn.functional.scaled_dot_product_attention, []

    def recording(*args, **kwargs):
        masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    got = step(step_mask)
    monkeypatch.undo()
    decode = masks[-model.config.num_hidden_layers:]
    contract(len(masks) == 2 * model.config.num_hidden_layers and all(m is step_mask for m in decode),
             "a 4-D attention mask under sdpa", "reaches torch's scaled_dot_product_attention as is (the same "
             f"tensor), in every layer; got {[None if m is None else (tuple(m.shape), m.dtype) for m in decode]}")
    contract(torch.allclose(got, want, atol=1e-5), "a (B, 1, 1, S) boolean mask under sdpa",
             "gives the logits of the 2-D mask for a one-token decode step with left padding")
    cache, _ = prefill(model, torch.tensor([[9, 10]]))
    with torch.no_grad():
        alone = model(input_ids=tok[1:], position_ids=torch.tensor([[2]]), use_cache=True, **{kw: cache}).logits
    contract(torch.allclose(got[1], alone[0], atol=1e-5), "a (B, 1, 1, S) boolean mask under sdpa",
             "masks the left padding (the padded row's logits equal the row's own, unpadded)")


# common.apply_lora and merge_lora (the names and attributes merge_lora reads)
@PEFT_ON_525
@pytest.mark.parametrize("tied", [True, False])
def test_peft_lora_and_trainable_tokens_names(tied):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer
    model = toy() if tied else tiny_llama()
    plain_keys = set(model.state_dict())
    emb_name = [n for n, m in model.named_modules() if m is model.get_input_embeddings()][0].rsplit(".", 1)[-1]
    tokens = [3, 5]
    token_modules = {emb_name: tokens}
    if not tied:
        token_modules["lm_head"] = tokens
    r, alpha = 4, 8
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                                          trainable_token_indices=token_modules))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    prefix = "base_model.model."
    contract(all(k.startswith(prefix) for k in state), "PeftModel.state_dict()", f"every key starts with {prefix!r}")

    def plain(key):
        return key[len(prefix):].replace(".base_layer", "").replace(".token_adapter", "")
    loras = [(n, m) for n, m in pm.named_modules() if isinstance(m, LoraLayer)]
    contract(len(loras) >= 7 * model.config.num_hidden_layers, "peft.tuners.lora.LoraLayer",
             f"all-linear puts a LoRA layer on every linear layer of the decoder, got {len(loras)}")
    for name, layer in loras:
        a = layer.active_adapters
        contract(a == ["default"] and layer.scaling["default"] == alpha / r,
                 "LoraLayer.active_adapters / scaling[adapter]",
                 f"{name}: active {a}, scaling {getattr(layer, 'scaling', None)} (alpha / r = {alpha / r})")
        keys = [f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight", f"{name}.base_layer.weight"]
        contract(all(k in state for k in keys) and plain(keys[2]) in plain_keys, "LoRA's state dict names",
                 f"{keys} are in the state dict and {plain(keys[2])!r} is the plain model's")
        A, B = state[keys[0]], state[keys[1]]
        contract(A.shape == (r, state[keys[2]].shape[1]) and B.shape == (state[keys[2]].shape[0], r),
                 "lora_A / lora_B weights", f"{name}: A is (r, in), B is (out, r): W + scaling * B @ A")
    layers = [(n, m) for n, m in pm.named_modules() if isinstance(m, TrainableTokensLayer)]
    contract(len(layers) == 2, "peft.tuners.trainable_tokens.TrainableTokensLayer",
             f"trainable_token_indices makes one for the input table and one for the head (tied: sharing its rows), "
             f"got {[n for n, _ in layers]}")
    for name, layer in layers:
        delta = f"{name}.trainable_tokens_delta.default"
        contract(list(layer.token_indices["default"]) == tokens and layer.active_adapters == ["default"]
                 and delta in state and f"{name}.base_layer.weight" in state
                 and plain(f"{name}.base_layer.weight") in plain_keys, "TrainableTokensLayer.token_indices[adapter]",
                 f"{name}: token_indices {layer.token_indices}, and {delta!r} holds the rows (the new values, "
                 "not a difference) beside base_layer.weight")
    theirs = copy.deepcopy(pm).merge_and_unload().state_dict()
    name, layer = loras[0]
    w = state[f"{name}.base_layer.weight"] + alpha / r * state[f"{name}.lora_B.default.weight"] @ state[
        f"{name}.lora_A.default.weight"]
    contract(torch.allclose(w, theirs[plain(f"{name}.base_layer.weight")], atol=1e-6), "LoRA's merge",
             "peft's merge_and_unload is W + scaling[adapter] * B @ A")
    for name, _ in layers:
        rows = theirs[plain(f"{name}.base_layer.weight")][tokens]
        contract(torch.allclose(rows, state[f"{name}.trainable_tokens_delta.default"]), "trainable tokens' merge",
                 f"peft's merge_and_unload writes {name}'s trainable_tokens_delta rows into the table")
    mine = common.merge_lora(pm, state)
    contract(set(mine) == set(theirs) and all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine),
             "common.merge_lora", "equals peft's own merge_and_unload()")


# common._LatentIO._head_forward / lm_logprobs on a LoRA model with trainable tokens (the head is peft's wrapper)
@PEFT_ON_525
@pytest.mark.parametrize("tied", [True, False])
def test_peft_wrapped_head_weight(tied):
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import TrainableTokensWrapper
    model = toy() if tied else tiny_llama()
    tokens = {"embed_tokens": [3, 5]}
    if not tied:  # an untied head with a bias: peft's wrapper hides the bias and its forward leaves it out
        model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        tokens["lm_head"] = [3, 5]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                          trainable_token_indices=tokens))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    head = pm.get_output_embeddings()
    contract(isinstance(head, TrainableTokensWrapper), "get_output_embeddings() of a peft model with trainable tokens",
             f"is peft's TrainableTokensWrapper (the module _LatentIO patches), got {type(head).__name__}")
    h = torch.randn(2, 3, pm.config.hidden_size)
    with torch.no_grad():
        contract(torch.allclose(torch.nn.functional.linear(h, head.weight, getattr(head, "bias", None)), head(h),
                                atol=1e-5), "peft's TrainableTokensWrapper as the LM head",
                 "its .weight is the table with the trainable rows written in (what lm_logprobs' chunks multiply by), "
                 "and F.linear(h, head.weight, getattr(head, 'bias', None)) is the head's own output (peft 0.21.2 "
                 "exposes no .bias and leaves a wrapped head's bias out of its forward)")


# common.rollout / _full_weights (FSDP2), wrap_model and full_state_dict
@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_single_process(gloo_group):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    ref, model = toy(), toy()
    x = X[:, :4]
    with torch.no_grad():
        want = ref(input_ids=x).logits
    want_rollout = common.rollout(ref, [[5, 6, 7], [8, 9]], common.sampling_step(0), 4, 0, 0, num_generations=2)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=MixedPrecisionPolicy())
    fully_shard(model, mp_policy=MixedPrecisionPolicy())
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    contract(len(sharded) == model.config.num_hidden_layers + 1 and model in sharded,
             "torch.distributed.fsdp.fully_shard", "makes each decoder layer and the root an FSDPModule")
    for m in sharded:
        params = inspect.signature(m.set_reshard_after_forward).parameters
        contract(callable(m.unshard) and callable(m.reshard) and "recurse" in params, "FSDPModule",
                 "has unshard(), reshard() and set_reshard_after_forward(bool, recurse=...)")
    contract(all(isinstance(p, DTensor) for p in model.parameters()), "fully_shard", "makes the parameters DTensors")
    with common._full_weights(model):
        contract(not any(isinstance(p, DTensor) for p in model.parameters()), "FSDPModule.unshard()",
                 "after unshard (with set_reshard_after_forward(False)) the parameters are full tensors")
        with torch.inference_mode():
            got = model(input_ids=x).logits
        contract(torch.allclose(got, want, atol=1e-5), "FSDPModule.unshard()",
                 "the unsharded model's forward under inference_mode gives the plain model's logits")
        contract(not any(isinstance(p, DTensor) for p in model.parameters()), "set_reshard_after_forward(False)",
                 "the parameters stay unsharded after a forward")
    contract(all(isinstance(p, DTensor) for p in model.parameters()), "FSDPModule.reshard()",
             "the parameters are DTensors again")
    r = common.rollout(model, [[5, 6, 7], [8, 9]], common.sampling_step(0), 4, 0, 0, num_generations=2)
    contract(torch.equal(r.tokens, want_rollout.tokens) and all(isinstance(p, DTensor) for p in model.parameters()),
             "FSDP2 rollout", "common.rollout on the FSDP2 model generates what the plain model does, and reshards")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    plain = ref.state_dict()
    contract(set(full) == set(plain) and all(torch.equal(full[k], plain[k]) for k in full),
             "get_model_state_dict(full_state_dict=True)", "gathers the plain model's weights under its names, a tied "
             f"head's key included; differing keys {sorted(set(plain) ^ set(full))}")


# common.save_checkpoint (drops a tied head's key), add_special_tokens, lm_logprobs, stop_ids
def test_tied_weights_config_and_tokenizer():
    model, tok, _ = common.load_model("toy", CPU, torch.float32)
    untied = tiny_llama(tied=False)
    for m, tied in ((model, True), (untied, False)):
        contract(m.config.tie_word_embeddings is tied, "config.tie_word_embeddings", f"{tied} for this model")
        keys = m._tied_weights_keys
        contract(isinstance(keys, dict) and keys.get("lm_head.weight") == "model.embed_tokens.weight",
                 "model._tied_weights_keys", "a dict {tied key: its source} listing lm_head.weight, tied or not "
                 f"(so save_checkpoint also reads tie_word_embeddings), got {keys!r}")
        sd = m.state_dict()
        same = sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
        contract(same is tied, "a tied head in the state dict",
                 "both keys are in the state dict, sharing storage exactly when tie_word_embeddings")
        contract(m.config.get_text_config() is m.config, "config.get_text_config()", "is the config of a text model")
        eos = m.generation_config.eos_token_id
        contract(eos is None or isinstance(eos, int) or all(isinstance(i, int) for i in eos),
                 "model.generation_config.eos_token_id", f"an int, a list of ints or None, got {eos!r}")
    contract(model.generation_config.eos_token_id == model.config.eos_token_id == 0,
             "model.generation_config.eos_token_id", "is the config's eos for a model built from a config")
    before = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|a|>", "<|b|>"]}, replace_extra_special_tokens=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|c|>"]}, replace_extra_special_tokens=False)
    contract(list(tok.extra_special_tokens) == ["<|a|>", "<|b|>", "<|c|>"] and len(tok) == before + 3
             and tok.convert_tokens_to_ids(["<|a|>", "<|b|>", "<|c|>"]) == [before, before + 1, before + 2],
             "tokenizer.add_special_tokens(..., replace_extra_special_tokens=False)",
             f"keeps the existing extra special tokens and appends ids, got {tok.extra_special_tokens}")
    contract(tok.encode("1<|b|>2", add_special_tokens=False)[1] == before + 1, "an added special token",
             "is encoded as one id")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    untied.resize_token_embeddings(45, mean_resizing=False)
    for m, tied, n in ((model, True, len(tok)), (untied, False, 45)):
        emb, head = m.get_input_embeddings().weight, m.get_output_embeddings().weight
        contract(emb.shape[0] == head.shape[0] == n and (emb.data_ptr() == head.data_ptr()) is tied,
                 "resize_token_embeddings(n, mean_resizing=False)",
                 "grows the input table and the head to n rows, and a tied head stays the same storage")


# common._checkpointed_layer (its replay is torch checkpoint's recompute context) and _chunked_stats
def test_torch_checkpoint_context_fn():
    from torch.utils.checkpoint import checkpoint
    log = []

    @contextlib.contextmanager
    def tag(name):
        log.append(f"{name}+")
        try:
            yield
        except BaseException as e:
            log.append(type(e).__name__)
            raise
        finally:
            log.append(f"{name}-")

    def f(x, scale=1.0):
        log.append("run")
        return (x * scale).sin()
    x = torch.randn(3, requires_grad=True)
    y = checkpoint(f, x, use_reentrant=False, scale=2.0, context_fn=lambda: (tag("forward"), tag("recompute")))
    contract(log == ["forward+", "run", "forward-"], "torch.utils.checkpoint.checkpoint(context_fn=...)",
             f"the forward runs under context_fn()[0] (keyword arguments passed on), got {log}")
    y.sum().backward()
    contract(log[3:5] == ["recompute+", "run"] and log[-1] == "recompute-"
             and torch.allclose(x.grad, 2 * (2 * x).cos()),
             "torch.utils.checkpoint.checkpoint(context_fn=...)",
             f"backward recomputes the function under context_fn()[1], left through its finally (torch may stop the "
             f"recomputation early by raising through it), got {log}")
