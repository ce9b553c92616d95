"""Ray placement of a trainer's roles (``placement=ray``): the cluster, its placement groups, role groups.

A *role* (PPO's actor, critic, reference and reward model; GRPO's policy, reference and reward model)
is a group of Ray actors, ``ray.processes`` of them, each holding its share of the role's model. A group
is a torch.distributed world of its own (gloo on CPU, NCCL on GPU), so a role trains or evaluates under
any ``strategy`` exactly as the same processes would without Ray; rank r of every group handles the
rows that process r handles in a local run. One controller (the process that runs `rufus ppo` or
`rufus grpo`) drives the groups through the trainer's numbered loop (`rufus.trainers.placed`).

- **The cluster.** ``ray.address`` joins a running cluster; without it Rufus starts a local one with
  ``ray.num_cpus`` logical CPUs (default: what the roles ask for) and stops it at the end. A local
  cluster's node address is 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's single-machine
  mode), so its servers, its workers and the groups' stores all listen on the loopback interface only.
  A process that already called ``ray.init`` keeps its connection (tests start the cluster once).
- **Placement.** ``ray.colocate`` sorts the roles into sets: ``all`` (one set), ``none`` (one set per
  role) or sets spelled out, ``actor_ref,critic_reward``. Each set is a placement group of
  ``ray.processes`` bundles; bundle r holds process r of every role in the set, so colocated roles
  share a node (and, on GPUs, the device: each gets ``1 / len(set)`` of it, as OpenRLHF colocates).
- **Failures.** A dead Ray actor (a killed process, a node lost) ends the run with `RoleFailed`, which
  names the role and the process; the last checkpoint stays, and ``resume=true`` continues from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ROLE_ALIASES = {"ref": "reference", "policy": "actor", "rm": "reward"}


class RoleFailed(RuntimeError):
    """A role's process died or raised: which role, which process, and why."""


def colocation_sets(spec: str, roles: list[str]) -> list[list[str]]:
    """The sets of roles that share placement groups, from ``ray.colocate`` (module docstring), over the
    roles this run has (a set's names of absent roles are dropped; roles no set names go alone)."""
    spec = spec.strip()
    if spec == "all":
        return [list(roles)]
    if spec == "none":
        return [[r] for r in roles]
    sets, seen = [], set()
    for part in spec.split(","):
        names = [ROLE_ALIASES.get(n, n) for n in part.strip().split("_") if n]
        unknown = [n for n in names if n not in ("actor", "critic", "reference", "reward")]
        if unknown or not names:
            raise ValueError(
                f"ray.colocate: {part.strip()!r} is not a set of roles; write all, none, or sets of "
                "actor/critic/ref/reward joined by '_' and separated by ',' (e.g. actor_ref,critic_reward)"
            )
        twice = [n for n in names if n in seen]
        if twice:
            raise ValueError(f"ray.colocate: role {twice[0]!r} is in two sets")
        seen.update(names)
        here = [n for n in names if n in roles]
        if here:
            sets.append(here)
    return sets + [[r] for r in roles if r not in seen]


