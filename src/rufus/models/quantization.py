"""Quantized bases for LoRA runs (QLoRA): the frozen base in bitsandbytes 4-bit or 8-bit, adapters on top.

`quantization=4bit` loads every linear layer of the base as a bitsandbytes `Linear4bit`: NormalFloat4 with
double quantization, computing in the run's dtype (Dettmers et al. 2023, "QLoRA", arXiv 2305.14314, Sec. 3).
`quantization=8bit` loads them as `Linear8bitLt` (LLM.int8(), Dettmers et al. 2022, arXiv 2208.07339). Both go
through transformers' `quantization_config`; the embeddings, norms, the LM head and a reward or value head stay
float32. A quantized base cannot train, so only LoRA adapters (and a new scalar head) do; the RL trainers' frozen
reference is that same quantized base with its adapters disabled.

What Rufus does around it, and why:

- No `peft.prepare_model_for_kbit_training`. It freezes every parameter (`get_peft_model` does that), casts float16
  and bfloat16 parameters to float32 (a trainable model loads in float32 here, so there is nothing to cast), and
  turns gradient checkpointing on by default (here the `gradient_checkpointing` key decides, as for any model;
  `apply_lora` makes the checkpointed blocks' inputs require grad).
- Precision: the quantized weights are integer tensors (`Params4bit` uint8, `Int8Params` int8, their scales held
  beside them, not as parameters or buffers), so `rufus.precision.MasterWeights` neither casts nor masters them: a
  bfloat16 run turns the float parameters bfloat16 and gives the trainable ones (adapters, head) float32 masters.
- 4-bit on CPU: bitsandbytes (0.50) repacks a `Linear4bit` weight for its AVX512-BF16 inference kernel at the
  first forward in eval mode without gradients (a rollout, a reference pass), and from then on every forward of
  that layer, in training too, goes through that kernel, which has no backward: gradients stop at the base layer
  and the adapters below it train on wrong gradients. `prepare_quantized` turns that repacking off.
- 8-bit on CPU: bitsandbytes runs a `Linear8bitLt` in training mode as dequantize + float matmul, and in eval
  mode as an int8 matmul of int8-quantized activations. Rollout and reference passes run in eval mode, updates in
  training mode, so pi_old and the update's pi_theta would differ before any step (measured: the first PPO ratio
  off 1 by 0.01-0.04). `prepare_quantized` keeps every forward of those layers on the training path, which is
  also the fast one on CPU. (On CUDA both modes take the int8 path.) It logs "inputs will be cast ... to float16"
  at every forward of every layer; that is said once.
- `final/`: `merged_unquantized` loads the base again, unquantized in float32 (the dtype Rufus saves in), and
  merges the trained adapters (and head) into it: `W + (alpha / r) B A` with the checkpoint's own `W`. That is
  the model a LoRA run on an unquantized base would have written, a plain checkpoint that `from_pretrained`
  loads with no bitsandbytes, and it keeps the base at its full precision (merging into a 4-bit base would
  requantize the adapters away; merging into the dequantized `W_q` would save the quantization error in full
  precision). It is not bit for bit the model that trained, whose base was `W_q`: on the small playground base
  `final/` is about as far from the trained model as the quantized base is from the original (KL per token
  0.032 vs 0.030 at 4 bits; docs/quantization.md). `lora.merge=false` saves the adapters alone, which load
  onto the quantized base for exactly the trained model. Checkpoints hold the trainable parameters only
  (`checkpoint.trainable_state`), as for any LoRA run.
"""

from __future__ import annotations

import logging

import torch

QUANTIZATIONS = ("none", "8bit", "4bit")


def check_quantization(cfg) -> None:
    """ConfigError when `cfg.quantization` cannot run: no LoRA (`lora.r` 0), a sharding strategy, or no
    bitsandbytes installed."""
    from rufus.config import ConfigError

    quantization = getattr(cfg, "quantization", "none")
    if quantization == "none":
        return
    lora = getattr(cfg, "lora", None)
    if lora is None or lora.r <= 0:
        raise ConfigError(
            f"quantization={quantization} needs lora.r > 0: a quantized base cannot be trained, only adapters on it"
        )
    strategy = getattr(cfg, "strategy", "ddp")
    if strategy != "ddp":  # FSDP and ZeRO would shard or partition the quantized bytes apart from their statistics
        raise ConfigError(
            f"quantization={quantization} runs with strategy=ddp (a quantized copy per process), "
            f"not strategy={strategy}"
        )
    require_bitsandbytes(quantization)


