"""Rows in the shapes the public preference data sets are published in: fields, nesting, separators.

Each builder returns `n` rows of one data set, written the way its files on the hub hold them (the
values are made up; the structure is the published one). The preferred answer is always the longer,
digit-rich one, so a short training run has something to learn. Used by the reader tests and the
trainer tests that train on each format.
"""

from __future__ import annotations

import random

TOPICS = ["the moon", "bread", "rivers", "chess", "tea", "owls", "snow", "maps", "glass", "bees", "salt", "kites"]


def _good(topic: str, k: int) -> str:
    return f"{topic.capitalize()} has {k} facts: 1 2 3 {k}."


def _bad(topic: str, k: int) -> str:
    return f"no idea {k}"


def hh_rlhf(n: int = 12) -> list[dict]:
    """Anthropic/hh-rlhf: two whole dialogues, differing in the last Assistant turn."""
    rows = []
    for k in range(n):
        topic = TOPICS[k % len(TOPICS)]
        opening = f"\n\nHuman: Tell me about {topic}."
        if k % 3 == 0:  # a multi-turn one
            opening += f"\n\nAssistant: Sure, {topic} {k}.\n\nHuman: More please?"
        rows.append(
            {
                "chosen": f"{opening}\n\nAssistant: {_good(topic, k)}",
                "rejected": f"{opening}\n\nAssistant: {_bad(topic, k)}",
            }
        )
    return rows


