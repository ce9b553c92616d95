"""Reward models: a scalar head on a causal-LM backbone, scoring the last real token.

Loaded with `AutoModelForSequenceClassification(num_labels=1)`, so any backbone transformers
knows works, and a saved reward model loads back the same way. The score of a sequence is the
head's output at its last non-pad token; with a pad token of its own (see `load_tokenizer`) and
position ids counted from the first real token, left- and right-padded batches score the same.

After training, a gain and bias are stored in the model's config (`reward_gain`, `reward_bias`)
so that `normalized = gain * raw + bias` has mean 0 and std 1 on a reference set. Every Rufus
reader (`score`) applies them; the raw head output stays what a Bradley-Terry probability
sigmoid(r_a - r_b) is calibrated on.
"""

from __future__ import annotations

import math

import torch

from rufus.models.loading import match_vocabulary, resolve_model_path


def load_reward_model(
    name: str,
    *,
    tokenizer,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    compute_dtype: torch.dtype | None = None,
    compile: bool = False,
    quantization: str = "none",
):
    """Load a reward model; a new head (from a plain causal LM) is initialised N(0, 1/(d_model + 1)).

    `compute_dtype`, `compile` and `quantization` as in `models.loading.load_causal_lm` (the head is
    never quantized).
    """
    from transformers import AutoModelForSequenceClassification

    from rufus.models.loading import compile_blocks, default_attention
    from rufus.models.quantization import prepare_quantized, quantization_kwargs

    kwargs = dict(num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
    attn_implementation = default_attention(attn_implementation, compute_dtype or dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(quantization_kwargs(quantization, compute_dtype or dtype))
    model, info = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name), **kwargs)
    if quantization != "none":
        prepare_quantized(model)
    match_vocabulary(model, tokenizer)
    new_head = {k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])}
    if new_head:
        # A small head keeps initial scores near 0 with unit-scale variance from the backbone's
        # normalised features (std 1/sqrt(d_model + 1), Stiennon et al. 2020 / Ziegler et al. 2019).
        d_model = model.config.get_text_config().hidden_size
        for module_name in new_head:
            module = model.get_submodule(module_name)
            with torch.no_grad():
                torch.nn.init.normal_(module.weight, std=1.0 / math.sqrt(d_model + 1))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.config.use_cache = False
    if compile:
        compile_blocks(model)
    return model


def head_module_names(model) -> list[str]:
    """Names of the scalar head's modules (trained in full under LoRA)."""
    names = [n for n in ("score", "classifier", "v_head") if hasattr(model, n)]
    if not names:
        raise ValueError(f"cannot find the reward head of {type(model).__name__} (looked for score, classifier)")
    return names


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted from each row's first real token (0 on padding), for left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def raw_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) head outputs at each row's last real token; gradients flow (training uses this)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.logits[:, 0].float()


def normalization(model) -> tuple[float, float]:
    config = getattr(model, "config", None)
    return float(getattr(config, "reward_gain", 1.0)), float(getattr(config, "reward_bias", 0.0))


def set_normalization(model, gain: float, bias: float) -> None:
    """Store `normalized = gain * raw + bias` in the model config (saved with the model)."""
    model.config.reward_gain = float(gain)
    model.config.reward_bias = float(bias)


@torch.no_grad()
def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, normalized: bool = True) -> torch.Tensor:
    """(B,) scores; normalised with the stored gain and bias unless `normalized=False`."""
    raw = raw_scores(model, input_ids, attention_mask)
    if not normalized:
        return raw
    gain, bias = normalization(model)
    return gain * raw + bias
