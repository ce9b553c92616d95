"""The reward the RL trainers optimise: a weighted sum of sources, the EOS penalty, scaling, clipping.

For a batch of B (prompt, completion) texts, in this order:

1. each source i scores the batch: s_i (B,) (a reward model's normalised score, a Python function);
2. weighted sum: r = sum_i w_i * s_i. A weight of 0 keeps a source as a logged metric only;
3. EOS penalty: a completion that never produced EOS gets r = missing_eos_penalty, a fixed score
   (Huang et al. 2024, "The N+ implementation details of RLHF with PPO", detail 23.3: score -1 when
   there is no EOS; lm-human-preferences does the same). TRL's `missing_eos_penalty` subtracts
   instead; we replace because a subtraction still lets a truncated completion the reward model
   likes outscore a finished one, so the policy can keep learning to ramble, while a fixed score
   caps every unfinished completion below the finished ones (with the penalty set below them);
4. scaling (optional): r / sigma, sigma the running standard deviation of every r seen so far,
   this batch included (Chan et al. parallel update; population std, no Bessel correction, as
   lm-human-preferences). The mean is not subtracted: shifting it would move the zero point that
   the KL penalty is weighed against (Ziegler et al. 2019; N+ details, detail 24);
5. clipping (optional): r clamped to [-clip, clip].

`stats` holds per-source means ``score/{name}``, ``score/raw`` (the mean of step 2),
``response/no_eos`` (the fraction without EOS), plus ``score/running_std`` with scaling and
``score/clipped`` (the fraction clipped) with clipping. The final scores' mean and std over every
process are the trainers' ``score/mean`` and ``score/std`` (docs/metrics.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rufus.rewards.sources import FunctionReward, ModelReward, load_reward_function, to_scores

# names the trainers log under score/ themselves: no reward source may take them
RESERVED = ("raw", "running_std", "clipped", "mean", "std", "kept", "best", "chosen", "rejected", "score")


class RunningMoments:
    """Count, mean and sum of squared deviations of every value seen, merged batch by batch.

    Chan, Golub & LeVeque (1979) parallel update: merging a batch (n_b, mean_b, M2_b) into
    (n_a, mean_a, M2_a) gives n = n_a + n_b, mean = mean_a + d * n_b / n and
    M2 = M2_a + M2_b + d^2 * n_a * n_b / n, with d = mean_b - mean_a. Kept in float64.
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten().cpu()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    @property
    def std(self) -> float:
        """Population standard deviation (0.0 before any value)."""
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"count", "mean", "m2"}:
            raise ValueError(f"reward running statistics: expected keys count, mean, m2, got {state!r}")
        count, mean, m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
        if count < 0 or m2 < 0 or not (math.isfinite(mean) and math.isfinite(m2)):
            raise ValueError(f"reward running statistics: invalid values {state!r}")
        self.count, self.mean, self.m2 = count, mean, m2


