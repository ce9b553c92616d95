"""Quantized bases (bitsandbytes 4-bit nf4 and 8-bit) under LoRA, on CPU: the base computes as its
dequantized weights, gradients included; only adapters (and heads) train while the quantized weights stay
bit-identical; the adapter-disabled reference does not move; PPO raises a programmatic reward; final/ is the
adapters merged into the unquantized base and loads with from_pretrained; every trainer runs on a 4-bit base;
quantization without LoRA, or without bitsandbytes, is a one-line ConfigError."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rufus.config import ConfigError
from rufus.models.loading import load_causal_lm, load_tokenizer
from rufus.models.reward import load_reward_model
from rufus.report.metrics import read_metrics
from tests.helpers import (
    arithmetic_prompts,
    digit_fraction,
    make_tiny_model_dir,
    preference_rows,
    sft_rows,
    with_overrides,
    write_jsonl,
)

NEEDS_BNB = "the quantized-base tests need bitsandbytes: pip install -e .[quant]"
IDS = torch.tensor([[1, 5, 9, 30, 41, 2, 17, 60]])  # a fixed input for logits and logprobs


@pytest.fixture(scope="module")
def lively_model(tmp_path_factory):
    """A tiny Llama whose weights start at std 0.1, not 0.02: with 0.02 the frozen embeddings and final norm
    bound every logit to about +-0.2 whatever the adapters do, and LoRA PPO cannot move the reward at all
    (measured: score/mean flat at 0.04 over 20 steps); at 0.1 it rises as the PPO test below says."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("lively") / "model", initializer_range=0.1)


@pytest.fixture(scope="module")
def padless_model(tmp_path_factory):
    """A tiny Llama whose tokenizer has no pad token: the run adds one and grows the (unquantized) embeddings."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("padless") / "model", pad_token=None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "sft": write_jsonl(d / "sft.jsonl", sft_rows(8)),
        "prefs": write_jsonl(d / "prefs.jsonl", preference_rows(16, seed=1)),
        "prompts": write_jsonl(d / "prompts.jsonl", arithmetic_prompts()),
    }


def logprobs_of(model, ids=IDS) -> torch.Tensor:
    """(1, T-1) log p(x_t | x_<t) of the fixed input."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device)).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(logits.device))[..., 0].cpu()


def logits_of(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def peft_key(name: str) -> str:
    """A peft model's state-dict key -> the plain model's ("base_model.model.x.base_layer.weight" -> "x.weight")."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")


def assert_only_adapters_trained(trained, fresh, head: str | None = None, computed_in=torch.float32) -> None:
    """Every entry of the freshly loaded quantized model's state (the quantized bytes, their statistics and scales;
    the float embeddings and norms, as `computed_in` rounds them) is bit-identical in the trained peft model, and
    only the adapters (and `head`) train. Rows the run added to the embeddings (a new pad token) are not compared."""
    state = {peft_key(k): v for k, v in trained.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    float_params = {n for n, p in fresh.named_parameters(remove_duplicate=False) if p.is_floating_point()}
    compared = 0
    for key, value in fresh.state_dict().items():
        if head and key.startswith(head + "."):
            continue  # a new head starts random (or zero) in each load
        if key in float_params:  # bfloat16 compute casts them, and the final save puts them back in float32
            value = value.to(computed_in).float()
        got = state[key].cpu()
        got = got[: value.shape[0]] if got.dim() and got.shape != value.shape else got  # grown embeddings
        assert torch.equal(got, value.cpu()), key
        compared += 1
    quantized = [k for k in fresh.state_dict() if "absmax" in k or k.endswith(".SCB")]
    assert quantized and compared > len(quantized)
    for name, p in trained.named_parameters():
        assert p.requires_grad == ("lora_" in name or "modules_to_save" in name), name
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trained.named_parameters())  # B starts at zero


def merged_reference(trained, model_dir) -> torch.nn.Module:
    """What final/ should hold, built here through peft's own state-dict API: the unquantized float32 base
    (vocabulary grown as the run grew it) with the trained adapters merged in."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_old, n_new = base.get_input_embeddings().weight.shape[0], trained.get_input_embeddings().weight.shape[0]
    if n_new > n_old:
        base.resize_token_embeddings(n_new)
        with torch.no_grad():
            base.get_input_embeddings().weight[n_old:] = trained.get_input_embeddings().weight[n_old:].float().cpu()
    ref = get_peft_model(base, copy.deepcopy(trained.peft_config["default"]))
    set_peft_model_state_dict(ref, {k: v.float().cpu() for k, v in get_peft_model_state_dict(trained).items()})
    return ref.merge_and_unload()


