"""ModelReward: scores equal a direct reward-model computation, whatever the batching, from text only."""

from __future__ import annotations

import pytest
import torch

from rufus.config import RewardSection
from rufus.data.reward import RewardCollator, encode_for_reward
from rufus.models.loading import load_tokenizer, save_model
from rufus.models.reward import load_reward_model, raw_scores, score, set_normalization
from rufus.rewards import ModelReward, RewardError, build_reward_pipeline
from tests.helpers import make_tiny_model_dir

PROMPTS = ["what is one ?", "hello", "what is two plus three ?", "the cat", "yes or no ?"]
COMPLETIONS = [" yes", " the cat sat on a mat and the dog ran to sea .", " no", " sat on a mat", " yes yes no ."]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model):
    """An (untrained) reward model saved as `rufus rm` saves one, with a gain and bias stored."""
    root = tmp_path_factory.mktemp("rm")
    tok = load_tokenizer(str(tiny_model))
    model = load_reward_model(str(tiny_model), tokenizer=tok)
    set_normalization(model, gain=2.0, bias=0.5)
    return save_model(model, tok, root / "reward")


@pytest.fixture(scope="module")
def reward(rm_dir):
    return ModelReward(str(rm_dir), batch_size=2)


def direct_scores(rm_dir, prompts, completions, padding_side="right"):
    tok = load_tokenizer(str(rm_dir))
    model = load_reward_model(str(rm_dir), tokenizer=tok).eval()
    batch = RewardCollator(tok.pad_token_id, padding_side=padding_side)(
        [encode_for_reward(tok, p, c) for p, c in zip(prompts, completions)]
    )
    normalised = score(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        raw = raw_scores(model, batch["input_ids"], batch["attention_mask"])
    return normalised, raw


def test_scores_match_a_direct_computation(rm_dir, reward):
    expected, raw = direct_scores(rm_dir, PROMPTS, COMPLETIONS)
    left, _ = direct_scores(rm_dir, PROMPTS, COMPLETIONS, padding_side="left")
    got = reward(PROMPTS, COMPLETIONS)
    assert got.shape == (5,) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(got, left, atol=1e-5)
    assert torch.allclose(got, 2.0 * raw + 0.5, atol=1e-5)  # the stored normalisation is applied
    assert got.unique().numel() == 5


def test_batching_and_order_do_not_change_scores(rm_dir, reward):
    one = ModelReward(str(rm_dir), batch_size=1)(PROMPTS, COMPLETIONS)
    many = ModelReward(str(rm_dir), batch_size=16)(PROMPTS, COMPLETIONS)
    assert torch.allclose(one, many, atol=1e-5) and torch.allclose(one, reward(PROMPTS, COMPLETIONS), atol=1e-5)
    order = [3, 0, 4, 2, 1]
    shuffled = reward([PROMPTS[i] for i in order], [COMPLETIONS[i] for i in order])
    assert torch.allclose(shuffled, one[order], atol=1e-5)


def test_model_is_frozen_and_unchanged(reward):
    before = {k: v.clone() for k, v in reward.model.state_dict().items()}
    scores = reward(PROMPTS, COMPLETIONS)
    assert not scores.requires_grad and not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in reward.model.state_dict().items())


def test_conversation_prompts(rm_dir, reward):
    prompts = [[{"role": "user", "content": "what is one ?"}], [{"role": "user", "content": "hello"}]]
    completions = [" yes", [{"role": "assistant", "content": " no ."}]]
    expected, _ = direct_scores(rm_dir, prompts, completions)
    assert torch.allclose(reward(prompts, completions), expected, atol=1e-5)


def test_policy_with_a_different_tokenizer(tmp_path, rm_dir, reward):
    # The pipeline sees text only: a policy whose vocabulary differs from the RM's is scored through
    # its decoded text, re-tokenised with the RM's tokenizer.
    policy_tok = load_tokenizer(str(make_tiny_model_dir(tmp_path / "policy", vocab_size=420, arch="gpt2")))
    assert len(policy_tok) != len(reward.tokenizer)
    ids = [policy_tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    assert ids != [reward.tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    decoded = policy_tok.batch_decode(ids, skip_special_tokens=True)
    assert decoded == COMPLETIONS
    pipeline = build_reward_pipeline(RewardSection(model=[str(rm_dir)], missing_eos_penalty=-1.0))
    scores, stats = pipeline(PROMPTS, decoded, has_eos=torch.tensor([True, True, True, True, False]))
    expected, _ = direct_scores(rm_dir, PROMPTS, COMPLETIONS)
    assert torch.allclose(scores[:4], expected[:4], atol=1e-5) and scores[4] == -1.0
    assert stats["score/reward"] == pytest.approx(expected.mean().item(), abs=1e-5)
    assert pipeline.models[0].model is not reward.model


def test_models_come_first_then_functions(rm_dir, tmp_path, reward):
    path = tmp_path / "rules.py"
    path.write_text("def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    p = build_reward_pipeline(
        RewardSection(model=[str(rm_dir)], function=[f"{path}:length"], weights=[0.5, 0.1], batch_size=3)
    )
    assert [name for name, _ in p.sources] == ["reward", f"{path}:length"] and p.models[0].batch_size == 3
    scores, stats = p(PROMPTS, COMPLETIONS)
    rm = reward(PROMPTS, COMPLETIONS)
    lengths = torch.tensor([float(len(c)) for c in COMPLETIONS])
    assert torch.allclose(scores, 0.5 * rm + 0.1 * lengths, atol=1e-5)


def test_causal_lm_without_a_head_warns(tiny_model):
    with pytest.warns(UserWarning, match="without a trained reward head"):
        ModelReward(str(tiny_model))


def test_missing_model_directory(tmp_path):
    with pytest.raises(RewardError, match="reward model .*nope.*cannot load it"):
        ModelReward(str(tmp_path / "nope"))
