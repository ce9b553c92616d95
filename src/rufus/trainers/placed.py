"""placement=ray: PPO and GRPO with their roles in Ray actor groups, driven by this process.

The controller runs the numbered loop of `rufus.trainers.ppo` / `rufus.trainers.grpo`; the roles
(`rufus.trainers.roles`) do the model work, each a torch.distributed world of ``ray.processes``
processes (`rufus.distributed.ray`). Process r of every role handles the rows process r of a local
run of as many processes handles, in the same micro-batches, with the same sampling seeds, so a placed
run makes the local run's updates: the acceptance tests compare metrics and final weights.

What runs where:

- actor (GRPO's policy): sampling (its rollout engine), log pi_old, the policy update, and, under LoRA,
  log pi_ref with the adapters disabled; critic (PPO): values and the value update; reference: log
  pi_ref; reward: the reward models' scores. Roles without work are not started (no critic for GRPO, no
  reference under LoRA or without a KL term, no reward role without reward models).
- Rollout engines of their own (``ray.engines`` > 0): Ray actors with a copy of the policy, which the
  actor sends its weights to after each update; share r of a step is sampled with process r's seed,
  so the samples are those the actor's process r would draw. Without them the actor samples.
- The controller: the prompts and their plan, reward functions and the reward pipeline (weights, EOS
  penalty, running-std scaling, clipping) over the whole batch, the KL penalty and its controller,
  advantages and whitening over the whole batch, metrics, samples, and committing checkpoints (each
  trained role writes its part first).

Per step the evaluation passes run at once in their groups (pi_old, V, pi_ref, scores), and so do the
actor's and the critic's updates (with ``ppo.target_kl`` the critic waits for the actor and stops after
as many optimiser steps). Not yet placed: a shared critic (``critic.shared``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import uuid
from pathlib import Path

import torch

from rufus.config import ConfigError
from rufus.trainers import common, online

log = logging.getLogger(__name__)


class _RemoteReward:
    """Reward model `index` of the reward role as a pipeline source: the batch split over its processes."""

    def __init__(self, roles: dict, index: int, path: str):
        self.roles, self.index, self.path = roles, index, path

    def __repr__(self) -> str:
        return f"RemoteReward({self.path!r})"

    def __call__(self, prompts, completions, **kw) -> torch.Tensor:
        group = self.roles["reward"]
        n = len(prompts)
        bounds = [n * r // group.nproc for r in range(group.nproc + 1)]
        parts = group.call(
            "score",
            self.index,
            [prompts[bounds[r] : bounds[r + 1]] for r in range(group.nproc)],
            [completions[bounds[r] : bounds[r + 1]] for r in range(group.nproc)],
        )
        return torch.cat(parts)


class Placement:
    """The run's Ray cluster and role groups."""

    def __init__(self, cfg, algo: str, roles: list[str]):
        from rufus.distributed import ray as placement

        r = cfg.ray
        try:
            sets = placement.colocation_sets(r.colocate, roles)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        needed = (len(roles) * r.processes + r.engines) * r.cpus_per_process
        self.cluster = placement.connect(r, cpus_needed=needed)
        self.groups: dict = {}
        self.pgs: dict = {}
        self.engines = None  # the rollout engines' group, with ray.engines
        try:
            self._place(cfg, algo, roles, sets)
        except BaseException:
            self.close()
            raise

    def _place(self, cfg, algo: str, roles: list[str], sets: list[list[str]]) -> None:
        from rufus.distributed import ray as placement

        r = cfg.ray
        self.pgs = placement.placement_groups(sets, r.processes, cpus=r.cpus_per_process, gpus=r.gpus_per_process)
        name = f"rufus-{algo}-{uuid.uuid4().hex[:8]}"
        from rufus.trainers.roles import RoleWorker

        for role in roles:
            pg, cpus, gpus = self.pgs[role]
            self.groups[role] = placement.RoleGroup(
                role, RoleWorker, r.processes, pg, cpus=cpus, gpus=gpus, local=self.cluster.local, name=name
            )
        if r.engines:  # rollout engines of their own, in a placement group of their own
            from rufus.trainers.roles import EngineWorker

            pg = placement.placement_groups([["engine"]], r.engines, cpus=r.cpus_per_process, gpus=r.gpus_per_process)
            self.pgs["engine"] = pg["engine"]
            self.engines = placement.RoleGroup(
                "rollout engine",
                EngineWorker,
                r.engines,
                pg["engine"][0],
                cpus=r.cpus_per_process,
                gpus=r.gpus_per_process,
                local=self.cluster.local,
                name=f"{name}-engine",
            )
        log.info("placement=ray: %s, %d process(es) each, colocated as %s", ", ".join(roles), r.processes, sets)

    def setup(self, cfg, algo: str, max_steps: int) -> None:
        """Every group joins its world and loads its model, all groups at once."""
        futures = {}
        for role, group in self.groups.items():
            master = group.wait([group.actors[0].address.remote()])[0]
            futures[role] = group.submit(
                "setup", cfg, algo, role, list(range(group.nproc)), group.nproc, master, max_steps
            )
        f_engines = self.engines.submit("setup", cfg) if self.engines else None
        for role, f in futures.items():
            self.groups[role].wait(f)
        if f_engines:
            self.engines.wait(f_engines)

    def generate(self, cfg, tokenizer, shares: list[list[dict]], n: int, step: int) -> list:
        """1. each process's share of the step's prompts, n responses each, as CPU Rollouts: sampled by
        the actor's processes, or by the engines of their own (share r with process r's seed, so the
        samples are the same)."""
        if self.engines is None:
            return self.groups["actor"].call("generate", shares, n, step)
        from rufus.rollout.engine import rows_rollout
        from rufus.rollout.engines import Sampling

        E = self.engines.nproc
        repeated = [[row for row in rows for _ in range(n)] for rows in shares]
        generated = []
        for first in range(0, len(shares), E):  # one share per engine at a time
            futures = [
                self.engines.actors[r - first].generate.remote(
                    [row["ids"] for row in repeated[r]],
                    Sampling.from_generation(cfg.generation, seed=online.sampling_seed(cfg, r, step)),
                )
                for r in range(first, min(first + E, len(shares)))
            ]
            generated += self.engines.wait(futures)
        width = cfg.generation.max_new_tokens
        return [rows_rollout(rows, got, tokenizer, width) for rows, got in zip(repeated, generated, strict=True)]

    def push_weights(self) -> None:
        """After the actor's update: its weights to the engines of their own (none: nothing to do)."""
        if self.engines is not None:
            from rufus.distributed.ray import Same

            self.groups["actor"].call("push_weights", Same(self.engines.actors))

    def close(self) -> None:
        import ray

        for group in [*self.groups.values(), *([self.engines] if self.engines else [])]:
            group.kill()
        for pg, _, _ in {id(v[0]): v for v in self.pgs.values()}.values():
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # the cluster may be gone
                pass
        self.cluster.stop()


