"""Measuring the peak tensor memory of a training step on ANY device, to check memory.estimate.

On a GPU torch.cuda.max_memory_allocated reads the peak directly; a CPU has no such counter, so
`measure_peak(fn)` counts it: a TorchDispatchMode sees every tensor an op creates (forward,
backward, optimizer, on the calling thread), keeps the byte size of each new storage while the
storage lives (a weakref callback drops it when freed) and records the maximum of the live sum.
Storages that existed before (weights, optimizer state) are the `baseline` the caller adds.

    peak = measure_peak(lambda: step(), baseline=[model, optimizer])

`step_peak(model_dir, ...)` runs the step the recipes run (peft LoRA or full fine-tuning, the base
at the job's precision with fp32 adapter / master weights, autocast, optional gradient
checkpointing, completion-only loss on every column, AdamW) and returns the peak of the second
step (the first creates AdamW's state). `python -m trainer_service.memory_measure --fit` measures
small random Llamas and prints the least-squares per-token activation constants that
memory.ACT_PER_TOKEN_LAYER holds; `--check` prints estimate vs measured.

Autograd on a CPU runs backward on the calling thread, so the mode sees it; on a GPU use CUDA's
own counter (backward runs on a device thread there).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveStorages(TorchDispatchMode):
    """Sums the bytes of the live storages created under it; `peak` is the maximum sum."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known = known           # data_ptr of storages that predate the measurement
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in self.known or ptr in self.live or st.nbytes() == 0:
                continue
            self.live[ptr] = st.nbytes()
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(st, self._free, ptr)
        return out


def live_tensor_bytes(*holders) -> tuple[int, set[int]]:
    """Bytes and data pointers of the distinct storages of modules' parameters / buffers /
    gradients and optimizers' state."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for h in holders:
        if isinstance(h, torch.nn.Module):
            for t in [*h.parameters(), *h.buffers()]:
                add(t)
                add(t.grad)
        elif isinstance(h, torch.optim.Optimizer):
            for state in h.state.values():
                for t in state.values():
                    add(t)
    return sum(seen.values()), set(seen)


def measure_peak(fn, *, baseline=()) -> int:
    """Peak bytes of live tensors while fn() runs: the baseline holders' storages (modules,
    optimizers) plus the peak of everything fn creates."""
    base, known = live_tensor_bytes(*baseline)
    mode = _LiveStorages(known)
    with mode:
        fn()
    return base + mode.peak


def step_peak(model_dir: str | Path, *, method: str = "lora", precision: str = "fp32",
              checkpointing: bool = False, micro_batch: int = 2, seq_len: int = 64,
              r: int = 8, targets: tuple[str, ...] = ("all-linear",), device: str = "cpu") -> int:
    """The measured peak of the second training step (see the module docstring), every token
    labelled (the estimate's worst case)."""
    from trainer_service import common
    from tunewire import devices, loading

    dev = torch.device(device)
    dtype = getattr(torch, devices.DTYPE_NAMES[precision])
    torch.manual_seed(0)
    if method == "full":  # fp32 master weights, autocast for the forward
        model = loading.load_causal_lm(model_dir, device=dev)
        params = list(model.parameters())
    else:
        from peft import LoraConfig, get_peft_model

        base = loading.load_causal_lm(model_dir, dtype=dtype, device=dev)
        names = "all-linear" if "all-linear" in targets else list(targets)  # peft wants the str
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=names))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # adapter weights (and so their optimizer state) in fp32
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (micro_batch, seq_len), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    autocast = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def step():
        with autocast:
            loss = common.completion_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if dev.type == "cuda":
        devices.reset_peak(dev)
        step()
        return devices.peak_memory_bytes(dev)
    return measure_peak(step, baseline=[model, optimizer])


# (hidden, layers, intermediate, heads, kv_heads, head_dim): --fit uses FIT_SHAPES, and the
# others (tests/test_memory.py) check the fitted constants on shapes they were not fitted on.
FIT_SHAPES = (
    (128, 2, 256, 4, 2, 32), (256, 2, 384, 4, 4, 64), (192, 3, 512, 6, 2, 32),
    (256, 2, 512, 8, 2, 64), (320, 2, 256, 10, 5, 32),
)
CHECK_SHAPES = ((256, 4, 704, 8, 2, 32), (384, 2, 1024, 6, 3, 64), (192, 2, 384, 3, 1, 128))
REGIMES = tuple((m, p, c) for m in ("lora", "full") for p in ("fp32", "bf16") for c in (False, True))
TOKENS = ((4, 128), (1, 512))  # (micro-batch, sequence length)