def test_a_4bit_base_computes_as_its_dequantized_weights_gradients_included_after_an_eval_pass(tiny_model):
    """Guards prepare_quantized: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight at the first
    eval-mode, no-grad forward (a rollout) for a kernel without backward; without the guard the adapters' gradients
    here differ by about half their size (measured 0.012 of 0.022)."""
    bnb = pytest.importorskip("bitsandbytes", reason=NEEDS_BNB)
    from peft import LoraConfig, get_peft_model

    quantized = load_causal_lm(str(tiny_model), quantization="4bit", compute_dtype=torch.float32)
    device = quantized.device
    plain = load_causal_lm(str(tiny_model)).to(device)  # the same model with W = dequantize(W_q)
    state = plain.state_dict()
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name + ".weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    plain.load_state_dict(state)
    grads = []
    for model in (quantized, plain):
        torch.manual_seed(0)  # the same random (nonzero) adapters on both
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, lora)
        logprobs_of(model)  # an eval-mode, no-grad pass first, as a rollout does
        model.train()
        ids = IDS.to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


@pytest.mark.parametrize(
    "quantization, dtype, model",
    [("4bit", "float32", "tiny_model"), ("8bit", "float32", "padless_model"), ("4bit", "bfloat16", "tiny_model")],
)
def test_sft_trains_only_the_adapters_and_final_is_them_merged_into_the_unquantized_base(
    quantization, dtype, model, files, tmp_path, request
):
    pytest.importorskip("bitsandbytes", reason=NEEDS_BNB)
    from rufus.trainers.sft import train_sft

    model_dir = request.getfixturevalue(model)
    fresh = load_causal_lm(str(model_dir), quantization=quantization, compute_dtype=torch.float32)  # saved vocabulary
    before = logits_of(fresh)
    cfg = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(files["sft"]), "max_length": 48},
        "batch_size": 8,
        "lr": 1e-2,
        "max_steps": 6,
        "dtype": dtype,
        "progress": False,
        "quantization": quantization,
        "lora": {"r": 4, "alpha": 8},
    }
    result = train_sft(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
    trained = result.model
    computed_in = getattr(torch, dtype)
    assert_only_adapters_trained(trained, fresh, computed_in=computed_in)  # bfloat16: the quantized bytes never cast
    if dtype == "float32":
        with trained.disable_adapter():  # the reference: the quantized base itself (over the saved vocabulary)
            assert torch.equal(logits_of(trained)[..., : before.shape[-1]], before)

    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not getattr(final, "is_quantized", False) and not any("lora" in k for k in final.state_dict())
    assert all(p.dtype == torch.float32 for p in final.parameters())
    assert torch.allclose(logits_of(final), logits_of(merged_reference(trained, model_dir)), atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    if final.get_input_embeddings().weight.shape[0] > base.get_input_embeddings().weight.shape[0]:
        n = base.get_input_embeddings().weight.shape[0]  # the added pad row is the run's, the rest the checkpoint's
        assert torch.equal(final.get_input_embeddings().weight[:n], base.get_input_embeddings().weight)
        assert torch.equal(final.get_input_embeddings().weight[n:], trained.get_input_embeddings().weight[n:].cpu())
    else:
        assert not torch.allclose(logits_of(final), logits_of(base), atol=1e-4)  # the adapters are in it


def test_a_4bit_run_resumed_from_its_adapter_checkpoint_ends_as_the_uninterrupted_run(tiny_model, files, tmp_path):
    pytest.importorskip("bitsandbytes", reason=NEEDS_BNB)
    import shutil

    from safetensors.torch import load_file

    from rufus.trainers.sft import train_sft

    def cfg(out, **over):
        return {
            "model": str(tiny_model),
            "output_dir": str(out),
            "data": {"train": str(files["sft"]), "max_length": 48},
            "batch_size": 4,
            "lr": 1e-2,
            "max_steps": 6,
            "save_every": 3,
            "save_total_limit": 0,
            "dtype": "float32",
            "progress": False,
            "quantization": "4bit",
            "lora": {"r": 4, "alpha": 8},
            **over,
        }

    train_sft(cfg(tmp_path / "straight"))
    step3 = tmp_path / "straight" / "checkpoints" / "step-0000003"
    assert all("lora_" in k for k in load_file(step3 / "model.safetensors"))  # the adapters only
    shutil.copytree(step3, tmp_path / "cut" / "checkpoints" / step3.name)
    train_sft(cfg(tmp_path / "cut", resume=True))
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_ppo_on_a_quantized_base_raises_the_reward_with_a_fixed_reference(quantization, lively_model, files, tmp_path):
    pytest.importorskip("bitsandbytes", reason=NEEDS_BNB)
    from rufus.trainers.ppo import train_ppo

    tokenizer = load_tokenizer(str(lively_model))
    fresh_actor = load_causal_lm(
        str(lively_model), tokenizer=tokenizer, quantization=quantization, compute_dtype=torch.float32
    )
    fresh_critic = load_reward_model(
        str(lively_model), tokenizer=tokenizer, quantization=quantization, compute_dtype=torch.float32
    )
    before = logprobs_of(fresh_actor)
    # over seeds 0-3 the first 5 steps' mean score is 0.02-0.06 and the last 5 steps' 0.37-0.81 (4bit) and
    # 0.49-0.78 (8bit): the smallest rise is 0.31, twice the bound; about 7 s a run
    cfg = {
        "model": str(lively_model),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(files["prompts"]), "max_length": 40},
        "generation": {"max_new_tokens": 8},
        "batch_size": 16,
        "lr": 3e-2,
        "max_steps": 30,
        "dtype": "float32",
        "progress": False,
        "seed": 0,
        "kl": {"coef": 0.01},
        "critic": {"lr": 3e-2},
        "ppo": {"epochs": 4, "minibatches": 2},
        "sample_every": 0,
        "quantization": quantization,
        "lora": {"r": 4, "alpha": 8},
    }
    result = train_ppo(cfg, reward_fn=digit_fraction)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    scores = [r["score/mean"] for r in rows]
    start, end = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert end > start + 0.15, (start, end)
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: actor == reference
    assert all(r["policy/ratio_dev_first"] == 0.0 for r in rows)

    # actor and critic: adapters (and the critic's head) trained on untouched quantized bases
    assert result.reference is None
    assert_only_adapters_trained(result.policy, fresh_actor)
    assert_only_adapters_trained(result.critic.classifier, fresh_critic, head="score")
    with result.policy.disable_adapter():  # the reference after the run is the reference before it
        assert torch.equal(logprobs_of(result.policy), before)

    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert torch.allclose(logits_of(final), logits_of(merged_reference(result.policy, lively_model)), atol=1e-5)


@pytest.mark.parametrize("algo", ["rm", "dpo", "grpo", "rloo", "bon"])
def test_every_trainer_runs_on_a_4bit_base(algo, tiny_model, files, tmp_path):
    pytest.importorskip("bitsandbytes", reason=NEEDS_BNB)
    import rufus

    out = tmp_path / algo
    cfg = {
        "model": str(tiny_model),
        "output_dir": str(out),
        "batch_size": 4,
        "lr": 1e-2,
        "max_steps": 2,
        "dtype": "float32",
        "progress": False,
        "quantization": "4bit",
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(files["prefs"] if algo in ("rm", "dpo") else files["prompts"]), "max_length": 40},
        "generation": {"max_new_tokens": 6},
    }
    if algo == "rm":
        cfg.pop("generation")
        result = rufus.train_reward_model(cfg)
    elif algo == "dpo":
        result = rufus.train_dpo(cfg)
    elif algo == "grpo":
        result = rufus.train_grpo(with_overrides(cfg, {"grpo.group_size": 2}), reward_fn=digit_fraction)
    elif algo == "rloo":
        result = rufus.train_rloo(with_overrides(cfg, {"rloo.group_size": 2}), reward_fn=digit_fraction)
    else:
        over = {"max_steps": 1, "bon.group_size": 2, "bon.rounds": 2, "bon.prompts_per_round": 4}
        result = rufus.train_bon(with_overrides(cfg, over), reward_fn=digit_fraction)
    rows = read_metrics(out / "metrics.jsonl")
    assert rows and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    trained = result.model if algo == "rm" else result.policy
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trained.named_parameters())
    if algo == "rm":  # the head trained in full and merged; the normalisation is in the saved config
        final = load_reward_model(str(result.final_dir), tokenizer=load_tokenizer(str(result.final_dir)))
        head = dict(trained.named_parameters())["base_model.model.score.modules_to_save.default.weight"]
        assert torch.equal(final.score.weight, head.detach().cpu())
        assert final.config.reward_gain == trained.config.reward_gain != 1.0
        assert not getattr(final, "is_quantized", False)
    else:
        final = AutoModelForCausalLM.from_pretrained(result.final_dir)
        assert torch.allclose(logits_of(final), logits_of(merged_reference(trained, tiny_model)), atol=1e-5)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_without_lora_with_sharding_or_without_bitsandbytes_is_a_config_error(
    quantization, tiny_model, files, tmp_path, monkeypatch
):
    from rufus.trainers.sft import train_sft

    cfg = {
        "model": str(tiny_model),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(files["sft"]), "max_length": 48},
        "batch_size": 8,
        "max_steps": 1,
        "dtype": "float32",
        "progress": False,
        "quantization": quantization,
    }
    with pytest.raises(ConfigError) as e:
        train_sft(cfg)
    assert str(e.value) == (
        f"quantization={quantization} needs lora.r > 0: a quantized base cannot be trained, only adapters on it"
    )
    with pytest.raises(ConfigError, match=f"quantization={quantization} runs with strategy=ddp"):
        train_sft({**cfg, "lora": {"r": 4}, "strategy": "fsdp"})
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install -e \.\[quant\]"):
        train_sft({**cfg, "lora": {"r": 4}})
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before anything was written