def require_bitsandbytes(quantization: str) -> None:
    from rufus.config import ConfigError

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"quantization={quantization} needs bitsandbytes, which is not installed: pip install -e .[quant]"
        ) from None


def quantization_kwargs(quantization: str, compute_dtype: torch.dtype) -> dict:
    """The `from_pretrained` arguments that load a model's linear layers quantized (none: {}): the
    bitsandbytes config, and the whole model on this process's device (bitsandbytes quantizes as it
    loads, and accelerate trains a quantized model only on the device it was loaded on)."""
    if quantization == "none":
        return {}
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    require_bitsandbytes(quantization)
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": str(PartialState().device)}}


def prepare_quantized(model) -> None:
    """Fix-ups after loading a quantized model (module docstring): no CPU repacking of 4-bit weights,
    one arithmetic for 8-bit layers on CPU in training and eval mode, the 8-bit cast warning said once."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes Linear4bit
            module.support_avx512bf16_for_cpu = False
        if type(module).__name__ == "Linear8bitLt":
            module.register_forward_pre_hook(_training_path_on_cpu)
    _say_once("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")


def _training_path_on_cpu(module, args) -> None:
    """Before an 8-bit layer's forward on CPU: training mode, so that bitsandbytes takes its dequantize +
    float matmul path in eval passes too (the layer has no dropout or other mode-dependent part)."""
    if args and args[0].device.type == "cpu":
        module.training = True


def is_quantized(model) -> bool:
    """True when `model` (or the model a peft wrapper holds) was loaded quantized by bitsandbytes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


@torch.no_grad()
def merged_unquantized(model, dtype: torch.dtype = torch.float32):
    """A LoRA model on a quantized base -> a plain model: the base loaded again from its checkpoint,
    unquantized in `dtype`, with the trained adapters (and trained heads) merged into it (module docstring).

    The config is the trained model's (vocabulary, pad id, reward normalisation) less its quantization;
    embedding rows the run added (a new pad token) are copied from the trained model, as the checkpoint
    has no values for them.
    """
    import copy

    from peft import get_peft_model

    base = model.get_base_model()
    kwargs = {"num_labels": base.config.num_labels} if type(base).__name__.endswith("ForSequenceClassification") else {}
    fresh = type(base).from_pretrained(base.name_or_path, dtype=dtype, **kwargs)
    n_old = fresh.get_input_embeddings().weight.shape[0]
    n_new = base.get_input_embeddings().weight.shape[0]
    if n_new > n_old:
        fresh.resize_token_embeddings(n_new)
        pairs = [(fresh.get_input_embeddings(), base.get_input_embeddings())]
        if fresh.get_output_embeddings() is not None and not _tied(fresh):
            pairs.append((fresh.get_output_embeddings(), base.get_output_embeddings()))
        for new, trained in pairs:
            new.weight[n_old:] = trained.weight[n_old:].to(new.weight.device, dtype)
    skip = {"quantization_config", "_pre_quantization_dtype", "dtype", "torch_dtype"}
    for key, value in vars(base.config).items():
        if key not in skip and not key.startswith("_"):
            setattr(fresh.config, key, copy.deepcopy(value))
    fresh.config.dtype = dtype
    (adapter,) = model.peft_config  # one adapter, "default"
    merged = get_peft_model(fresh, copy.deepcopy(model.peft_config[adapter]), adapter_name=adapter)
    params = dict(merged.named_parameters())
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = [name for name in trained if name not in params]
    if missing:
        raise ValueError(f"cannot merge into the unquantized base: it has no {missing[:3]}")
    for name, p in trained.items():
        params[name].copy_(p.to(dtype))
    return merged.merge_and_unload()


def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is inp.weight


class _Once(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _say_once(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _Once) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_Once(prefix))
