"""RewardPipeline: weighted sum, EOS penalty, running-std scaling and clipping, all checked by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rufus.config import ConfigError, RewardSection
from rufus.rewards import FunctionReward, RewardError, RewardPipeline, RunningMoments, build_reward_pipeline
from rufus.rewards.pipeline import _unique_names, model_names


def as_number(prompts, completions, **kw):
    """The completion text is the score: lets a test choose every score."""
    return [float(c) for c in completions]


def pipeline(**kw) -> RewardPipeline:
    return RewardPipeline([("number", as_number)], [1.0], **kw)


def test_weighted_sum_and_stats_by_hand():
    def f1(prompts, completions, **kw):
        return [1.0, 2.0, 3.0]

    def f2(prompts, completions, **kw):
        return [10.0, 0.0, -10.0]

    p = RewardPipeline([("f1", f1), ("f2", FunctionReward(f2, "f2"))], [0.5, 2.0])
    scores, stats = p(["p"] * 3, ["a", "b", "c"], has_eos=torch.tensor([True, True, True]))
    # 0.5*1 + 2*10 = 20.5; 0.5*2 + 0 = 1; 0.5*3 - 20 = -18.5
    assert scores.dtype == torch.float32 and scores.tolist() == [20.5, 1.0, -18.5]
    assert stats["score/f1"] == 2.0 and stats["score/f2"] == 0.0
    assert stats["score/raw"] == pytest.approx(1.0) and scores.mean().item() == pytest.approx(1.0)
    assert stats["response/no_eos"] == 0.0


def test_extra_columns_reach_every_function():
    def exact(prompts, completions, answer, **kw):
        return [float(c == a) for c, a in zip(completions, answer)]

    p = RewardPipeline([("exact", exact), ("number", as_number)], [1.0, 0.0])  # weight 0: logged only
    scores, stats = p(["q", "q"], ["4", "5"], answer=["4", "4"])
    assert scores.tolist() == [1.0, 0.0] and stats["score/number"] == 4.5


def test_missing_eos_penalty_is_a_fixed_score():
    p = pipeline(missing_eos_penalty=-1.0)
    scores, stats = p(["p"] * 4, ["3", "-5", "0.5", "7"], has_eos=torch.tensor([True, False, True, False]))
    assert scores.tolist() == [3.0, -1.0, 0.5, -1.0]  # replaced, not 3 - 1 or -5 - 1
    assert stats["response/no_eos"] == 0.5 and stats["score/raw"] == pytest.approx(1.375)
    with pytest.raises(ValueError, match="has_eos must be given"):
        p(["p"], ["1"])
    with pytest.raises(ValueError, match="has_eos has 2 entries for 1 completions"):
        p(["p"], ["1"], has_eos=torch.tensor([True, False]))
    # without a penalty, has_eos only feeds the statistic
    scores, stats = pipeline()(["p"] * 2, ["3", "4"], has_eos=[False, True])
    assert scores.tolist() == [3.0, 4.0] and stats["response/no_eos"] == 0.5


def test_running_std_scaling_over_two_batches_keeps_the_mean():
    p = pipeline(scale=True)
    s1, st1 = p(["p"] * 2, ["1", "3"])
    # seen {1, 3}: population std 1 -> unchanged
    assert s1.tolist() == [1.0, 3.0] and st1["score/running_std"] == pytest.approx(1.0)
    s2, st2 = p(["p"] * 3, ["5", "7", "9"])
    # seen {1, 3, 5, 7, 9}: mean 5, variance (16 + 4 + 0 + 4 + 16) / 5 = 8; divided, never shifted
    std = math.sqrt(8.0)
    assert st2["score/running_std"] == pytest.approx(std)
    assert torch.allclose(s2, torch.tensor([5.0, 7.0, 9.0]) / std)
    assert p.moments.count == 5 and p.moments.mean == pytest.approx(5.0)


def test_running_moments_match_one_pass_over_everything():
    torch.manual_seed(0)
    chunks = [torch.randn(n) * 3 + 2 for n in (1, 7, 2, 16)]
    m = RunningMoments()
    for c in chunks:
        m.update(c)
    everything = torch.cat(chunks).double()
    assert m.count == 26 and m.mean == pytest.approx(everything.mean().item())
    assert m.std == pytest.approx(everything.std(unbiased=False).item())


def test_constant_scores_pass_unscaled():
    scores, stats = pipeline(scale=True)(["p"] * 3, ["2", "2", "2"])
    assert scores.tolist() == [2.0, 2.0, 2.0] and stats["score/running_std"] == 0.0


def test_clip_after_scaling():
    p = pipeline(scale=True, clip=1.0)
    p(["p"] * 2, ["1", "3"])
    scores, stats = p(["p"] * 3, ["5", "7", "-9"])
    # seen {1, 3, 5, 7, -9}: mean 1.4, variance (0.16 + 2.56 + 12.96 + 31.36 + 108.16) / 5 = 31.04,
    # std 5.571; scaled [0.897, 1.256, -1.615], then clipped to [-1, 1]
    std = math.sqrt(31.04)
    assert stats["score/running_std"] == pytest.approx(std)
    assert torch.allclose(scores, torch.tensor([5 / std, 1.0, -1.0])) and stats["score/clipped"] == pytest.approx(2 / 3)
    # clip alone, no scaling
    scores, stats = pipeline(clip=1.5)(["p"] * 3, ["-4", "1", "2"])
    assert scores.tolist() == [-1.5, 1.0, 1.5] and stats["score/clipped"] == pytest.approx(2 / 3)


def test_penalty_then_scaling():
    p = pipeline(missing_eos_penalty=-1.0, scale=True)
    scores, stats = p(["p"] * 2, ["3", "100"], has_eos=torch.tensor([True, False]))
    # {3, -1}: std 2 -> the penalty is part of the statistics and is scaled too
    assert scores.tolist() == [1.5, -0.5] and stats["score/running_std"] == pytest.approx(2.0)


def test_state_dict_round_trip_resumes_identically():
    a = pipeline(scale=True)
    a(["p"] * 3, ["1", "4", "-2"])
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable, as checkpoints store it
    b = pipeline(scale=True)
    b.load_state_dict(state)
    sa, _ = a(["p"] * 2, ["6", "0.5"])
    sb, _ = b(["p"] * 2, ["6", "0.5"])
    assert torch.equal(sa, sb) and a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="expected keys count, mean, m2"):
        b.load_state_dict({"moments": {"count": 1}})


def test_gather_makes_every_process_scale_alike():
    # simulate two processes: this one sees [1, 3], the other [5, 7]
    p = RewardPipeline([("number", as_number)], [1.0], scale=True, gather=lambda t: torch.cat([t, t + 4]))
    scores, stats = p(["p"] * 2, ["1", "3"])
    std = torch.tensor([1.0, 3.0, 5.0, 7.0]).std(unbiased=False).item()
    assert stats["score/running_std"] == pytest.approx(std) and torch.allclose(scores, torch.tensor([1.0, 3.0]) / std)
    assert p.moments.count == 4


def test_source_errors_name_the_source():
    def bad(prompts, completions, **kw):
        return [1.0]

    p = RewardPipeline([("number", as_number), ("bad", bad)], [1.0, 1.0])
    with pytest.raises(RewardError, match="reward function 'bad' returned 1 scores for 2 completions"):
        p(["p"] * 2, ["1", "2"])
    with pytest.raises(RewardError, match="reward function 'number' raised TypeError"):
        pipeline()(["p"], [["not", "a", "number"]])


def test_constructor_checks():
    with pytest.raises(ValueError, match="2 weights for 1 reward sources"):
        RewardPipeline([("number", as_number)], [1.0, 2.0])
    with pytest.raises(ValueError, match="repeated: number"):
        RewardPipeline([("number", as_number), ("number", as_number)], [1.0, 1.0])
    with pytest.raises(ValueError, match="'score' clashes with a logged statistic"):
        RewardPipeline([("score", as_number)], [1.0])
    with pytest.raises(ValueError, match="clip must be positive"):
        pipeline(clip=0.0)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        pipeline()(["a", "b"], ["1"])


# --- build_reward_pipeline -----------------------------------------------------------------------


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text("def count_yes(prompts, completions, **kw):\n    return [c.count('yes') for c in completions]\n")
    return f"{path}:count_yes"


def test_build_from_functions_and_extra_functions(rules):
    def bonus(prompts, completions, **kw):
        return [0.5] * len(completions)

    p = build_reward_pipeline(
        RewardSection(function=[rules], weights=[1.0, 2.0], missing_eos_penalty=-1.0), extra_functions=[bonus]
    )
    assert [name for name, _ in p.sources] == [rules, "bonus"] and p.weights == [1.0, 2.0]
    scores, stats = p(["q"] * 3, ["yes yes", "no", "yes"], has_eos=torch.tensor([True, True, False]))
    assert scores.tolist() == [3.0, 1.0, -1.0]
    assert stats[f"score/{rules}"] == pytest.approx(1.0) and stats["score/bonus"] == 0.5
    # default weights: all 1
    assert build_reward_pipeline(RewardSection(), extra_functions=[bonus, as_number]).weights == [1.0, 1.0]


def test_build_weights_mismatch_names_the_key_and_the_sources(rules):
    def bonus(prompts, completions, **kw):
        return [0.0] * len(completions)

    with pytest.raises(ConfigError) as e:
        build_reward_pipeline(RewardSection(function=[rules], weights=[1.0]), extra_functions=[bonus])
    message = str(e.value)
    assert "reward.weights has 1 values but there are 2 reward sources" in message
    assert repr(rules) in message and "'bonus'" in message


def test_build_without_sources_is_an_error():
    with pytest.raises(ConfigError, match="set reward.model or reward.function, or pass reward_fn"):
        build_reward_pipeline(RewardSection())


def test_source_names():
    assert model_names(["runs/rm", "hub-org/other-rm/"]) == ["rm", "other-rm"]
    assert model_names(["runs/a/final", "runs/b/final"]) == ["a/final", "b/final"]
    assert _unique_names(["f", "f", "score"]) == ["f", "f_2", "score_2"]
