"""Text classification with feature-extraction heads on the served base model.

A head (trainer_service/recipe_classifier.py) is a linear layer over a pooled last hidden state
of the frozen base model body. The engine that serves generation does not hand out hidden states,
so `HeadClassifier` keeps its own copy of the body (HF transformers) on the serving device: on a
CPU in fp32, exactly as training ran it there; on a GPU in the engine's dtype (bfloat16 by
default, as a GPU training job extracts its features), where it takes weights-sized memory next
to vLLM's share (gpu_memory_utilization). The head itself is applied in fp32. Turning texts into features is tunewire/features.py, the code training used, so
a served result equals `tunewire.features.predict` for the same head and texts.

Heads are published to the adapter store like adapters (`<store>/<name>/v<N>/`, with a
manifest) but are not adapters: the engine never sees them. `resolve_head` finds one for a
request ('name' = its newest version) and verifies it (manifest checksums, kind "classifier",
base-model fingerprint); `HeadClassifier` reads it, checks it against the loaded body (hidden
size) and applies it.

    path, manifest = resolve_head(registry.checks, "region")       # blocking: checksums
    results = await HeadClassifier(base_model).classify(path, ["alice lives in paris"])

Cost model: the tokenizer and the body load once, on the first request, and stay; heads are small
(hidden x labels floats) and are cached by path. Requests run one at a time in a worker thread:
the body's forward pass already uses every core torch gives it, so two at once would only slow
both down, and the event loop stays free for generation meanwhile.

torch and transformers are imported only when the first request loads the body, and nothing
here imports grpc: the servicer maps the tunewire.errors raised here to statuses.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving_service.adapter_checks import AdapterChecks, check_base, latest_version, parse_ref
# features.load_feature_body calls loading.load_body as loading.X, so a test can count the loads
from tunewire import devices, features, loading
from tunewire import reasons as R
from tunewire.adapters import Manifest, base_model_fingerprint, read_manifest
from tunewire.errors import TunewireError, invalid

HEAD_CACHE_SIZE = 16  # heads kept loaded; a head is hidden x labels floats, a few KB to a few MB


def resolve_head(checks: AdapterChecks, ref: str) -> tuple[Path, Manifest]:
    """The head `ref` names in the store ('name' = its newest version), verified for this server."""
    name, version = parse_ref(ref, "head")
    path = checks.store_root / name / (version or latest_version(checks.store_root, name, "head"))
    if not path.is_dir():
        raise TunewireError(R.HEAD_NOT_FOUND, f"no head {ref!r} in the store", metadata={"head": ref})
    m = read_manifest(path)
    if m.kind != "classifier":
        raise TunewireError(R.ADAPTER_KIND_UNSUPPORTED, f"{ref} is a {m.kind}, not a classifier head")
    check_base(m, checks.base_fingerprint)
    return path, m


@dataclass(frozen=True)
class _Model:
    tokenizer: Any
    body: Any
    pad_id: int
    hidden_size: int
    fingerprint: str   # of the base model; a head must carry the same


class HeadClassifier:
    """Classifies texts with feature-extraction heads on the served base model (HF transformers)
    on `device` ("cpu" or "cuda", the engine's); the body is in `dtype` (a vLLM dtype name, the
    engine's) on a GPU and always in float32 on a CPU, so CPU results never change."""

    def __init__(self, base_model: str | Path, *, device: str = "cpu", dtype: str = "float32",
                 max_texts: int = 256, max_text_chars: int = 100_000):
        if max_texts < 1 or max_text_chars < 1:
            raise ValueError("max_texts and max_text_chars must be >= 1")
        if device not in ("cpu", "cuda") or dtype not in devices.DTYPE_NAMES.values():
            raise ValueError(f"device must be cpu or cuda and dtype one of "
                             f"{list(devices.DTYPE_NAMES.values())}, not {device!r}, {dtype!r}")
        self.base_model = Path(base_model)
        self.device = device
        self.dtype = dtype if device == "cuda" else "float32"
        self.max_texts = max_texts
        self.max_text_chars = max_text_chars
        self._model: _Model | None = None
        self._load_lock = asyncio.Lock()     # concurrent first requests load the body once
        # Requests queue on the asyncio lock, not in threads: a waiting request holds no thread
        # of the default executor, which everything else's to_thread shares.
        self._batch_lock = asyncio.Lock()
        # A request whose caller went away leaves its thread running to the end; this lock keeps
        # the next request's thread from running beside it. It also guards the head cache.
        self._thread_lock = threading.Lock()
        self._heads: OrderedDict[Path, features.Head] = OrderedDict()

    async def classify(self, head_dir: str | Path,
                       texts: Sequence[str]) -> list[tuple[str, list[tuple[str, float]]]]:
        """For each text: (best label, [(label, probability) for every label in the head's order])."""
        texts = self._check_texts(texts)  # before anything loads: a bad request costs nothing
        model = await self._loaded()
        path = Path(head_dir).resolve()
        async with self._batch_lock:
            return await asyncio.to_thread(self._classify, model, path, texts)

    # -- internals ----------------------------------------------------------------------------
    def _check_texts(self, texts: Sequence[str]) -> list[str]:
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise invalid("texts", "must be a list of strings")  # a str would be its characters
        if not texts:
            raise invalid("texts", "must not be empty")
        if len(texts) > self.max_texts:
            raise invalid("texts", f"{len(texts)} texts; at most {self.max_texts} per request")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise invalid(f"texts[{i}]", f"must be a string, got {type(text).__name__}")
            # Checked before tokenizing: tokenizing a huge text would already cost the time.
            if len(text) > self.max_text_chars:
                raise invalid(f"texts[{i}]", f"{len(text)} characters; at most "
                              f"{self.max_text_chars}")
        return list(texts)

    async def _loaded(self) -> _Model:
        if self._model is None:
            async with self._load_lock:
                if self._model is None:  # another request may have loaded it while we waited
                    # Loading takes seconds to minutes: off the event loop. A failure is not
                    # kept, so the next request tries again.
                    self._model = await asyncio.to_thread(self._load)
        return self._model

    def _load(self) -> _Model:
        import torch

        tokenizer = loading.load_tokenizer(self.base_model)
        body = features.load_feature_body(self.base_model, self.device,
                                          getattr(torch, self.dtype))
        return _Model(tokenizer=tokenizer, body=body, pad_id=features.pad_id(tokenizer),
                      hidden_size=int(body.config.hidden_size),
                      fingerprint=base_model_fingerprint(self.base_model))

    def _head(self, model: _Model, path: Path) -> features.Head:
        """The head at `path`, checked against the base model; call with _thread_lock held."""
        head = self._heads.get(path)
        if head is None:
            head = features.read_head(path, model.fingerprint, model.hidden_size)
            self._heads[path] = head
            if len(self._heads) > HEAD_CACHE_SIZE:
                self._heads.popitem(last=False)
        self._heads.move_to_end(path)
        return head

    def _classify(self, model: _Model, path: Path,
                  texts: list[str]) -> list[tuple[str, list[tuple[str, float]]]]:
        import torch

        with self._thread_lock, torch.inference_mode():
            head = self._head(model, path)
            ids, _ = features.encode(model.tokenizer, texts, head.max_seq_length,
                                     no_tokens=lambda i: invalid(
                                         f"texts[{i}]", "the tokenizer makes no tokens of it"))
            x = features.pooled_features(model.body, ids, model.pad_id, head.pooling)
            probs = head.probabilities(x)
            best = probs.argmax(-1).tolist()  # as predict() picks, ties included
        # Labels are str or int in a head (as in its training data); the API's are strings.
        labels = [label if isinstance(label, str) else json.dumps(label) for label in head.labels]
        return [(labels[b], list(zip(labels, p))) for b, p in zip(best, probs.tolist())]