def ultrafeedback_binarized(n: int = 12) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized: full conversations as chosen / rejected, with scores."""
    rows = []
    for k in range(n):
        topic = TOPICS[k % len(TOPICS)]
        prompt = f"Explain {topic}, case {k}."
        user = {"content": prompt, "role": "user"}
        chosen = [user, {"content": _good(topic, k), "role": "assistant"}]
        rejected = [user, {"content": _bad(topic, k), "role": "assistant"}]
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": f"{k:064x}",
                "chosen": chosen,
                "rejected": rejected,
                "messages": chosen,
                "score_chosen": 8.0 + k % 2,
                "score_rejected": 3.0,
            }
        )
    return rows


def _uf_completion(model: str, response: str, rating: int) -> dict:
    aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
    return {
        "annotations": {a: {"Rating": str(rating), "Rationale": "made up", "Type": ["1"]} for a in aspects},
        "critique": "made up",
        "custom_system_prompt": "You are a helpful assistant.",
        "fine-grained_score": float(rating),
        "model": model,
        "overall_score": 2.0 * rating,
        "principle": "helpfulness",
        "response": response,
    }


def ultrafeedback_raw(n: int = 12) -> list[dict]:
    """openbmb/UltraFeedback: an instruction with four rated completions (two of them tied)."""
    rows = []
    for k in range(n):
        topic = TOPICS[k % len(TOPICS)]
        completions = [
            _uf_completion("alpaca-7b", _bad(topic, k), 2),
            _uf_completion("gpt-4", _good(topic, k), 5),
            _uf_completion("llama-2-7b-chat", f"{topic} maybe {k} 1", 3),
            _uf_completion("falcon-40b-instruct", f"{topic} perhaps {k} 2", 3),
        ]
        rows.append(
            {
                "source": "evol_instruct",
                "instruction": f"Explain {topic}, case {k}.",
                "models": [c["model"] for c in completions],
                "completions": completions,
                "correct_answers": ["None"],
                "incorrect_answers": ["None"],
            }
        )
    return rows


def oasst1(n_trees: int = 6, seed: int = 0) -> list[dict]:
    """OpenAssistant/oasst1: the flat message table. Each tree: a prompter root with three ranked
    assistant replies, a follow-up prompter message under the best one with two ranked replies, and
    one deleted reply (which must be skipped). Rows are shuffled within the file, as a message table
    need not list parents first."""
    rng = random.Random(seed)
    rows = []

    def message(mid, parent, role, text, tree, rank=None, deleted=False, lang="en"):
        return {
            "message_id": mid,
            "parent_id": parent,
            "user_id": f"user-{rng.randrange(100)}",
            "created_date": "2023-02-05T14:23:50.983374+00:00",
            "text": text,
            "role": role,
            "lang": lang,
            "review_count": 3,
            "review_result": True,
            "deleted": deleted,
            "rank": rank,
            "synthetic": False,
            "model_name": None,
            "detoxify": {"toxicity": 0.001, "insult": 0.0002},
            "message_tree_id": tree,
            "tree_state": "ready_for_export",
            "emojis": {"name": ["+1"], "count": [3]},
            "labels": {"name": ["spam", "quality"], "value": [0.0, 0.8], "count": [3, 3]},
        }

    for t in range(n_trees):
        topic = TOPICS[t % len(TOPICS)]
        tree, root = f"tree-{t}", f"m{t}-root"
        lang = "de" if t == n_trees - 1 else "en"
        rows.append(message(root, None, "prompter", f"What about {topic}?", tree, lang=lang))
        replies = [_good(topic, t), f"{topic} maybe {t} 1", _bad(topic, t)]
        for r, text in enumerate(replies):
            rows.append(message(f"m{t}-a{r}", root, "assistant", text, tree, rank=r, lang=lang))
        rows.append(message(f"m{t}-gone", root, "assistant", "deleted reply", tree, deleted=True, lang=lang))
        rows.append(message(f"m{t}-p2", f"m{t}-a0", "prompter", f"And {topic} {t + 1}?", tree, lang=lang))
        rows.append(message(f"m{t}-b0", f"m{t}-p2", "assistant", _good(topic, t + 1), tree, rank=0, lang=lang))
        rows.append(message(f"m{t}-b1", f"m{t}-p2", "assistant", _bad(topic, t + 1), tree, rank=1, lang=lang))
    rng.shuffle(rows)
    return rows


def shp(n: int = 12) -> list[dict]:
    """stanfordnlp/SHP: a post and two top-level comments; labels 1 = A preferred."""
    rows = []
    for k in range(n):
        topic = TOPICS[k % len(TOPICS)]
        a_better = k % 2 == 0
        good, bad = _good(topic, k), _bad(topic, k)
        score_good, score_bad = 40 + k, 10 + (k % 5) * 8
        rows.append(
            {
                "post_id": f"post{k}",
                "domain": "askscience_train",
                "upvote_ratio": 0.97,
                "history": f"Why is {topic} like that? Case {k}.",
                "c_root_id_A": f"a{k}",
                "c_root_id_B": f"b{k}",
                "created_at_utc_A": 1592497245,
                "created_at_utc_B": 1592495622,
                "score_A": score_good if a_better else score_bad,
                "score_B": score_bad if a_better else score_good,
                "human_ref_A": good if a_better else bad,
                "human_ref_B": bad if a_better else good,
                "labels": 1 if a_better else 0,
                "seconds_difference": 1623.0,
                "score_ratio": score_good / score_bad,
            }
        )
    return rows


def summarize_from_feedback(n: int = 12) -> list[dict]:
    """openai/summarize_from_feedback, comparisons: a Reddit post and two summaries; choice = the better."""
    rows = []
    for k in range(n):
        topic = TOPICS[k % len(TOPICS)]
        choice = k % 2
        summaries = [None, None]
        summaries[choice] = {"text": " " + _good(topic, k), "policy": "sup2", "note": None}
        summaries[1 - choice] = {"text": " " + _bad(topic, k), "policy": "ref", "note": None}
        rows.append(
            {
                "info": {
                    "id": f"t3_{k}",
                    "post": f"I keep thinking about {topic}. It happened {k} times.",
                    "title": f"About {topic}",
                    "subreddit": "relationships",
                    "site": None,
                    "article": None,
                },
                "summaries": summaries,
                "choice": choice,
                "worker": f"w{k % 3}",
                "batch": "batch3",
                "split": "train",
                "extra": {"confidence": 1 + k % 9},
            }
        )
    return rows


def helpsteer2(n_prompts: int = 8) -> list[dict]:
    """nvidia/HelpSteer2: one row per (prompt, response), two responses per prompt, 0-4 attributes."""
    rows = []
    for k in range(n_prompts):
        topic = TOPICS[k % len(TOPICS)]
        prompt = f"Describe {topic} ({k})."
        rows.append(
            {
                "prompt": prompt,
                "response": _good(topic, k),
                "helpfulness": 4,
                "correctness": 4,
                "coherence": 4,
                "complexity": 2,
                "verbosity": 2,
            }
        )
        rows.append(
            {
                "prompt": prompt,
                "response": _bad(topic, k),
                "helpfulness": 1,
                "correctness": 2,
                "coherence": 3,
                "complexity": 1,
                "verbosity": 1,
            }
        )
    return rows


def trl_unpaired(n: int = 12) -> list[dict]:
    """TRL's unpaired preference type: prompt, completion, label (true = desirable)."""
    rows = []
    for k in range(n):
        topic = TOPICS[k % len(TOPICS)]
        good = k % 2 == 0
        completion = _good(topic, k) if good else _bad(topic, k)
        rows.append({"prompt": f"Tell me about {topic} {k}.", "completion": " " + completion, "label": good})
    return rows


def trl_implicit(n: int = 12) -> list[dict]:
    """TRL's preference type in the standard form with an implicit prompt: two strings sharing their opening."""
    rows = []
    for k in range(n):
        topic = TOPICS[k % len(TOPICS)]
        opening = f"Question about {topic} {k}. Answer:"
        rows.append({"chosen": f"{opening} {_good(topic, k)}", "rejected": f"{opening} {_bad(topic, k)}"})
    return rows
