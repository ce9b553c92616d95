"""Reward sources: a Python function or a reward model, each scoring (prompt, completion) texts.

A source is called as ``source(prompts, completions, **kw)`` and returns a (B,) float32 tensor on
the CPU, one score per completion. Sources see text only, never the policy's token ids: a reward
model re-tokenises with its own tokenizer (`encode_for_reward`, the encoding it was trained on), so
a policy and a reward model with different vocabularies work together.

Reward functions follow TRL's convention (``GRPOTrainer(reward_funcs=...)``), so functions
written for TRL work unchanged: ``fn(prompts=[...], completions=[...], **columns) -> list[float]``,
called with keyword arguments, the extra dataset columns of each prompt passed as lists under
their column names. Declare ``**kwargs`` to accept columns you do not use.

One difference from TRL: a function may not return None for "this reward does not apply to this
sample". TRL turns None into NaN and drops it from a weighted nansum, which silently changes what
the total means from one sample to the next; here None is an error naming the function and the
index. Return 0.0 where a rule does not apply (or split the rule by task).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class RewardError(ValueError):
    """A reward source failed or returned something unusable; the message names the source.

    e.g. ``reward function 'rewards.py:count_yes' returned 3 scores for 4 completions``.
    """


# --- Python functions --------------------------------------------------------------------------


def load_reward_function(spec: str) -> Callable:
    """The callable named by `spec`: ``"path/to/file.py:fn"`` or ``"package.module:fn"``.

    A file is imported by path (relative paths from the current directory) as a module with a
    unique name, so two files called ``rewards.py`` do not clash; its directory is on ``sys.path``
    while it is imported, so it can import its neighbours. A module is imported with
    ``importlib``, the current directory on ``sys.path`` (the ``rufus`` script does not put it
    there). ``fn`` may be dotted (``module:Class.method``). Every error names the spec.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise RewardError(f"reward function {spec!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    target, _, attr = spec.rpartition(":")  # rpartition: a Windows drive letter keeps its colon
    if not target or not attr:
        raise RewardError(f"reward function {spec!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        module, where = _import_file(spec, Path(target)), "the file"
    else:
        module, where = _import_module(spec, target), f"module {target!r}"

    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
            )
            hint = f" (it defines: {', '.join(defined)})" if defined else ""
            raise RewardError(f"reward function {spec!r}: {where} has no function {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


@contextmanager
def _on_sys_path(directory: str):
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _import_file(spec: str, path: Path):
    path = path.expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: file {str(path)!r} does not exist")
    # Unique per absolute path: two rewards.py in different directories never share a module.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"rufus_reward_{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward function {spec!r}: cannot import {str(path)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # registered before exec, as `import` does (dataclasses, pickling need it)
    try:
        with _on_sys_path(str(path.parent)):
            module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise RewardError(f"reward function {spec!r}: importing {str(path)!r} raised {type(e).__name__}: {e}") from e
    return module


def _import_module(spec: str, target: str):
    try:
        with _on_sys_path(os.getcwd()):
            return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise RewardError(
                f"reward function {spec!r}: no module named {e.name!r} (from {os.getcwd()!r}; "
                "for a file, write 'path/to/file.py:function')"
            ) from e
        raise RewardError(f"reward function {spec!r}: importing {target!r} raised {type(e).__name__}: {e}") from e
    except Exception as e:
        raise RewardError(f"reward function {spec!r}: importing {target!r} raised {type(e).__name__}: {e}") from e


class FunctionReward:
    """A Python reward function as a reward source: checks its output, returns (B,) float32.

    ``fn(prompts=prompts, completions=completions, **kw)`` must return B real numbers (a list,
    tuple, numpy array or 1-D tensor; bools count as 0/1). An exception inside `fn`, a wrong
    length, a non-number, None (see the module docstring), NaN or inf raise `RewardError` naming
    `name` (and the index), with the original exception chained.
    """

    def __init__(self, fn: Callable, name: str):
        if not callable(fn):
            raise RewardError(f"reward function {name!r} is a {type(fn).__name__}, not callable")
        self.fn, self.name = fn, name

    def __repr__(self) -> str:
        return f"FunctionReward({self.name!r})"

    def __call__(self, prompts: Sequence, completions: Sequence, **kw) -> torch.Tensor:
        where = f"reward function {self.name!r}"
        try:
            out = self.fn(prompts=prompts, completions=completions, **kw)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"{where} raised {type(e).__name__}: {e}") from e
        return to_scores(out, len(completions), where)


def to_scores(out: Any, n: int, where: str) -> torch.Tensor:
    """`out` as a (n,) float32 CPU tensor of finite numbers, or a RewardError starting with `where`."""
    if isinstance(out, torch.Tensor):
        if out.dim() != 1:
            raise RewardError(f"{where} returned a tensor of shape {tuple(out.shape)}; expected ({n},)")
        out = out.detach().cpu().tolist()
    elif hasattr(out, "tolist") and hasattr(out, "shape"):  # numpy array
        if len(out.shape) != 1:
            raise RewardError(f"{where} returned an array of shape {tuple(out.shape)}; expected ({n},)")
        out = out.tolist()
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        raise RewardError(f"{where} returned {_describe(out)}; expected a list of {n} numbers, one per completion")
    if len(out) != n:
        raise RewardError(f"{where} returned {len(out)} scores for {n} completions")
    values = []
    for i, v in enumerate(out):
        if v is None:
            raise RewardError(
                f"{where} returned None at index {i}; Rufus needs a number for every completion "
                "(return 0.0 where the reward does not apply)"
            )
        if isinstance(v, torch.Tensor) and v.numel() == 1 or type(v).__module__ == "numpy":
            v = v.item()  # a 0-d tensor or a numpy scalar (np.bool_ is not a numbers.Real)
        if not isinstance(v, numbers.Real):
            raise RewardError(f"{where} returned {_describe(v)} at index {i}; expected a number")
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(f"{where} returned {v} at index {i}; scores must be finite")
        values.append(v)
    return torch.tensor(values, dtype=torch.float32)


def _describe(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return f"{type(value).__name__} ({text[: limit - 3] + '...' if len(text) > limit else text})"


# --- reward models -----------------------------------------------------------------------------


class ModelReward:
    """A trained reward model as a reward source: (B,) normalised scores of (prompt, completion) texts.

    Loads its own tokenizer and model (`models.reward.load_reward_model`), frozen: eval mode,
    ``requires_grad`` off, scored under ``no_grad``. Each pair is tokenised from text with
    `encode_for_reward` and this model's tokenizer, exactly as in reward-model training, and read
    at its last token (the eos). Sequences are sorted by length and scored `batch_size` at a time,
    so a batch pads to similar lengths; the scores come back in the caller's order. Scores are the
    normalised ones (`models.reward.score`: stored gain * raw + bias).

    `model` and `tokenizer` are attributes (a trainer checks the weights stay unchanged).
    """

    def __init__(
        self,
        path: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        trust_remote_code: bool = False,
    ):
        from rufus.models.loading import load_tokenizer
        from rufus.models.reward import load_reward_model

        if batch_size < 1:
            raise ValueError(f"reward.batch_size must be at least 1, got {batch_size}")
        self.path, self.batch_size, self.device = str(path), batch_size, torch.device(device)
        try:
            self.tokenizer = load_tokenizer(self.path, trust_remote_code=trust_remote_code)
            self.model = load_reward_model(
                self.path, tokenizer=self.tokenizer, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as e:  # a missing directory, no weights, an unknown architecture
            raise RewardError(f"reward model {self.path!r}: cannot load it: {e}") from e
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        architectures = getattr(self.model.config, "architectures", None) or []
        if architectures and all(a.endswith("ForCausalLM") for a in architectures):
            # load_reward_model gave it a fresh random head: almost certainly the wrong directory.
            warnings.warn(
                f"reward model {self.path!r} is a causal LM ({architectures[0]}) without a trained reward "
                "head; its scores come from a random head. Point reward.model at a `rufus rm` output.",
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return f"ModelReward({self.path!r})"

    @torch.no_grad()
    def __call__(self, prompts: Sequence, completions: Sequence, **kw) -> torch.Tensor:
        from rufus.data.reward import RewardCollator, encode_for_reward
        from rufus.models.reward import score

        if len(prompts) != len(completions):
            raise RewardError(f"reward model {self.path!r}: {len(prompts)} prompts but {len(completions)} completions")
        sequences = [encode_for_reward(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        collate = RewardCollator(self.tokenizer.pad_token_id, padding_side="right")
        scores = torch.empty(len(sequences), dtype=torch.float32)  # (B,) in the caller's order
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = collate([sequences[i] for i in rows])
            s = score(self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            scores[torch.tensor(rows)] = s.float().cpu()
        return scores