def _start(cfg, algo: str, roles: list[str], reward_fn):
    """The controller's run, inputs, reward pipeline and started roles, shared by both loops."""
    from rufus.rewards import build_reward_pipeline

    if cfg.ray.processes > 1 and cfg.batch_size % cfg.ray.processes:
        raise ConfigError(f"batch_size: {cfg.batch_size} does not split into ray.processes={cfg.ray.processes}")
    run = common.start_run(cfg)
    acc = run.accelerator
    N = cfg.ray.processes
    online.micro_batch_size(cfg, N, algo)  # the batch splits into N processes x minibatches x grad_accum
    common.trainable_model_args(cfg)  # a quantization that cannot run fails here, before any role starts
    tokenizer = common.load_run_tokenizer(cfg)
    prompts = online.load_prompts(cfg, acc, tokenizer)
    plan = common.BatchPlan(len(prompts), cfg.batch_size, 1, N, 0, cfg.seed)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else plan.steps_for_epochs(cfg.epochs)
    groups: dict = {}
    reward = build_reward_pipeline(
        cfg.reward,
        extra_functions=reward_fn,
        trust_remote_code=cfg.trust_remote_code,
        load_model=lambda i, path: _RemoteReward(groups, i, path),
    )
    # the roles see the controller's decision on resuming, and never refuse an existing output_dir
    worker_cfg = dataclasses.replace(
        _absolute_paths(cfg),
        resume=str(run.resume_from.resolve()) if run.resume_from else False,
        overwrite=True,
        placement="local",
        progress=False,
    )
    placed = Placement(cfg, algo, [r for r in roles if r != "reward"] + (["reward"] if cfg.reward.model else []))
    groups.update(placed.groups)
    try:
        placed.setup(worker_cfg, algo, max_steps)
    except BaseException:
        placed.close()
        raise
    return run, tokenizer, prompts, plan, max_steps, reward, placed


