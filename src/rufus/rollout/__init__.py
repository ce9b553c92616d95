"""Rollouts: sample responses from the policy and compute what RL needs about them.

`generate.py` holds the sampling backend (Hugging Face `generate`; a vLLM backend can implement
the same `generate_responses` signature), `logprobs.py` the teacher-forced forward passes, and
`record.py` the `Rollout` record that carries one batch through a trainer's steps.
"""
