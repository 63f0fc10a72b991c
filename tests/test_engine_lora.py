"""End-to-end checks of serving_service.engine on a real vLLM CPU engine with four LoRA adapters.

One engine is started for the module (~30-90 s) in a dedicated event-loop thread: AsyncLLM's
output handler is bound to the loop it was created in, so every coroutine goes through `run`.

The mixed-batch test is the regression test for the CPU LoRA bug fixed by serving_service.cpu_lora
(base rows batched with LoRA rows got the last slot's adapter delta) and the check of its grouped
ops on real layers: four adapters of ranks 8/16/4/12 (q/v, every projection, `all-linear`, a
mixed subset) plus base rows in one batch. It fails when the engine is started with
TUNEWIRE_DISABLE_CPU_LORA_FIX=1. max_loras=4 so the adapters fill every slot and the "last slot"
is always a real adapter.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

# 600 s: the first test of each engine fixture pays for starting it (~30-90 s, longer when
# another engine or the C++ kernel build shares the 2 cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["alice is 20 years old", '{"name": "bob", "age":', "Extract the person as JSON:\n"]
MAX_NEW = 16
ADAPTERS = ("A", "B", "C", "D")


@pytest.fixture(scope="module")
def vllm_model_dir(tiny_model_dir):
    return tiny_model_dir


def _make_adapter(base_dir, out_dir, r, targets, seed):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def adapters(vllm_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "A": _make_adapter(vllm_model_dir, root / "A", 8, ["q_proj", "v_proj"], seed=1),
        "B": _make_adapter(vllm_model_dir, root / "B", 16, ["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"],
                           seed=2),
        "C": _make_adapter(vllm_model_dir, root / "C", 4, "all-linear", seed=3),
        "D": _make_adapter(vllm_model_dir, root / "D", 12, ["k_proj", "o_proj", "up_proj",
                                                            "down_proj"], seed=4),
    }


@pytest.fixture(scope="module")
def hf_reference(vllm_model_dir, adapters):
    """Greedy HF transformers (+ peft) completions: {(variant, prompt): token ids}."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    out = {}
    for variant in ("base", *ADAPTERS):
        model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, torch_dtype=torch.float32)
        if variant != "base":
            model = PeftModel.from_pretrained(model, adapters[variant])
        model.eval()
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            out[variant, prompt] = gen[0, ids.shape[1]:].tolist()
    return out


@pytest.fixture(scope="module")
def served(vllm_model_dir, adapters):
    """(engine, run, lora tuples): one VllmEngine on a loop thread; `run(coro)` runs on it."""
    yield from _serve(vllm_model_dir, adapters, enforce_eager=True)


@pytest.fixture(scope="module")
def served_compiled(vllm_model_dir, adapters):
    """The same with torch.compile kept on under LoRA (cpu_lora_compile, the default when not
    enforce_eager): VllmEngine.start sets TUNEWIRE_CPU_LORA_COMPILE for the engine-core process
    and registers the plugin in this process too; afterwards both are undone."""
    import os

    from serving_service import cpu_lora

    try:
        yield from _serve(vllm_model_dir, adapters, enforce_eager=False, cpu_lora_compile=True)
    finally:
        os.environ.pop("TUNEWIRE_CPU_LORA_COMPILE", None)
        cpu_lora.unregister()


@pytest.fixture(scope="module")
def served_qv(vllm_model_dir, adapters):
    """An engine that wraps only q/k/v for LoRA (lora_target_modules), serving the q/v adapter."""
    yield from _serve(vllm_model_dir, {"A": adapters["A"]}, enforce_eager=True,
                      lora_target_modules=("q_proj", "v_proj"))


