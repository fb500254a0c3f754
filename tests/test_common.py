"""The shape of a real instruct model (issue: real models end to end): precision, added think
markers, chat prompts and stops, defaults that fail loudly. Uses `smol_tiny` (conftest): a tiny random
Llama with SmolLM2-135M-Instruct's real tokenizer and chat template, published in bf16."""
import json

import pytest
import torch

import common
import toy


def test_stop_ids_include_the_end_of_turn_and_end_a_rollout(smol_tiny):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != im_end and set(common.stop_ids(model, tok)) == {tok.eos_token_id, im_end}
    word = tok.encode(" seven", add_special_tokens=False)[0]

    def step(t, logits, hidden, done):  # two words, then the end of the turn
        return torch.full(done.shape, word if t < 2 else im_end), None, torch.zeros_like(done, dtype=torch.int8)
    prompt = common.encode_prompt(tok, "1+1?", chat=True)
    r = common.rollout(model, [prompt], step, 10, common.stop_ids(model, tok), tok.pad_token_id)
    assert r.finished.all() and r.lengths.tolist() == [3]
    r = common.rollout(model, [prompt], step, 10, tok.eos_token_id, tok.pad_token_id)  # the tokenizer's eos alone
    assert not r.finished.any() and r.lengths.tolist() == [10]


