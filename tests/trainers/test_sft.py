"""SFT trainer: learns, masks prompts, saves loadable models, LoRA, resume, refusal to clobber."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rufus.config import ConfigError
from rufus.data.errors import DataError
from rufus.report.metrics import read_metrics
from rufus.trainers.sft import train_sft
from tests.helpers import sft_rows, write_jsonl


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", sft_rows(8))


def base_config(tiny_model, train_file, out, **over):
    cfg = {
        "model": str(tiny_model),
        "output_dir": str(out),
        "data": {"train": str(train_file), "max_length": 48},
        "batch_size": 8,
        "lr": 3e-3,
        "max_steps": 20,
        "dtype": "float32",
        "progress": False,
        "seed": 1,
    }
    for k, v in over.items():
        if "." in k:
            section, key = k.split(".", 1)
            cfg.setdefault(section, {})[key] = v
        else:
            cfg[k] = v
    return cfg


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_memorises_eight_examples_and_final_reloads(tiny_model, train_file, tmp_path):
    result = train_sft(
        base_config(
            tiny_model, train_file, tmp_path / "run", max_steps=100, log_every=10, **{"data.eval": str(train_file)}
        )
    )
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] <= 0.5 * losses[0], losses
    for key in ("step", "loss", "lr", "time/step_s"):
        assert key in rows[0], key
    assert "eval/loss" in rows[-1] and "eval/ppl" in rows[-1]
    assert rows[-1]["eval/ppl"] == pytest.approx(torch.tensor(rows[-1]["eval/loss"]).exp().item(), rel=1e-6)
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "plots" / "training.png").exists()

    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    ids = torch.tensor([[1, 5, 9, 30, 41, 2]])
    assert torch.allclose(logits_of(reloaded, ids), logits_of(result.model, ids), atol=1e-6)


def test_bfloat16_trains_through_float32_masters_and_saves_them(tiny_model, train_file, tmp_path):
    """dtype=bfloat16: bfloat16 weights compute, float32 masters update (rufus.precision); the loss
    tracks the float32 run's, and final/ holds the float32 masters, not the rounded weights."""
    result = train_sft(
        base_config(tiny_model, train_file, tmp_path / "bf16", dtype="bfloat16", max_steps=30, log_every=5)
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "bf16" / "metrics.jsonl")]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    train_sft(base_config(tiny_model, train_file, tmp_path / "fp32", dtype="float32", max_steps=30, log_every=5))
    reference = [r["loss"] for r in read_metrics(tmp_path / "fp32" / "metrics.jsonl")]
    for a, b in zip(reference, losses):
        assert b == pytest.approx(a, rel=0.05, abs=0.05)
    saved = load_file(result.final_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in saved.values())  # low bits kept


def test_lora_changes_only_adapters_and_merged_model_reloads(tiny_model, train_file, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    result = train_sft(
        base_config(
            tiny_model, train_file, tmp_path / "lora", max_steps=15, **{"lora.r": 4, "lora.alpha": 8, "lr": 1e-2}
        )
    )
    peft_model = result.model
    changed_adapters = 0
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            changed_adapters += "lora_B" in name and p.abs().sum().item() > 0  # B starts at zero
        else:
            assert not p.requires_grad
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), before[base_name]), name
    assert changed_adapters > 0
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in n for n in reloaded.state_dict())
    ids = torch.tensor([[1, 5, 9, 30, 41, 2]])
    assert torch.allclose(logits_of(reloaded, ids), logits_of(peft_model, ids), atol=1e-5)
    assert not torch.allclose(
        logits_of(reloaded, ids), logits_of(AutoModelForCausalLM.from_pretrained(tiny_model), ids)
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the masters are in the checkpoint
def test_resume_reproduces_the_uninterrupted_run(tiny_model, train_file, tmp_path, dtype):
    common = dict(
        max_steps=20,
        save_every=10,
        save_total_limit=0,
        batch_size=4,
        grad_accum=2,
        lr=1e-3,
        warmup_steps=3,
        scheduler="cosine",
        dtype=dtype,
    )
    straight = train_sft(base_config(tiny_model, train_file, tmp_path / "straight", **common))
    # an interrupted run: only its step-10 checkpoint and what it logged up to then survive
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-0000010", cut / "checkpoints" / "step-0000010")
    rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # incl. rows past 10
    resumed = train_sft(base_config(tiny_model, train_file, cut, resume=True, **common))

    a = load_file(straight.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7, rtol=0), k

    def untimed(rs):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rs]

    # one uninterrupted history (the interrupted run's rows past step 10 replaced, none repeated)
    assert untimed(read_metrics(cut / "metrics.jsonl")) == untimed(rows)
    assert not any(p.name.startswith(".tmp") for p in (cut / "checkpoints").iterdir())


def test_refuses_to_clobber_an_earlier_run(tiny_model, train_file, tmp_path):
    train_sft(base_config(tiny_model, train_file, tmp_path / "run", max_steps=2))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="resume=true"):
        train_sft(base_config(tiny_model, train_file, tmp_path / "run", max_steps=2))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    train_sft(base_config(tiny_model, train_file, tmp_path / "run", max_steps=3, overwrite=True))
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 3


def test_bad_data_fails_before_anything_is_written(tiny_model, train_file, tmp_path):
    train_sft(base_config(tiny_model, train_file, tmp_path / "run", max_steps=2, save_every=1))
    snapshot = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    bad = write_jsonl(tmp_path / "bad.jsonl", sft_rows(3) + [{"prompt": "hi", "completion": ""}])
    with pytest.raises(DataError, match=r"bad.jsonl, line 4.*'completion'"):
        train_sft(base_config(tiny_model, bad, tmp_path / "run", max_steps=2, resume=True))
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == snapshot


def test_batch_size_must_split_evenly(tiny_model, train_file, tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        train_sft(base_config(tiny_model, train_file, tmp_path / "run", batch_size=6, grad_accum=4))


def test_grad_accum_does_not_change_the_updates(tiny_model, tmp_path):
    # rows of different lengths, so per-micro-batch averaging would differ from the global average
    rows = [{"prompt": "what is one ?", "completion": " one" + " plus one" * (i % 4) + " ."} for i in range(8)]
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)
    a = train_sft(base_config(tiny_model, data, tmp_path / "a", max_steps=4, grad_accum=1))
    b = train_sft(base_config(tiny_model, data, tmp_path / "b", max_steps=4, grad_accum=4))
    la = [r["loss"] for r in a.metrics]
    lb = [r["loss"] for r in b.metrics]
    assert lb == pytest.approx(la, abs=1e-5)
    wa, wb = load_file(a.final_dir / "model.safetensors"), load_file(b.final_dir / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_chat_messages_train_on_assistant_turns(tiny_model, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"what is {i} ?"}, {"role": "assistant", "content": f"{i} is {i} ."}]}
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = train_sft(base_config(tiny_model, data, tmp_path / "chat", max_steps=40, log_every=5))
    losses = [r["loss"] for r in result.metrics]
    assert losses[-1] < 0.5 * losses[0]