def _serve(vllm_model_dir, adapters, enforce_eager: bool, **engine_cfg):
    from serving_service.engine import EngineConfig, VllmEngine

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout=300):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    engine = VllmEngine(EngineConfig(model=str(vllm_model_dir), max_model_len=256, max_loras=4,
                                     max_lora_rank=16, max_cpu_loras=6, max_num_seqs=16,
                                     enforce_eager=enforce_eager, **engine_cfg))
    run(engine.start(), timeout=600)
    loras = {v: (f"adapter-{v.lower()}", i, adapters[v]) for i, v in enumerate(ADAPTERS, 1) if v in adapters}
    for lora in loras.values():
        run(engine.add_lora(*lora))
    try:
        yield engine, run, loras
    finally:
        async def stop():
            engine.shutdown()
            # AsyncLLM cancels its background tasks: let them finish before the loop closes
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:
                await asyncio.wait(others, timeout=10)

        run(stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _collect(engine, request_id, prompt, params, lora):
    deltas = [d async for d in engine.generate(request_id, prompt, params, lora)]
    ids = [t for d in deltas for t in d.token_ids]
    return ids, "".join(d.text for d in deltas), deltas


def test_mixed_batch_matches_hf(served, hf_reference):
    _check_mixed_batch(served, hf_reference)


def test_compiled_mixed_batch_matches_hf(served_compiled, hf_reference):
    """torch.compile on, LoRA through tunewire's custom ops: the same tokens as HF+peft."""
    from vllm.config.compilation import CompilationMode

    engine = served_compiled[0]
    assert engine._engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    _check_mixed_batch(served_compiled, hf_reference)


def test_only_deployed_targets_wrapped_matches_hf(served_qv, hf_reference):
    """lora_target_modules=(q_proj, v_proj): vLLM wraps only the packed qkv layers for LoRA; the
    q/v adapter mixed with base rows still equals HF+peft token for token."""
    _check_mixed_batch(served_qv, hf_reference, variants=("A",))


def _check_mixed_batch(served, hf_reference, variants=ADAPTERS):
    from serving_service.engine import GenParams

    engine, run, loras = served
    jobs = [(v, p) for p in PROMPTS for v in ("base", *variants)]  # interleaved rows, one batch

    async def all_at_once():
        return await asyncio.gather(*[
            _collect(engine, f"mix-{i}", p, GenParams(max_tokens=MAX_NEW),
                     None if v == "base" else loras[v]) for i, (v, p) in enumerate(jobs)])

    results = run(all_at_once())
    for prompt in PROMPTS:  # the adapters really change the output, so the test is not vacuous
        for v in variants:
            assert hf_reference[v, prompt] != hf_reference["base", prompt], v
    mismatches = [(v, p, ids, hf_reference[v, p])
                  for (v, p), (ids, _, _) in zip(jobs, results) if ids != hf_reference[v, p]]
    assert not mismatches, "vLLM vs HF greedy token ids differ:\n" + "\n".join(map(str, mismatches))
    for (_, p), (ids, _, deltas) in zip(jobs, results):
        last = deltas[-1]
        assert last.finish_reason in ("stop", "length")
        assert last.completion_tokens == len(ids)
        assert last.queue_ms is not None and last.queue_ms >= 0
        assert all(d.finish_reason is None for d in deltas[:-1])


def test_unregistered_lora_is_refused_and_engine_survives(served, hf_reference, tmp_path):
    from serving_service.engine import EngineError, GenParams

    engine, run, loras = served
    for bad in [("ghost", 99, str(tmp_path / "nope")),          # never registered
                ("adapter-a", 1, str(tmp_path / "nope"))]:      # registered id, other path
        with pytest.raises(EngineError):
            run(_collect(engine, "bad", PROMPTS[0], GenParams(max_tokens=4), bad))
    with pytest.raises(EngineError):
        run(engine.add_lora("broken", 7, str(tmp_path / "nope")))
    assert engine.ready
    ids, _, _ = run(_collect(engine, "after-bad", PROMPTS[0], GenParams(max_tokens=MAX_NEW),
                             loras["A"]))
    assert ids == hf_reference["A", PROMPTS[0]]


def test_json_schema_output_validates(served):
    import jsonschema

    from serving_service.engine import GenParams

    engine, run, loras = served
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"enum": ["paris", "oslo", "lima"]},
        },
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    }

    async def both():
        return await asyncio.gather(*[
            _collect(engine, f"json-{i}", PROMPTS[2], GenParams(max_tokens=96, json_schema=schema),
                     lora) for i, lora in enumerate([None, loras["A"], loras["B"]])])

    for _, text, deltas in run(both()):
        assert deltas[-1].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_early_stop_aborts_request(served):
    from serving_service.engine import GenParams

    engine, run, _ = served

    async def take_one():
        gen = engine.generate("cancel-me", PROMPTS[0], GenParams(max_tokens=200), None)
        first = await gen.__anext__()
        await gen.aclose()
        for _ in range(50):
            if engine._engine.get_num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.1)
        return first, engine._engine.get_num_unfinished_requests()

    first, unfinished = run(take_one())
    assert first.finish_reason is None and unfinished == 0


def test_abort_ends_stream_with_abort(served):
    from serving_service.engine import GenParams

    engine, run, _ = served

    async def abort_midway():
        deltas = []
        async for d in engine.generate("abort-me", PROMPTS[1], GenParams(max_tokens=200), None):
            deltas.append(d)
            if len(deltas) == 1:
                await engine.abort("abort-me")
        return deltas

    deltas = run(abort_midway())
    assert deltas[-1].finish_reason == "abort" and len(deltas) < 200

def test_vllm_metrics_in_default_registry(served):
    import prometheus_client

    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert any(n.startswith("vllm:") for n in names)


def test_patched_ops_leave_no_adapter_rows_alone():
    """Op level: after register() (twice), rows with index -1 get exactly nothing."""
    import torch
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from serving_service import cpu_lora

    cpu_lora.register()
    cpu_lora.register()
    try:
        for name in cpu_lora.PATCHED:
            fn = getattr(ops, name)
            assert getattr(punica_cpu, name) is fn and not hasattr(fn.__wrapped__, "__wrapped__")
        torch.manual_seed(0)
        x, idx = torch.randn(4, 8), torch.tensor([0, -1, 1, -1])
        a, b = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 8, 3)
        buf, y, y2 = torch.zeros(4, 3), torch.ones(4, 8), torch.ones(4, 16)
        punica_cpu.bgmv_shrink(x, a, buf, idx, 0.5)
        punica_cpu.bgmv_expand(buf, b, y, idx, True)
        punica_cpu.bgmv_expand_slice(buf, b, y2, idx, 8, 8, True)
    finally:
        cpu_lora.unregister()  # vLLM's own ops again for whatever runs next in this process
    for row in (1, 3):
        assert torch.equal(y[row], torch.ones(8)) and torch.equal(y2[row], torch.ones(16))
    want = 1 + 0.5 * (b[idx[0], 0] @ (a[idx[0], 0] @ x[0]))
    assert torch.allclose(y[0], want) and torch.allclose(y2[0, 8:], want)
