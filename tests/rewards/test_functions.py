"""Reward functions: loading 'file.py:fn' and 'module:fn', and the checks on what they return."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from rufus.rewards import FunctionReward, RewardError, load_reward_function

REWARDS_PY = """
def count_yes(prompts, completions, **kwargs):
    return [c.count("yes") for c in completions]

def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

class Rules:
    @staticmethod
    def has_no(prompts, completions, **kwargs):
        return [float("no" in c) for c in completions]

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS_PY, encoding="utf-8")
    return path


def test_load_from_file_path(rewards_file):
    fn = load_reward_function(f"{rewards_file}:count_yes")
    assert fn(prompts=["p", "q"], completions=["yes yes", "no"]) == [2, 0]
    assert load_reward_function(f"{rewards_file}:Rules.has_no")(prompts=["p"], completions=["no"]) == [1.0]


def test_load_relative_path_and_unique_module_names(tmp_path, monkeypatch):
    # two files with the same name in different directories stay two modules
    for sub, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "rewards.py").write_text(
            f"def r(prompts, completions, **kw):\n    return [{value}] * len(completions)\n"
        )
    monkeypatch.chdir(tmp_path)
    fa, fb = load_reward_function("a/rewards.py:r"), load_reward_function("b/rewards.py:r")
    assert fa(prompts=["x"], completions=["y"]) == [1.0] and fb(prompts=["x"], completions=["y"]) == [2.0]
    assert fa.__module__ != fb.__module__ and fa.__module__ in sys.modules


def test_file_can_import_its_neighbour(tmp_path):
    (tmp_path / "helper_for_rufus_test.py").write_text("BONUS = 5.0\n")
    (tmp_path / "main.py").write_text(
        "from helper_for_rufus_test import BONUS\n\n"
        "def r(prompts, completions, **kw):\n    return [BONUS] * len(completions)\n"
    )
    assert load_reward_function(f"{tmp_path / 'main.py'}:r")(prompts=["x"], completions=["y"]) == [5.0]


def test_load_from_module_path(tmp_path, monkeypatch):
    assert load_reward_function("math:sqrt") is math.sqrt
    pkg = tmp_path / "rufus_test_reward_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rules.py").write_text("def ok(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)  # modules are found from the current directory
    monkeypatch.delitem(sys.modules, "rufus_test_reward_pkg", raising=False)
    fn = load_reward_function("rufus_test_reward_pkg.rules:ok")
    assert fn(prompts=["a"], completions=["b"]) == [1.0]


@pytest.mark.parametrize(
    "suffix, message",
    [
        (":missing", "the file has no function 'missing' (it defines: Rules, count_yes, length)"),
        (":NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
    ],
)
def test_load_errors_in_file(rewards_file, suffix, message):
    spec = f"{rewards_file}{suffix}"
    with pytest.raises(RewardError) as e:
        load_reward_function(spec)
    assert repr(spec) in str(e.value) and message in str(e.value)


def test_load_errors(tmp_path):
    with pytest.raises(RewardError, match=r"'nowhere/rewards.py:f'.*does not exist"):
        load_reward_function("nowhere/rewards.py:f")
    with pytest.raises(RewardError, match=r"'no_such_module_xyz:f'.*no module named 'no_such_module_xyz'"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(RewardError, match=r"'rewards.py'.*expected 'path/to/file.py:function'"):
        load_reward_function("rewards.py")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardError, match=r"broken.py:f'.*raised RuntimeError: boom") as e:
        load_reward_function(f"{broken}:f")
    assert isinstance(e.value.__cause__, RuntimeError)


def test_function_reward_calls_with_keywords_and_columns():
    seen = {}

    def fn(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, extra=kwargs)
        return [c == a for c, a in zip(completions, answer)]  # bools count as 0/1

    scores = FunctionReward(fn, "exact")(["p1", "p2"], ["4", "5"], answer=["4", "6"], other=[1, 2])
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 0.0]
    assert seen == {
        "prompts": ["p1", "p2"],
        "completions": ["4", "5"],
        "answer": ["4", "6"],
        "extra": {"other": [1, 2]},
    }


@pytest.mark.parametrize(
    "out", [np.array([1.0, 2.0]), torch.tensor([1.0, 2.0]), (1, 2.0), [np.float32(1), torch.tensor(2.0)]]
)
def test_function_reward_accepts_array_likes(out):
    assert FunctionReward(lambda **kw: out, "f")(["a", "b"], ["c", "d"]).tolist() == [1.0, 2.0]


def _raises(prompts, completions, **kw):
    raise KeyError("answer")


@pytest.mark.parametrize(
    "fn, message",
    [
        (_raises, r"reward function 'rewards.py:f' raised KeyError: 'answer'"),
        (lambda **kw: [1.0, 2.0, 3.0], r"reward function 'rewards.py:f' returned 3 scores for 4 completions"),
        (lambda **kw: [1.0, float("nan"), 0.0, 0.0], r"'rewards.py:f' returned nan at index 1; scores must be finite"),
        (lambda **kw: [1.0, 0.0, float("inf"), 0.0], r"'rewards.py:f' returned inf at index 2"),
        (lambda **kw: [1.0, 0.0, 0.0, "1.0"], r"'rewards.py:f' returned str \('1.0'\) at index 3; expected a number"),
        (lambda **kw: [None, 0.0, 0.0, 0.0], r"'rewards.py:f' returned None at index 0.*return 0.0 where"),
        (lambda **kw: 1.0, r"'rewards.py:f' returned float \(1.0\); expected a list of 4 numbers"),
        (lambda **kw: torch.zeros(4, 1), r"'rewards.py:f' returned a tensor of shape \(4, 1\); expected \(4,\)"),
    ],
    ids=["raises", "length", "nan", "inf", "string", "none", "scalar", "shape"],
)
def test_function_reward_errors_name_the_function(fn, message):
    with pytest.raises(RewardError, match=message) as e:
        FunctionReward(fn, "rewards.py:f")(["p"] * 4, ["c"] * 4)
    if fn is _raises:
        assert isinstance(e.value.__cause__, KeyError)


def test_function_reward_rejects_non_callable():
    with pytest.raises(RewardError, match="'f' is a int, not callable"):
        FunctionReward(3, "f")
