"""Loading and saving models and tokenizers in Hugging Face format.

Any checkpoint that `AutoModelForCausalLM.from_pretrained` loads works as input (local path or hub
id), plus `builtin:<name>` for the tiny models Rufus builds itself (see `models/tiny.py`). Remote
model code runs only when `trust_remote_code` is set; weights load through safetensors where the
checkpoint has them.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"


def resolve_model_path(name: str) -> str:
    """`builtin:tiny-llama` (random weights) -> its cached directory, built on first use;
    `builtin:playground-base` (pretrained on the playground corpus) -> its cached directory, which
    must have been built already (by `rufus demo`, the pipeline, any `rufus` command naming it, or
    `rufus.playground.base.base_model_path()`); anything else unchanged."""
    if name.startswith("builtin:"):
        from rufus.models.tiny import PLAYGROUND_BASE, builtin_model_path, playground_base_dir

        if name == PLAYGROUND_BASE:  # built by the playground (an upper layer), found here
            path = playground_base_dir()
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"{name} is not built yet (it would be in {path}): any `rufus` command that names it builds it "
                    f"first (e.g. `rufus demo`, or `rufus sft model={name} ...`), and so does "
                    "`python -c 'from rufus.playground.base import base_model_path; base_model_path()'` "
                    "(about 2-3 minutes on a laptop CPU, once)"
                )
            return str(path)
        return str(builtin_model_path(name.removeprefix("builtin:")))
    return name


def amx_available() -> bool:
    """True when this CPU has AMX bf16 tiles (bf16 matrix products then run several times faster)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def resolve_dtype(dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype for `dtype` in {float32, bfloat16, auto} on `device`."""
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype != "auto":
        raise ValueError(f"dtype: {dtype!r} is not one of float32, bfloat16, auto")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        if amx_available():
            return torch.bfloat16
        _notice_once("dtype=auto: this CPU has no AMX bfloat16 units, so the run computes in float32")
        return torch.float32
    return torch.float32


_NOTICES: set[str] = set()


def _notice_once(message: str) -> None:
    """Log `message` once per process (a run resolves its dtype in several places)."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        log.warning(message)


def load_tokenizer(name: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """Load a tokenizer and give it a pad token of its own when it has none (or pad is EOS).

    The pad token is a new special token, not EOS: if pad were EOS, masking padding would also
    mask the real EOS labels and the model would never learn to stop, and a reward model that
    finds a sequence's last token by the pad id would skip a final EOS. A model trained with this
    tokenizer must have its embeddings resized (`load_causal_lm` does it).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        log.info("tokenizer %s has no pad token; added %s (id %d)", name, PAD_TOKEN, tokenizer.pad_token_id)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.padding_side = "right"
    return tokenizer


def default_attention(attn_implementation: str | None, compute_dtype: torch.dtype) -> str | None:
    """The attention kernel to ask transformers for: the user's choice, else eager attention for
    bfloat16 on CPU, else transformers' own default (SDPA).

    SDPA's bfloat16 CPU kernels are slow at training shapes: on the small benchmark model (hidden
    512, 8 layers, 16 x 64 tokens) a forward + backward takes 0.51 s with SDPA and 0.39 s with
    eager attention; in float32 the two are even (1.09 vs 1.14 s), and so is decoding.
    """
    if attn_implementation:
        return attn_implementation
    if compute_dtype == torch.bfloat16 and not torch.cuda.is_available():
        return "eager"
    return None


def compile_blocks(model) -> int:
    """`torch.compile` every transformer block of `model` (regional compilation); returns how many.

    The blocks are the classes a Hugging Face model lists in `_no_split_modules` (LlamaDecoderLayer,
    ...), found through any wrapper (LoRA, value model). All blocks share one compiled graph per
    shape family, so compiling takes seconds, not minutes, and fuses the element-wise work (norms,
    rotary embeddings, activations, residual adds) around the matrix products. Compilation happens
    at a block's first call; a second input shape compiles once more with dynamic sizes.
    Generation then decodes through a static KV cache with a compiled single-token step
    (`rollout.generate.sample_static`), since compiled blocks under a growing cache would recompile
    at every new length.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        import torch._dynamo

        # grad and no-grad passes of the policy, critic, reference and reward model, each static
        # then dynamic, are separate entries of the one shared block graph
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.compile()
        block._rufus_compiled = True  # rollout.generate then decodes through a static cache
    return len(blocks)


def load_causal_lm(
    name: str,
    *,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    compute_dtype: torch.dtype | None = None,
    compile: bool = False,
    quantization: str = "none",
):
    """Load a causal LM with weights in `dtype`, its vocabulary matched to `tokenizer`.

    `compute_dtype` (default `dtype`) is the dtype it will compute in (a trainable model loads in
    float32 and turns bfloat16 with float32 masters later); it picks the attention kernel.
    `compile` compiles its transformer blocks (`compile_blocks`). `quantization` (none, 8bit, 4bit)
    loads the linear layers quantized by bitsandbytes, on this process's device, for LoRA on top
    (`models.quantization`).
    """
    from transformers import AutoModelForCausalLM

    from rufus.models.quantization import prepare_quantized, quantization_kwargs

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    attn_implementation = default_attention(attn_implementation, compute_dtype or dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(quantization_kwargs(quantization, compute_dtype or dtype))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **kwargs)
    if quantization != "none":
        prepare_quantized(model)
    if tokenizer is not None:
        match_vocabulary(model, tokenizer)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if compile:
        compile_blocks(model)
    return model


def match_vocabulary(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer gained tokens (a new pad token); record the pad id."""
    n = len(tokenizer)
    if model.get_input_embeddings().weight.shape[0] < n:
        model.resize_token_embeddings(n)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def apply_lora(model, lora, *, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """Wrap `model` with LoRA adapters per the `lora` config section.

    Only the adapters train, plus `modules_to_save` in full (e.g. a reward model's new head).
    """
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    target_modules = "all-linear" if targets in (["all-linear"], "all-linear") else list(targets)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # older transformers
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return get_peft_model(model, config)


def set_dropout(model, p: float = 0.0) -> None:
    """Set every dropout probability in `model` to `p` (RL needs it off so logprobs are reproducible)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def save_model(model, tokenizer, path: str | os.PathLike, *, merge_lora: bool = True) -> Path:
    """Save `model` + `tokenizer` to `path` in Hugging Face format, atomically (temp dir + rename).

    A LoRA model is saved merged (a plain model that `AutoModelForCausalLM.from_pretrained` loads)
    when `merge_lora`, else as an adapter directory. The live model is left unmerged. On a quantized
    base the adapters are merged into the base loaded again unquantized, in float32
    (`models.quantization.merged_unquantized`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if merge_lora and hasattr(model, "peft_config"):
        import copy

        from rufus.models.quantization import is_quantized, merged_unquantized

        to_save = merged_unquantized(model) if is_quantized(model) else copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path