def _absolute_paths(cfg):
    """The config with its output directory and local model paths absolute: a Ray worker, on another
    node or in another directory, finds what the controller finds."""

    def fix(path):
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    changes = {
        "output_dir": str(Path(cfg.output_dir).resolve()),
        "model": fix(cfg.model),
        "ref_model": fix(cfg.ref_model),
        "tokenizer": fix(cfg.tokenizer),
        "reward": dataclasses.replace(cfg.reward, model=[fix(m) for m in cfg.reward.model]),
    }
    if hasattr(cfg, "critic"):
        changes["critic"] = dataclasses.replace(cfg.critic, model=fix(cfg.critic.model))
    return dataclasses.replace(cfg, **changes)


def _resume(run, placed, trained: list[str], reward) -> tuple[int, dict]:
    """Every trained role loads its part of the resume checkpoint; the controller its trainer state."""
    start_step, saved = common.maybe_resume(run, {}, {}, {})
    for role in trained:
        steps = placed.groups[role].call("resume")
        if any(s != start_step for s in steps):
            raise RuntimeError(f"placement=ray: the {role} role resumed at steps {steps}, not {start_step}")
    if saved.get("reward"):
        reward.load_state_dict(saved["reward"])
    return start_step, saved


def _checkpoint(run, placed, trained: list[str], step: int, state: dict) -> None:
    from rufus.checkpoint import commit, temporary_dir

    tmp = temporary_dir(run.output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    futures = {role: placed.groups[role].submit("save_parts", str(tmp)) for role in trained}
    for role, f in futures.items():
        placed.groups[role].wait(f)
    commit(run.output_dir, step, num_processes=run.cfg.ray.processes, state=state, keep=run.cfg.save_total_limit)


def _shares(prompts, plan, step: int, N: int) -> list[list[dict]]:
    """Each process's rows of step `step`: process r's contiguous share of the global batch."""
    batch = plan.global_batch(step)
    return [[prompts[i] for i in plan.share(batch, r)] for r in range(N)]


def _set_rows(ro, parts, name: str, full: torch.Tensor) -> None:
    """Set a whole-batch field on the whole batch `ro` and each process's rows of it on its rollout."""
    setattr(ro, name, full)
    start = 0
    for part in parts:
        n = part.input_ids.shape[0]
        setattr(part, name, full[start : start + n])
        start += n


def _whiten(x: torch.Tensor, mask: torch.Tensor, parts, **kw) -> torch.Tensor:
    """`advantages.whiten_global` over the whole batch as the local processes compute it: each share's
    partial sums, added in rank order (what their all-reduce adds), then each share whitened."""
    from rufus.advantages import whiten_global

    m = mask.to(x.dtype)
    sizes = [part.input_ids.shape[0] for part in parts]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    shares = [slice(a, a + n) for a, n in zip(starts, sizes)]
    total = None
    for sl in shares:
        xs, ms = x[sl], m[sl]
        partial = torch.stack([(xs * ms).sum(), (xs * xs * ms).sum(), ms.sum()])
        total = partial if total is None else total + partial
    return torch.cat([whiten_global(x[sl], mask[sl], lambda t: total, **kw) for sl in shares])


def _should_save(cfg, step: int, last: int) -> bool:
    return bool(cfg.save_every and step % cfg.save_every == 0) or step == last


# --- PPO --------------------------------------------------------------------------------------------


def train_ppo_placed(cfg, reward_fn=None):
    """PPO (`rufus.trainers.ppo.train_ppo`) with actor, critic, reference and reward models placed by Ray."""
    from rufus.advantages import gae, kl_penalized_rewards
    from rufus.kl_control import make_kl_controller
    from rufus.losses.kl import kl_penalty
    from rufus.losses.ppo import explained_variance
    from rufus.rollout.record import Rollout
    from rufus.trainers.ppo import PPOResult

    if cfg.critic.shared:
        raise ConfigError("critic.shared: not yet with placement=ray; use a separate critic (critic.shared=false)")
    roles = ["actor", "critic"] + (["reference"] if cfg.lora.r == 0 else [])
    run, tokenizer, prompts, plan, max_steps, reward, placed = _start(cfg, "ppo", roles, reward_fn)
    try:
        acc, N, g = run.accelerator, cfg.ray.processes, placed.groups
        pad = tokenizer.pad_token_id
        kl_ctl = make_kl_controller(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
        start_step, saved = _resume(run, placed, ["actor", "critic"], reward)
        if saved:
            kl_ctl.load_state_dict(saved["kl_controller"])
        logger = common.open_metrics(run, start_step)
        samples = online.SamplesFile(run, "samples.jsonl", resume_step=start_step)
        reference = g.get("reference", g["actor"])  # under LoRA the actor answers for pi_ref
        progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="ppo")
        for step in range(start_step + 1, max_steps + 1):
            t0 = time.perf_counter()

            # 1. rollout: one response per prompt from pi_old, each process its share
            parts = placed.generate(cfg, tokenizer, _shares(prompts, plan, step, N), 1, step)
            t_rollout = time.perf_counter() - t0

            # 2. evaluation, all at once: pi_old, V, pi_ref in their groups; scores here
            f_old = g["actor"].submit("old_logprobs", parts)
            f_values = g["critic"].submit("values", parts)
            f_ref = reference.submit("ref_logprobs", parts)
            ro = Rollout.concat(parts, pad)  # (B, ...) the whole batch
            scores, reward_stats = reward(ro.prompts, ro.completions, ro.has_eos, **ro.extra)
            for name, group, f in (("logprobs", g["actor"], f_old), ("values", g["critic"], f_values)):
                _set_rows(ro, parts, name, torch.cat(group.wait(f)))
            _set_rows(ro, parts, "ref_logprobs", torch.cat(reference.wait(f_ref)))
            ro.scores = scores  # (B,)

            # 3. per-token rewards r_t = -beta * KL_t (+ score on the last token), GAE, whitening
            mask = ro.response_mask.float()  # (B, A)
            ro.kl = torch.where(mask.bool(), kl_penalty(ro.logprobs, ro.ref_logprobs, cfg.kl.estimator), 0.0)
            ro.rewards = kl_penalized_rewards(ro.scores, ro.kl, mask, kl_ctl.value)
            if cfg.ppo.whiten_rewards:
                ro.rewards = _whiten(ro.rewards, mask, parts, shift_mean=False)
            ro.advantages, ro.returns = gae(ro.rewards, ro.values * mask, mask, gamma=cfg.gae.gamma, lam=cfg.gae.lam)
            if cfg.ppo.whiten_advantages:
                ro.advantages = _whiten(ro.advantages, mask, parts)
            stats = online.batch_stats(acc, ro, ro.kl, kl_ctl.value)
            for name in ("scores", "kl", "advantages", "returns"):
                _set_rows(ro, parts, name, getattr(ro, name))

            # 4. PPO epochs in the actor's and the critic's groups at once (with target_kl, the critic
            # stops after as many optimiser steps as the actor took)
            t_train = time.perf_counter()
            if cfg.ppo.target_kl is None:
                f_actor, f_critic = g["actor"].submit("update", parts, step), g["critic"].submit("update", parts, step)
                actor_stats, critic_stats = g["actor"].wait(f_actor)[0][0], g["critic"].wait(f_critic)[0][0]
            else:
                actor_stats = g["actor"].call("update", parts, step)[0][0]
                critic_stats = g["critic"].call("update", parts, step, actor_stats["policy/updates"])[0][0]
            placed.push_weights()
            stats.update({k: v for k, v in critic_stats.items() if k.startswith("value/")})
            stats.update(actor_stats)
            # the local run logs its main process's share
            stats["value/explained_variance"] = explained_variance(
                parts[0].values, parts[0].returns, parts[0].response_mask
            )
            t_train = time.perf_counter() - t_train

            # 5. KL controller, log, samples, checkpoint
            kl_ctl.update(stats["kl/mean"], n_steps=cfg.batch_size)
            tokens = stats["response/length"] * cfg.batch_size
            times = online.step_times(t0, t_rollout, t_train)
            lr = g["actor"].wait([g["actor"].actors[0].last_lr.remote()])[0]
            row = {**stats, **reward_stats, "kl/coef": kl_ctl.value, "lr": lr, **times}
            row["tokens_per_s"] = tokens / max(times["time/step_s"], 1e-9)
            if online.sample_due(cfg, step):
                samples.write_rollout(step, parts[0], cfg.num_samples, kl=parts[0].kl.sum(-1))
            if step % cfg.log_every == 0 or step == max_steps:
                logger.log(step, row)
            progress.update(1)
            progress.set_postfix({"reward": f"{stats['reward/mean']:.3f}", "kl": f"{stats['kl/mean']:.3f}"})
            if _should_save(cfg, step, max_steps):
                state = {"kl_controller": kl_ctl.state_dict(), "reward": reward.state_dict()}
                _checkpoint(run, placed, ["actor", "critic"], step, state)
        progress.close()

        final_dir = Path(g["actor"].call("save_final")[0])
        g["critic"].call("save_final")
    finally:
        placed.close()
    logger.close()
    common.finish_run(run, ["reward/mean", "score/mean", "kl/mean", "policy/entropy", "policy/loss", "value/loss"])
    return PPOResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, None, None, None, reward)