def _local_environment() -> dict[str, str]:
    """What a local cluster's processes must see: Ray's single-machine mode (node address 127.0.0.1)
    and gloo on the loopback interface."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
    }


@dataclass
class Cluster:
    """A connection to Ray; `started` when Rufus started the cluster (and stops it)."""

    started: bool
    local: bool

    def stop(self) -> None:
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()


def connect(section, cpus_needed: float) -> Cluster:
    """Join ``ray.address``, keep an existing connection, or start a local loopback-only cluster."""
    try:
        import ray
    except ImportError:
        from rufus.config import ConfigError

        raise ConfigError("placement=ray needs Ray: pip install -e '.[ray]'") from None
    if ray.is_initialized():
        return Cluster(started=False, local=_is_local(ray))
    if section.address:
        ray.init(address=section.address, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
        return Cluster(started=True, local=_is_local(ray))
    start_local_cluster(section.num_cpus or max(int(-(-cpus_needed // 1)), 1), section.num_gpus)
    return Cluster(started=True, local=True)


def start_local_cluster(num_cpus: int, num_gpus: int | None = None) -> None:
    """Start a Ray cluster on this machine whose processes all listen on 127.0.0.1 only.

    Ray's single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) makes the node address the
    loopback one, and Ray's servers bind the node address; the flag is read when Ray is imported, so
    it is set first (a Ray imported earlier in the process is reloaded with it)."""
    import importlib
    import sys

    env = {k: v for k, v in _local_environment().items() if k.startswith("RAY_")}
    os.environ.update(env)
    import ray

    if "ray._private.ray_constants" in sys.modules:
        constants = importlib.import_module("ray._private.ray_constants")
        if getattr(constants, "ENABLE_RAY_CLUSTER", False):
            constants.ENABLE_RAY_CLUSTER = False  # imported before the flag was set
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    address = ray.util.get_node_ip_address()
    if address not in ("127.0.0.1", "localhost", "::1"):
        ray.shutdown()
        raise RuntimeError(f"placement=ray: the local Ray cluster took the address {address}, not 127.0.0.1")


def _is_local(ray) -> bool:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") in ("127.0.0.1", "localhost")


class RoleGroup:
    """``nproc`` Ray actors of `worker_cls` for `role`, one torch.distributed world.

    `call` runs a method on every process, with per-rank arguments (lists of length nproc) or the same
    for all, and returns the results by rank; `submit` / `wait` do the same in two halves, so several
    groups work at once. Any failure becomes `RoleFailed` naming the role and the process.
    """

    def __init__(self, role: str, worker_cls, nproc: int, placement, *, cpus: float, gpus: float, local: bool, name=""):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.role, self.nproc = role, nproc
        env = dict(_local_environment()) if local else {}
        env.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(int(cpus), 1))))
        env["TOKENIZERS_PARALLELISM"] = "false"
        remote = ray.remote(worker_cls)
        self.actors = []
        for rank in range(nproc):
            options = dict(
                num_cpus=cpus,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=rank),
                runtime_env={"env_vars": env},
                max_restarts=0,
            )
            if name:
                options["name"] = f"{name}-{role}-{rank}"
            self.actors.append(remote.options(**options).remote())

    def submit(self, method: str, *args, **kwargs) -> list:
        """Start `method` on every process; a list argument of length nproc gives each its own item
        (wrap a list meant for all in `Same`)."""
        futures = []
        for rank, actor in enumerate(self.actors):
            a = [_pick(x, rank, self.nproc) for x in args]
            k = {key: _pick(x, rank, self.nproc) for key, x in kwargs.items()}
            futures.append(getattr(actor, method).remote(*a, **k))
        return futures

    def wait(self, futures: list) -> list:
        """The results by rank. A failure is reported for the process at its root: a process that died
        (its peers' collectives then fail too) before one that raised."""
        import ray

        try:
            return ray.get(futures)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            pass
        errors = []
        for rank, future in enumerate(futures):
            try:
                ray.get(future, timeout=30)
            except Exception as e:  # noqa: BLE001 - sorted below
                errors.append((rank, e))
        died = [(rank, e) for rank, e in errors if isinstance(e, ray.exceptions.RayActorError)]
        if died:
            rank, e = died[0]
            raise RoleFailed(
                f"placement=ray: the {self.role} role's process {rank} of {self.nproc} died "
                f"({type(e).__name__}); its last checkpoint is kept: rerun with resume=true to continue"
            ) from e
        rank, e = errors[0] if errors else ("?", None)
        cause = getattr(e, "cause", e)
        where = f"the {self.role} role's process {rank} of {self.nproc}"
        raise RoleFailed(f"placement=ray: {where} failed: {cause!r}") from e

    def call(self, method: str, *args, **kwargs) -> list:
        return self.wait(self.submit(method, *args, **kwargs))

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass


class Same:
    """An argument every process gets whole (a list that is not one item per rank)."""

    def __init__(self, value):
        self.value = value


def _pick(x, rank: int, nproc: int):
    if isinstance(x, Same):
        return x.value
    if isinstance(x, list) and len(x) == nproc:
        return x[rank]
    return x


def placement_groups(sets: list[list[str]], nproc: int, *, cpus: float, gpus: float):
    """One ready placement group per set: nproc bundles, each with room for one process of every role
    in the set. Returns {role: (placement group, the role's share of a bundle's CPUs and GPUs)}."""
    import ray
    from ray.util.placement_group import placement_group

    out = {}
    for roles in sets:
        bundle = {"CPU": cpus * len(roles)}
        if gpus:
            bundle["GPU"] = gpus
        pg = placement_group([dict(bundle) for _ in range(nproc)], strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=120)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(pg)
            have = ray.cluster_resources()
            raise RoleFailed(
                f"placement=ray: the cluster cannot place {', '.join(roles)}: {nproc} bundles of {bundle} "
                f"(the cluster has {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs, some taken by the "
                "other roles); lower ray.processes or ray.cpus_per_process, or give the cluster more"
            ) from None
        for role in roles:
            out[role] = (pg, cpus, gpus / len(roles) if gpus else 0.0)
    return out