def test_added_think_markers_tie_no_token_and_train_alone(smol_tiny):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    old = model.get_input_embeddings().weight.detach().clone()
    start, end = common.add_special_tokens(model, tok, ["<think>", "</think>"], init_from=None)
    E = model.get_input_embeddings().weight
    assert E.shape[0] == len(tok) and torch.equal(E[:old.shape[0]], old)
    dist = torch.cdist(E[[start, end]].detach(), old).min(1).values
    assert (dist > 1e-3).all()                                   # no existing row is copied ...
    h = torch.randn(64, E.shape[1])
    logits = h @ E.detach().T
    others = torch.cat([logits[:, :start], logits[:, end + 1:]], 1)
    assert ((others - logits[:, end:end + 1]).abs().min() > 0)   # ... so </think> ties no logit
    # a high learning rate step with everything but the new rows frozen moves exactly those rows
    opt = torch.optim.AdamW([E], lr=1e-1, weight_decay=0.0)
    ids = torch.tensor([common.encode_prompt(tok, "Is 2 > 1?", chat=True) + [start, end]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    common.mask_row_grads(model, [start, end])
    new_rows = E[[start, end]].detach().clone()
    opt.step()
    assert torch.equal(E[:old.shape[0]].detach(), old)
    assert (E[[start, end]].detach() != new_rows).all(1).all()
    assert (E.grad[[start, end]].abs().sum(1) > 0).all() and E.grad[:old.shape[0]].abs().sum() == 0


def test_bf16_compute_keeps_fp32_master_weights_that_move_at_lr_1e6():
    """10 AdamW steps at lr 1e-6 on bf16 weights change few of them; with fp32 master weights and
    bf16 compute (what --bf16 does) essentially all of them change."""
    def train(model, bf16):
        model = common.wrap_model(model, common.Dist(), bf16=bf16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        ids = torch.tensor([common.encode_prompt(toy.tokenizer(), "Tom has 3 boxes of 4 pens.")] * 4)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(10):
            logits, _ = common.lm_forward(model, ids)
            assert logits.dtype == torch.bfloat16 if bf16 else True
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        changed = sum((p.detach() != b).sum().item() for p, b in zip(model.parameters(), before))
        return changed / sum(b.numel() for b in before)
    m, _, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    pure_bf16 = train(m.to(torch.bfloat16), False)
    m, _, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    master = train(m, True)
    assert next(m.parameters()).dtype == torch.float32
    assert master > 0.99 and pure_bf16 < 0.5, (master, pure_bf16)


def test_prompts_carry_the_answer_format(smol_tiny):
    from types import SimpleNamespace
    _, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    args = SimpleNamespace(chat_template=True, system_prompt="auto")
    gsm = common.prompt_settings(args, None, [{"answer": "1,000"}, {"answer": "-3.5"}])
    math = common.prompt_settings(args, None, [{"answer": "3"}, {"answer": "\\frac{1}{2}"}])
    assert "####" in gsm["system_prompt"] and "\\boxed{}" in math["system_prompt"]
    text = common.format_prompt(tok, "What is 2+2?", True, gsm["system_prompt"])
    assert text.startswith("<|im_start|>system\n" + gsm["system_prompt"]) and text.endswith("<|im_start|>assistant\n")
    kept = common.prompt_settings(SimpleNamespace(chat_template=False, system_prompt="auto"),
                                  {"prompt_format": "chat", "system_prompt": "S"}, [])
    assert kept == {"prompt_format": "chat", "system_prompt": "S"}          # a later stage prompts as trained
    assert common.prompt_settings(SimpleNamespace(chat_template=False, system_prompt="auto"), None, []) == \
        {"prompt_format": "plain", "system_prompt": ""}
    with pytest.raises(SystemExit, match="needs --chat_template"):
        common.prompt_settings(SimpleNamespace(chat_template=False, system_prompt="Be brief."), None, [])


def test_a_single_file_holds_out_evaluation_rows(tmp_path):
    from types import SimpleNamespace
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(200)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = SimpleNamespace(dataset=str(path), eval_dataset="", max_train_samples=0, max_eval_samples=0, seed=0,
                           model_name_or_path="toy")
    train, test = common.load_train_eval(args)
    assert 5 < len(test) < 40 and len(train) + len(test) == 200
    assert not {ex["question"] for ex in train} & {ex["question"] for ex in test}
    assert common.load_train_eval(args)[1] == test                       # the same split every time


def test_the_toy_questions_do_not_depend_on_the_seed():
    """--seed seeds training, not the benchmark: every seed trains on the same pool and evaluates on
    the same test questions (the committed starts' split), so seeds can be compared."""
    from types import SimpleNamespace
    def split(seed, name="toy"):
        return common.load_train_eval(SimpleNamespace(dataset=name, eval_dataset="", max_train_samples=0,
                                                      max_eval_samples=0, seed=seed, model_name_or_path="toy"))
    for name in ("toy", "prosqa-toy"):
        (train0, test0), (train2, test2) = split(0, name), split(2, name)
        assert test2 == test0 == common.load_data(name, "test") and train2 == train0


def test_a_missing_default_checkpoint_falls_back_to_the_toy_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(toy, "COT", str(tmp_path / "checkpoints" / "toy-cot"))   # as in a folder without checkpoints/
    model, tok, cfg = common.load_model(toy.COT, torch.device("cpu"), torch.float32)
    assert cfg is None and len(tok) == len(toy.tokenizer()) and "untrained toy model" in capsys.readouterr().out
    # any other missing path stays an error
    with pytest.raises(SystemExit, match="neither a local folder nor a hub id"):
        common.load_model(str(tmp_path / "nothing"), torch.device("cpu"), torch.float32)


def test_finish_saves_plots_and_prints_before_after(tmp_path, capsys):
    from types import SimpleNamespace
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    args = SimpleNamespace(output_dir=str(tmp_path / "run"), save_dtype="auto")
    logger = common.Logger(args.output_dir, args)
    for step in range(3):
        logger.log({"loss": 1.0 / (step + 1)}, step, quiet=True)
    head = torch.nn.Linear(4, 1)
    common.write_completions(args.output_dir, 2, [{"question": "q", "completion": "c", "reward": 1.0}])
    common.finish(model, tok, {"mode": "cot"}, args, common.Dist(), {"pass@1": 0.5, "mean_L": 3.0},
                  {"pass@1": 0.25, "mean_L": 4.0}, ["loss"], extra_modules={"head": head}, note="extra 1")
    out = capsys.readouterr().out
    assert "pass@1 0.250 -> 0.500   #L 4.0 -> 3.0   extra 1   saved" in out
    run = tmp_path / "run"
    for f in ("model.safetensors", "latent_config.json", "head.safetensors", "curves.png", "metrics.jsonl",
              "completions.jsonl"):
        assert (run / f).is_file(), f
    assert json.loads((run / "completions.jsonl").read_text()) == {"step": 2, "question": "q", "completion": "c",
                                                                   "reward": 1.0}


def test_plots_are_optional(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real_import(name, *a, **k))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert common.plot_metrics(tmp_path, ["loss"]) is None and not (tmp_path / "curves.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_setup_distributed_seeds_like_before():
    import random
    import numpy as np
    common.setup_distributed(7)
    a = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)      # what each script did by hand before
    assert a == (random.random(), float(np.random.rand()), torch.rand(1).item())


def test_check_args_reads_the_fields_a_script_has():
    from types import SimpleNamespace as A
    ok = dict(num_generations=4, lora_r=0, lora_dropout=0.0, generation_batch_size=8, train_batch_size=16,
              mini_batch_size=8)
    common.check_args(A(**ok))
    common.check_args(A(train_batch_size=16, generation_batch_size=6))     # no groups: any size >= 0
    common.check_args(A())                                                 # eval-like Args: nothing to check
    for bad, words in [(dict(num_generations=1), "--num_generations must be at least 2"),
                       (dict(lora_r=-1), "--lora_r must be >= 0"),
                       (dict(lora_dropout=1.0), "--lora_dropout must be in [0, 1)"),
                       (dict(generation_batch_size=6), "multiple of --num_generations 4"),
                       (dict(generation_batch_size=-4), "multiple of --num_generations 4"),
                       (dict(mini_batch_size=6), "--train_batch_size 16 must be a multiple of --mini_batch_size 6"),
                       (dict(train_batch_size=0, mini_batch_size=None),
                        "must be a positive multiple of the 1 processes")]:
        with pytest.raises(SystemExit, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            common.check_args(A(**{**ok, **bad}))
    with pytest.raises(SystemExit, match="--generation_batch_size must be >= 0"):
        common.check_args(A(generation_batch_size=-1))
    two = common.Dist(rank=0, world=2)
    common.check_args(A(**ok), two)
    with pytest.raises(SystemExit, match="multiple of the 2 processes"):
        common.check_args(A(train_batch_size=15), two)
    with pytest.raises(SystemExit, match="itself a multiple of the 2 processes"):
        common.check_args(A(train_batch_size=15, mini_batch_size=5), two)
