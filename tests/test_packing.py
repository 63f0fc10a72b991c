"""Sequence packing: the packed rows, no attention across examples, and the recipe with packing."""

from __future__ import annotations

import random

import pytest
import torch

from test_recipe import ListReporter, person_rows, spec_for, write_jsonl
from trainer_service import common, packing
from trainer_service.data_batches import collate
from trainer_service.data_tokens import IGNORE
from trainer_service.recipe_lora import run
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(120)


def random_rows(n: int, seed: int = 0, vocab: int = 300) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(2, 20)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


def test_pack_keeps_every_token_once_in_order_with_restarted_positions():
    rows = random_rows(60)
    packed = packing.pack(rows, max_seq_length=32)
    assert len(packed) < len(rows)
    seen = []
    for p in packed:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) <= 32
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [len(p["input_ids"])]):
            assert p["position_ids"][a:b] == list(range(b - a))
            assert p["labels"][a] == IGNORE  # the previous example never predicts it
            seen.append((p["input_ids"][a:b], p["labels"][a + 1:b]))
    # Every example exactly once; within a packed row the original order is kept.
    expected = sorted((r["input_ids"], r["labels"][1:]) for r in rows)
    assert sorted(seen) == expected
    index = {tuple(r["input_ids"]): i for i, r in enumerate(rows)}
    for p in packed:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["input_ids"])]
        order = [index[tuple(p["input_ids"][a:b])] for a, b in zip(starts, starts[1:])]
        assert order == sorted(order)
    with pytest.raises(ValueError):
        packing.pack([{"input_ids": [1] * 40, "labels": [1] * 40}], max_seq_length=32)


def test_collate_packed_pads_as_its_own_segment():
    rows = packing.pack(random_rows(8, seed=1), max_seq_length=64)
    batch = packing.collate_packed(rows, pad_id=0)
    assert batch["attention_mask"] is None
    assert batch["num_tokens"] == sum(len(r["input_ids"]) for r in rows)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        width = batch["input_ids"].shape[1]
        assert batch["position_ids"][i, n:].tolist() == list(range(width - n))
        assert (batch["labels"][i, n:] == IGNORE).all()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model


def test_packed_examples_do_not_see_each_other(tiny):
    rows = random_rows(9, seed=2)
    packed = packing.pack(rows, max_seq_length=48)
    assert any(sum(p == 0 for p in r["position_ids"]) > 1 for r in packed)  # really packed
    with torch.no_grad():
        batch = packing.collate_packed(packed, pad_id=0)
        loss_packed = packing.packed_loss(tiny, batch, reduction="sum")
        labels_packed = int((batch["labels"][:, 1:] != IGNORE).sum())
        plain = collate(rows, pad_id=0)
        loss_plain = common.completion_loss(tiny, plain, reduction="sum")
        labels_plain = int((plain["labels"][:, 1:] != IGNORE).sum())
        assert labels_packed == labels_plain
        assert (loss_packed / labels_packed).item() == pytest.approx(
            (loss_plain / labels_plain).item(), abs=1e-5)

        # Per example: the logits inside a packed row equal those of the example alone.
        logits = tiny(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=None, use_cache=False).logits
        alone = {tuple(r["input_ids"]): tiny(input_ids=torch.tensor([r["input_ids"]]),
                                             use_cache=False).logits[0] for r in rows}
        for i, p in enumerate(packed):
            starts = [j for j, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                expected = alone[tuple(p["input_ids"][a:b])]
                torch.testing.assert_close(logits[i, a:b], expected, atol=1e-4, rtol=1e-4)

        # Without position_ids the examples do see each other: the check above is not vacuous.
        mixed = tiny(input_ids=batch["input_ids"], use_cache=False).logits
        assert not torch.allclose(mixed, logits, atol=1e-3)


def test_recipe_with_packing_trains_on_fewer_steps_per_epoch(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", person_rows() * 4)
    runs = {}
    for pack in (False, True):
        rep = ListReporter()
        events = []
        rep.event = lambda kind, message, data, metrics=None, events=events: events.append((kind, data))
        spec = spec_for(tiny_model_dir, path, max_steps=0, num_epochs=8, max_seq_length=128,
                        packing=pack)
        result = run(spec, tmp_path / f"out-{pack}", rep, should_stop=lambda: False)
        runs[pack] = rep, dict(events)["DATASET_LOADED"], result
    (plain, plain_data, _), (rep, loaded, result) = runs[False], runs[True]
    assert "packed_rows" not in plain_data
    assert int(loaded["packed_rows"]) < int(loaded["examples"]) == 16
    steps = len(rep.metrics)
    assert steps < len(plain.metrics) and steps == rep.started_args[2] == result["steps"]
    first, last = rep.metrics[0]["loss"], rep.metrics[-1]["loss"]
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "out-True" / "adapter" / "adapter_model.safetensors").is_file()


def test_packing_is_refused_with_several_processes(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", person_rows())
    spec = spec_for(tiny_model_dir, path, packing=True, num_processes=2)
    with pytest.raises(TunewireError) as e:
        run(spec, tmp_path / "out", ListReporter(), should_stop=lambda: False)
    assert e.value.reason == "PACKING_UNSUPPORTED" and e.value.job_error()["user_error"]


def _full_head_loss(model, batch, reduction):
    """The reference: logits at every position, then the labelled ones (the loss before the
    labelled-columns head)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_head_on_labelled_columns_only_gives_the_full_loss_and_gradients(tiny_model_dir, reduction):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows = [{"input_ids": r["input_ids"] * 2, "labels": [IGNORE] * len(r["input_ids"]) + r["input_ids"]}
            for r in random_rows(6, seed=5)]  # prompts of 2-20 tokens, then as many labelled
    batch = collate(rows, pad_id=0)
    targets = batch["labels"][:, 1:] != IGNORE
    assert not targets.any(0).all()  # some prompt columns carry no label in any row: they are skipped

    grads = []
    for fn in (common.completion_loss, lambda m, b, r: _full_head_loss(m, b, r)):
        model.zero_grad()
        loss = fn(model, batch, reduction)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (fast, g_fast), (full, g_full) = grads
    assert fast == pytest.approx(full, rel=1e-5)
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