class RewardPipeline:
    """Weighted reward sources, then the EOS penalty, running-std scaling and clipping (module docstring).

    `sources` are ``(name, source)`` pairs: a `ModelReward`, a `FunctionReward`, or any callable
    following the reward-function convention (wrapped in `FunctionReward`). `weights` has one
    float per source. `gather`, for multi-process runs, maps this process's (B,) scores to the
    scores of all processes (e.g. ``accelerator.gather``) so every process updates the running
    statistics with the same values and scales identically; without it each process keeps its own.
    Scaling ignores a running std below `eps` (all scores equal so far): scores pass unscaled.
    """

    def __init__(
        self,
        sources: Sequence[tuple[str, Callable]],
        weights: Sequence[float],
        *,
        missing_eos_penalty: float | None = None,
        scale: bool = False,
        clip: float | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        eps: float = 1e-8,
    ):
        if not sources:
            raise ValueError("RewardPipeline needs at least one reward source")
        names = [name for name, _ in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward source names must be unique; repeated: {', '.join(duplicates)}")
        reserved = [n for n in names if n in RESERVED]
        if reserved:
            raise ValueError(
                f"reward source name {reserved[0]!r} clashes with a logged statistic (reserved: {', '.join(RESERVED)})"
            )
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} reward sources ({', '.join(names)})")
        weights = [float(w) for w in weights]
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward weights must be finite, got {weights}")
        if missing_eos_penalty is not None and not math.isfinite(missing_eos_penalty):
            raise ValueError(f"reward.missing_eos_penalty must be finite, got {missing_eos_penalty}")
        if clip is not None and not clip > 0:
            raise ValueError(f"reward.clip must be positive, got {clip}")
        self.sources = [
            (name, src if isinstance(src, (FunctionReward, ModelReward)) else FunctionReward(src, name))
            for name, src in sources
        ]
        self.weights = weights
        self.missing_eos_penalty, self.scale, self.clip = missing_eos_penalty, scale, clip
        self.gather, self.eps = gather, eps
        self.moments = RunningMoments()

    def __repr__(self) -> str:
        parts = " + ".join(f"{w:g} * {name}" for (name, _), w in zip(self.sources, self.weights))
        return f"RewardPipeline({parts})"

    @property
    def models(self) -> list[ModelReward]:
        """The reward-model sources (a trainer checks their weights stay unchanged)."""
        return [src for _, src in self.sources if isinstance(src, ModelReward)]

    def __call__(
        self, prompts: Sequence, completions: Sequence, has_eos: torch.Tensor | None = None, **kw
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) float32 CPU scores and stats for B completions (module docstring for the steps).

        `has_eos` (B,) bool: whether each completion ended with EOS; required when
        `missing_eos_penalty` is set. `kw` (extra dataset columns, lists of length B) go to every
        source; reward functions receive them as keyword arguments.
        """
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"reward: {len(prompts)} prompts but {n} completions")
        if n == 0:
            raise ValueError("reward: no completions to score")
        if has_eos is not None:
            has_eos = torch.as_tensor(has_eos).detach().cpu().bool().reshape(-1)  # (B,)
            if has_eos.numel() != n:
                raise ValueError(f"reward: has_eos has {has_eos.numel()} entries for {n} completions")
        elif self.missing_eos_penalty is not None:
            raise ValueError("reward: missing_eos_penalty is set, so has_eos must be given")

        stats: dict[str, float] = {}
        raw = torch.zeros(n, dtype=torch.float32)  # (B,) r = sum_i w_i * s_i
        for (name, source), w in zip(self.sources, self.weights):
            s = to_scores(source(prompts, completions, **kw), n, f"reward source {name!r}")  # (B,) s_i
            stats[f"score/{name}"] = s.mean().item()
            raw += w * s
        stats["score/raw"] = raw.mean().item()

        scores = raw
        if has_eos is not None:
            stats["response/no_eos"] = (~has_eos).float().mean().item()
            if self.missing_eos_penalty is not None:
                scores = torch.where(has_eos, scores, torch.full_like(scores, self.missing_eos_penalty))
        if self.scale:
            self.moments.update(self.gather(scores) if self.gather is not None else scores)
            std = self.moments.std
            stats["score/running_std"] = std
            if std > self.eps:
                scores = scores / std
        if self.clip is not None:
            stats["score/clipped"] = (scores.abs() > self.clip).float().mean().item()
            scores = scores.clamp(-self.clip, self.clip)
        return scores, stats

    def state_dict(self) -> dict[str, Any]:
        """The running statistics (JSON-serialisable), for checkpoints."""
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "moments" not in state:
            raise ValueError(f"reward pipeline state: expected {{'moments': ...}}, got {state!r}")
        self.moments.load_state_dict(state["moments"])


def build_reward_pipeline(
    section,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    extra_functions: Callable | Sequence[Callable] | None = None,
    trust_remote_code: bool = False,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    load_model: Callable[[int, str], Callable] | None = None,
) -> RewardPipeline:
    """The pipeline a `RewardSection` section describes, plus `extra_functions` (e.g. ``reward_fn=``).
    `load_model(i, path)`, when given, makes the source of reward model i instead of loading it here
    (a reward model placed in another process).

    Sources in order: reward models (`section.model`, named by the last path component, or more
    components when two would share a name), functions (`section.function`, named by their spec),
    then `extra_functions` (named by ``__name__``). `section.weights` is empty (all 1) or has one
    weight per source. Configuration errors are raised before any model loads.
    """
    from rufus.config import ConfigError

    extra = [extra_functions] if callable(extra_functions) else list(extra_functions or [])
    n_sources = len(section.model) + len(section.function) + len(extra)
    if n_sources == 0:
        raise ConfigError("reward: no reward source; set reward.model or reward.function, or pass reward_fn")
    names = _unique_names(
        model_names(list(section.model))
        + list(section.function)
        + [getattr(fn, "__name__", None) or type(fn).__name__ for fn in extra]
    )
    weights = list(section.weights) or [1.0] * n_sources
    if len(weights) != n_sources:
        listed = ", ".join(repr(n) for n in names)
        raise ConfigError(
            f"reward.weights has {len(weights)} values but there are {n_sources} reward sources "
            f"(models first, then functions, then reward_fn): {listed}; give one weight per source, "
            "or leave reward.weights empty for all 1"
        )

    n_models = len(section.model)
    functions = [
        FunctionReward(load_reward_function(spec), name) for spec, name in zip(section.function, names[n_models:])
    ]
    functions += [FunctionReward(fn, name) for fn, name in zip(extra, names[n_models + len(section.function) :])]
    models = [
        load_model(i, path)
        if load_model is not None
        else ModelReward(
            path, device=device, dtype=dtype, batch_size=section.batch_size, trust_remote_code=trust_remote_code
        )
        for i, path in enumerate(section.model)
    ]
    return RewardPipeline(
        list(zip(names, models + functions)),
        weights,
        missing_eos_penalty=section.missing_eos_penalty,
        scale=section.scale,
        clip=section.clip,
        gather=gather,
    )


def model_names(paths: list[str]) -> list[str]:
    """The last path component of each, or the last k when that is what it takes to tell them apart
    (``rm_a/final``, ``rm_b/final``)."""
    parts = [[p for p in path.replace(os.sep, "/").split("/") if p] or [path] for path in paths]
    longest = max((len(p) for p in parts), default=1)
    for k in range(1, longest + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return ["/".join(p) for p in parts]


def _unique_names(names: list[str]) -> list[str]:
    """Append _2, _3 ... to repeats and to names that clash with logged statistics."""
    out: list[str] = []
    for name in names:
        candidate, k = name, 1
        while candidate in out or candidate in RESERVED:
            k += 1
            candidate = f"{name}_{k}"
        out.append(candidate)
    return out