# --- GRPO -------------------------------------------------------------------------------------------


def train_grpo_placed(cfg, reward_fn=None):
    """GRPO (`rufus.trainers.grpo.train_grpo`) with its policy, reference and reward models placed by Ray."""
    from rufus.advantages import equal_reward_groups, group_advantages
    from rufus.losses.kl import kl_penalty
    from rufus.rollout.record import Rollout

    G = cfg.grpo.group_size
    use_kl = cfg.kl.coef > 0
    roles = ["actor"] + (["reference"] if use_kl and cfg.lora.r == 0 else [])
    run, tokenizer, prompts, plan, max_steps, reward, placed = _start(cfg, "grpo", roles, reward_fn)
    try:
        acc, N, g = run.accelerator, cfg.ray.processes, placed.groups
        pad = tokenizer.pad_token_id
        start_step, _ = _resume(run, placed, ["actor"], reward)
        logger = common.open_metrics(run, start_step)
        samples = online.SamplesFile(run, "samples.jsonl", resume_step=start_step)
        reference = g.get("reference", g["actor"])
        single_update = cfg.grpo.epochs == 1 and cfg.grpo.minibatches == 1
        progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="grpo")
        for step in range(start_step + 1, max_steps + 1):
            t0 = time.perf_counter()

            # 1. a group of G responses per prompt from pi_old
            parts = placed.generate(cfg, tokenizer, _shares(prompts, plan, step, N), G, step)
            t_rollout = time.perf_counter() - t0

            # 2. scores here; pi_old (unless the update's own pass gives it) and pi_ref in their groups
            f_old = None if single_update else g["actor"].submit("old_logprobs", parts)
            f_ref = reference.submit("ref_logprobs", parts) if use_kl else None
            ro = Rollout.concat(parts, pad)
            ro.scores, reward_stats = reward(ro.prompts, ro.completions, ro.has_eos, **ro.extra)
            if f_old is not None:
                _set_rows(ro, parts, "logprobs", torch.cat(g["actor"].wait(f_old)))
            if f_ref is not None:
                _set_rows(ro, parts, "ref_logprobs", torch.cat(reference.wait(f_ref)))
            sampled_mask = ro.response_mask

            # 3. group-relative advantages, the same for every token of a response
            ro.advantages = group_advantages(ro.scores, G, scale=cfg.grpo.scale_rewards)
            equal = equal_reward_groups(ro.scores, G)
            if cfg.grpo.drop_equal_groups:
                keep = (~equal).repeat_interleave(G).long()
                ro.response_mask = ro.response_mask * keep.unsqueeze(-1)
            for name in ("scores", "advantages", "response_mask"):
                _set_rows(ro, parts, name, getattr(ro, name))

            # 4. clipped updates in the policy's group
            t_train = time.perf_counter()
            done = g["actor"].call("update", parts, step)
            stats = done[0][0]
            placed.push_weights()
            _set_rows(ro, parts, "logprobs", torch.cat([old for _, old in done]))
            t_train = time.perf_counter() - t_train
            ro.kl = kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") if use_kl else None
            sample_stats = online.batch_stats(acc, ro, ro.kl, cfg.kl.coef, mask=sampled_mask)

            # 5. log, samples, checkpoint
            lr = g["actor"].wait([g["actor"].actors[0].last_lr.remote()])[0]
            row = {
                **sample_stats,
                **stats,
                **reward_stats,
                "groups/equal": equal.float().mean().item(),
                "lr": lr,
                **online.step_times(t0, t_rollout, t_train),
            }
            if online.sample_due(cfg, step):
                samples.write_rollout(step, parts[0], cfg.num_samples)
            if step % cfg.log_every == 0 or step == max_steps:
                logger.log(step, row)
            progress.update(1)
            progress.set_postfix({"reward": f"{row['reward/mean']:.3f}"})
            if _should_save(cfg, step, max_steps):
                _checkpoint(run, placed, ["actor"], step, {"reward": reward.state_dict()})
        progress.close()
        final_dir = Path(g["actor"].call("save_final")[0])
    finally:
        placed.close()
    logger.close()
    common.finish_run(run, ["reward/mean", "kl/mean", "policy/clipfrac", "response/length"])
    return online.PolicyResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, None, None)
