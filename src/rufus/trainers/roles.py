"""One process of a Ray-placed role (`rufus.distributed.ray`): what it loads and the steps it runs.

A `RoleWorker` is a Ray actor. `join` makes it process `rank` of its role's torch.distributed world;
`setup` loads the role's model the way the local trainer loads it (the same functions: LoRA,
quantization, ``strategy``, dropout off), and from then on the controller asks it for its part of
each step. Every method works on this process's rows only, in the micro-batches the local trainer
uses, so rank r computes exactly what process r of a local run computes.

Roles and their steps:

- ``actor`` (PPO; GRPO's policy): `generate`, `old_logprobs`, `ref_logprobs` (LoRA: the adapter-disabled
  base is the reference), `update`, and the checkpoint, resume and final-model steps;
- ``critic`` (PPO): `values`, `update`, checkpoints, `save_final`;
- ``reference``: `ref_logprobs`;
- ``reward``: `score` with each reward model of ``reward.model`` (functions run in the controller).
"""

from __future__ import annotations

import dataclasses
import os
import socket

import torch

from rufus import distributed


class RoleWorker:
    def address(self) -> tuple[str, int]:
        """(this node's address, a free port) for the world's store (asked of rank 0)."""
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if host not in ("127.0.0.1", "localhost"):
            import ray

            host = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return host, sock.getsockname()[1]

    def setup(self, cfg, algo: str, role: str, rank: int, world: int, master: tuple[str, int], max_steps: int):
        """Join the role's world and load its model(s)."""
        from rufus.trainers import common, online

        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        if world == 1:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
                os.environ.pop(key)
        self.cfg, self.algo, self.role = cfg, algo, role
        self.name = "model" if algo == "grpo" else role  # its checkpoint files' names, as the local run's
        self.run = run = common.start_run(cfg)
        self.acc = acc = run.accelerator
        self.tokenizer = tokenizer = common.load_run_tokenizer(cfg)
        section = "ppo" if algo == "ppo" else "grpo"
        self.micro_size = online.micro_batch_size(cfg, acc.num_processes, section)
        self.engine = None
        if role == "actor":
            self.model, self.optimizer, self.scheduler = online.load_policy(cfg, run, tokenizer, max_steps)
            if not cfg.ray.engines:  # else the engines are Ray actors of their own (`EngineWorker`)
                self.engine = online.rollout_engine(cfg, acc, acc.unwrap_model(self.model), tokenizer)
        elif role == "critic":
            from rufus.models.value import load_critic

            critic = load_critic(
                cfg.critic.model or cfg.model, tokenizer=tokenizer, lora=cfg.lora, **common.trainable_model_args(cfg)
            )
            critic = distributed.shard(cfg, acc, critic)
            self.optimizer, self.scheduler = common.make_optimizer(
                dataclasses.replace(cfg, lr=cfg.critic.lr), critic, max_steps
            )
            self.model, self.optimizer = distributed.prepare(acc, critic, self.optimizer)
        elif role == "reference":
            self.model = online.load_reference(cfg, run, tokenizer)
        elif role == "reward":
            from rufus.rewards.sources import ModelReward

            self.rewards = [
                ModelReward(
                    path,
                    device=acc.device,
                    dtype=run.compute_dtype,
                    batch_size=cfg.reward.batch_size,
                    trust_remote_code=cfg.trust_remote_code,
                )
                for path in cfg.reward.model
            ]
        else:
            raise ValueError(f"unknown role {role!r}")
        return os.getpid()

    # --- the steps --------------------------------------------------------------------------------

    def generate(self, rows: list[dict], n: int, step: int):
        """1. n responses per prompt row (this process's rows), as a CPU Rollout."""
        from rufus.trainers import online

        return online.sample(self.cfg, self.acc, self.engine, self.tokenizer, rows, n, step).to("cpu")

    def old_logprobs(self, ro) -> torch.Tensor:
        """(B, A) log pi_old of this process's rollout, in the first update's micro-batches."""
        ro = ro.to(self.acc.device)
        with torch.no_grad():
            self.model.eval()
            if self.algo == "ppo":
                from rufus.trainers.ppo import actor_forward

                with self.acc.autocast():
                    parts = [
                        actor_forward(self.cfg, self.model, chunk)["logprobs"] for chunk in ro.chunks(self.micro_size)
                    ]
                return torch.cat(parts).cpu()
            from rufus.rollout.logprobs import batched_logprobs

            with self.acc.autocast():
                lp = batched_logprobs(
                    self.model,
                    ro.input_ids,
                    ro.attention_mask,
                    ro.prompt_length,
                    self.cfg.generation.temperature,
                    self.micro_size,
                )
            return lp.cpu()

    def ref_logprobs(self, ro) -> torch.Tensor:
        """(B, A) log pi_ref: this role's reference model, or (an actor under LoRA) its disabled adapters."""
        from rufus.trainers import online

        ro = ro.to(self.acc.device)
        reference = self.model if self.role == "reference" else None
        return online.reference_logprobs(self.cfg, self.acc, self.model, reference, ro, self.micro_size).cpu()

    def values(self, ro) -> torch.Tensor:
        """(B, A) V of this process's rollout (the critic), in the first update's micro-batches."""
        from rufus.trainers.ppo import critic_forward

        ro = ro.to(self.acc.device)
        with torch.no_grad(), self.acc.autocast():
            return torch.cat(
                [critic_forward(self.model, chunk)["values"] for chunk in ro.chunks(self.micro_size)]
            ).cpu()

    def score(self, index: int, prompts: list, completions: list) -> torch.Tensor:
        """(B,) the scores of reward model `index` (reward.model order)."""
        return self.rewards[index](prompts, completions)

    def update(self, ro, step: int, max_updates: int | None = None) -> tuple[dict, torch.Tensor | None]:
        """4. the role's update epochs over this process's rollout; then the schedule's step and, for an
        actor, the rollout engine's weights. Returns (stats, pi_old when the update filled it)."""
        from rufus.trainers import online

        ro = ro.to(self.acc.device)
        cfg = self.cfg
        if self.algo == "ppo":
            from rufus.trainers import ppo

            if self.role == "actor":
                forward = lambda part: ppo.actor_forward(cfg, self.model, part, with_entropy=True)  # noqa: E731
                loss_fn = lambda part, out, micro: ppo.actor_loss(cfg, part, out, micro)  # noqa: E731
            else:
                forward = lambda part: ppo.critic_forward(self.model, part)  # noqa: E731
                loss_fn = lambda part, out, micro: ppo.critic_loss(cfg, part, out, micro)  # noqa: E731
            section = cfg.ppo
        else:
            from rufus.trainers.grpo import grpo_loss

            forward, loss_fn, section = online.logprobs_forward(cfg, self.model), grpo_loss(cfg), cfg.grpo
        stats = {}
        if ro.response_mask.sum() > 0 or self.acc.num_processes > 1 or self.algo == "ppo":
            stats = online.update_epochs(
                cfg,
                self.acc,
                ro,
                [self.model],
                [self.optimizer],
                section,
                self.micro_size,
                step,
                forward,
                loss_fn,
                max_updates=max_updates,
            )
        self.scheduler.step()
        if self.engine is not None:
            online.sync_engine(self.acc, self.engine, self.acc.unwrap_model(self.model))
        if ro.logprobs is None:  # nothing was trained (every group equal): pi_old for the log only
            ro.logprobs = self.old_logprobs(ro)
        return stats, ro.logprobs.cpu()

    def push_weights(self, engines: list) -> None:
        """Send the policy's full weights (gathered, LoRA merged) to the rollout engines of their own."""
        import ray

        from rufus.rollout.engines import policy_weights

        policy = self.acc.unwrap_model(self.model)
        with distributed.gathered(policy):  # a collective when sharded: every process of the role calls
            weights = policy_weights(policy) if self.acc.is_main_process else None
        if self.acc.is_main_process:
            ref = ray.put(weights)
            ray.get([engine.update_weights.remote(ref) for engine in engines])
        self.acc.wait_for_everyone()

    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # --- checkpoints and the final model ----------------------------------------------------------

    def resume(self) -> int:
        """Load the run's resume checkpoint (this role's part) into the model, optimiser and schedule."""
        from rufus.trainers import common

        if self.run.resume_from is None:
            return 0
        from rufus.checkpoint import load_checkpoint

        info = load_checkpoint(
            self.run.resume_from,
            accelerator=self.acc,
            models={self.name: self.acc.unwrap_model(self.model)},
            optimizers={self.name: self.optimizer},
            schedulers={self.name: self.scheduler},
            rng_tag=f"{self.role}-",
        )
        common.log.info("%s: resumed from %s at step %d", self.role, self.run.resume_from, info["step"])
        return int(info["step"])

    def save_parts(self, tmp: str) -> None:
        """This role's part of a checkpoint, into the temporary directory the controller made."""
        from pathlib import Path

        from rufus.checkpoint import save_parts

        save_parts(
            Path(tmp),
            accelerator=self.acc,
            models={self.name: self.acc.unwrap_model(self.model)},
            optimizers={self.name: self.optimizer},
            schedulers={self.name: self.scheduler},
            rng_tag=f"{self.role}-",
        )

    def save_final(self) -> str:
        """final/ (the actor: the policy and tokenizer) or final_critic/ (the critic)."""
        from rufus.trainers import common

        if self.role == "actor":
            if self.engine is not None:
                self.engine.close()
            return str(common.save_final(self.run, self.acc.unwrap_model(self.model), self.tokenizer))
        from rufus.models.value import save_critic

        whole = distributed.unsharded(self.acc.unwrap_model(self.model))
        out = self.run.output_dir / "final_critic"
        if self.acc.is_main_process:
            save_critic(whole, out)
        self.acc.wait_for_everyone()
        return str(out)


class EngineWorker:
    """A rollout engine as a Ray actor of its own (`ray.engines`): its own copy of the policy, loaded from
    the run's starting model and overwritten by the actor after each update (`RoleWorker.push_weights`)."""

    def setup(self, cfg) -> int:
        import types

        from rufus.models.loading import load_causal_lm, resolve_dtype
        from rufus.trainers import common, online

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = common.load_run_tokenizer(cfg)
        model = load_causal_lm(
            cfg.model,
            tokenizer=tokenizer,
            dtype=resolve_dtype(cfg.dtype, device),
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        )
        model.to(device).eval().requires_grad_(False)
        self.engine = online.rollout_engine(cfg, types.SimpleNamespace(device=device), model, tokenizer)
        return os.getpid()

    def generate(self, prompt_ids, sampling):
        return self.engine.generate(prompt_ids, sampling)

    def update_weights(self, weights) -> None:
        self.engine.update_weights(weights)

    def close(self) -> None:
        self.engine.close()