def write_model(d: Path, hidden, layers, inter, heads, kv, head_dim, vocab=1000) -> Path:
    """A random Llama of the given shape (no tokenizer: the step needs none)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, head_dim=head_dim,
                      num_key_value_heads=kv, max_position_embeddings=4096)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def spec_for(model_dir, method, precision, ckpt, micro_batch, seq_len):
    """The job spec whose estimate step_peak's run is compared with."""
    from trainer_service.spec import Hyperparameters, JobSpec, LoraSpec

    return JobSpec(base_model=str(model_dir), training_data="x", adapter_name="m", method=method,
                   lora=LoraSpec(r=8, target_modules=("all-linear",)),
                   hyperparameters=Hyperparameters(batch_size=micro_batch, max_seq_length=seq_len,
                                                   precision=precision,
                                                   gradient_checkpointing=ckpt))


def sweep(shapes, root: Path, regimes=REGIMES, tokens=TOKENS):
    """(shape, regime, micro-batch, seq, measured peak, CPU estimate) for every combination."""
    import json

    from trainer_service import memory

    rows = []
    for shape in shapes:
        d = root / "x".join(map(str, shape))
        if not (d / "config.json").is_file():
            write_model(d, *shape)
        cfg = json.loads((d / "config.json").read_text())
        for method, precision, ckpt in regimes:
            for mb, seq in tokens:
                peak = step_peak(d, method=method, precision=precision, checkpointing=ckpt,
                                 micro_batch=mb, seq_len=seq)
                est = memory.estimate(spec_for(d, method, precision, ckpt, mb, seq), config=cfg,
                                      device="cpu")
                rows.append((shape, (method, precision, ckpt), mb, seq, peak, est))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="fit ACT_PER_TOKEN_LAYER on FIT_SHAPES")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.fit:
            _fit(sweep(FIT_SHAPES, Path(tmp), [r for r in REGIMES if not r[2]]))
        for shape, regime, mb, seq, peak, est in sweep(FIT_SHAPES + CHECK_SHAPES, Path(tmp)):
            print(shape, *regime, mb, seq, "measured", peak, "estimate", est.total_bytes,
                  f"{est.total_bytes / peak - 1:+.1%}", flush=True)


def _fit(rows) -> None:
    """Least squares of the activation bytes per token and layer on (hidden, q_dim, kv_dim,
    intermediate), per (method, precision), from the runs without checkpointing whose peak is
    the backward's (not the optimizer step's)."""
    import numpy as np

    from trainer_service import memory

    for method in ("lora", "full"):
        for precision in ("fp32", "bf16"):
            X, y = [], []
            for shape, (m, p, _), mb, seq, peak, est in rows:
                if (m, p) != (method, precision):
                    continue
                s = memory.Shapes.from_config({"hidden_size": shape[0], "num_hidden_layers": shape[1],
                                               "intermediate_size": shape[2],
                                               "num_attention_heads": shape[3],
                                               "num_key_value_heads": shape[4],
                                               "head_dim": shape[5], "vocab_size": 1000})
                rest = est.weights_bytes + est.adapter_bytes + est.optimizer_bytes + est.logits_bytes
                rest += 0 if method == "full" else est.gradient_bytes
                step = est.weights_bytes + est.adapter_bytes + est.optimizer_bytes + est.gradient_bytes
                if peak < 1.05 * step:
                    continue  # the optimizer step's peak: says nothing about activations
                n = mb * seq * s.layers
                X.append([n * s.hidden, n * s.q_dim, n * s.kv_dim, n * s.intermediate])
                y.append(peak - rest)
            if len(X) < 4:
                print(method, precision, "too few runs with a backward peak:", len(X))
                continue
            coef = np.linalg.lstsq(np.array(X, float), np.array(y, float), rcond=None)[0]
            print(method, precision, "bytes per token per layer per (hidden, q_dim, kv_dim, inter):",
                  np.round(coef, 2), f"({len(X)} runs)", flush=True)


if __name__ == "__main__":
    main()
