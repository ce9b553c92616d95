"""Example reward functions for `reward.function=configs/rewards.py:NAME`.

Each is called as fn(prompts=[...], completions=[...], **dataset_columns) and returns one float
per completion (the same convention as TRL's reward functions).
"""


def digit_share(prompts, completions, **kwargs):
    """The share of a completion's characters that are digits (a toy target for tiny models)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def brevity(prompts, completions, **kwargs):
    """Shorter is better: 1 for an empty answer, falling to 0 at 200 characters."""
    return [max(0.0, 1.0 - len(text) / 200) for text in completions]
