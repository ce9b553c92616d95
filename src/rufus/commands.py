"""The table of Rufus's commands: name -> the module, config class and function that run it.

The CLI (`rufus <command>`) and the pipeline (which runs the RL stage's trainer by its algorithm's
name) both read it; modules are named, not imported, so reading the table is cheap.
"""

from __future__ import annotations

import importlib

# command -> (module, config class, function, one-line description)
COMMANDS = {
    "sft": ("rufus.trainers.sft", "SFTConfig", "train_sft", "supervised fine-tuning on demonstrations"),
    "rm": ("rufus.trainers.reward", "RMConfig", "train_reward_model", "train a reward model on comparisons"),
    "ppo": (
        "rufus.trainers.ppo",
        "PPOConfig",
        "train_ppo",
        "RL fine-tuning with PPO (actor, critic, reward, reference)",
    ),
    "grpo": ("rufus.trainers.grpo", "GRPOConfig", "train_grpo", "GRPO: group-relative advantages, no critic"),
    "rloo": (
        "rufus.trainers.rloo",
        "RLOOConfig",
        "train_rloo",
        "RLOO / REINFORCE++: policy gradient with a sample baseline",
    ),
    "dpo": (
        "rufus.trainers.dpo",
        "DPOConfig",
        "train_dpo",
        "DPO and variants (IPO, hinge, conservative; reference-free ORPO, SimPO), offline or iterated",
    ),
    "kto": (
        "rufus.trainers.kto",
        "KTOConfig",
        "train_kto",
        "KTO: learn from single completions labelled desirable or undesirable (no pairs needed)",
    ),
    "ilql": (
        "rufus.trainers.ilql",
        "ILQLConfig",
        "train_ilql",
        "ILQL: offline RL from (prompt, response, reward) rows, decoded with beta-perturbed logits",
    ),
    "bon": ("rufus.trainers.bon", "BoNConfig", "train_bon", "best-of-n rejection-sampling fine-tuning"),
    "generate": ("rufus.generate", "GenerateConfig", "generate", "sample responses, optionally best-of-n by a reward"),
    "eval": (
        "rufus.evaluate",
        "EvalConfig",
        "evaluate",
        "evaluate a policy: reward score, KL, length, diversity, win rate (and gold, on the playground)",
    ),
    "pipeline": (
        "rufus.pipeline",
        "PipelineConfig",
        "run_pipeline",
        "the whole loop: sft -> collect comparisons -> rm -> rl -> eval -> report",
    ),
    "demo": (
        "rufus.pipeline",
        "DemoConfig",
        "run_demo",
        "the pipeline on the built-in offline playground, minutes on a laptop CPU",
    ),
    "eval-rm": (
        "rufus.trainers.reward",
        "EvalRMConfig",
        "eval_reward_model",
        "evaluate a reward model on comparisons (accuracy, margin, calibration)",
    ),
}


def load_command(command: str) -> tuple[type, object]:
    """(config class, function) of `command`, importing its module."""
    module, cfg_name, fn_name, _ = COMMANDS[command]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_name), getattr(mod, fn_name)
