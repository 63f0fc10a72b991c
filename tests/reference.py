"""Independent references for end-to-end tests: what HF transformers + peft produce for the same
model and adapter (greedy generation), and random peft adapters to load into serving.

    from reference import hf_greedy, random_adapter, visible_text
"""

from __future__ import annotations

from pathlib import Path


def hf_greedy(model_dir, adapter_dir, prompts, max_new_tokens=16) -> list[str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return [visible_text(o) for o in outs]


def visible_text(s: str) -> str:
    # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence (HF decodes
    # it as U+FFFD); the tokens are the same, so compare the text without that tail.
    return s.rstrip("\ufffd")


def random_adapter(model_dir, out: Path, r: int, targets: list[str], seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(out)
    return out
