"""KL coefficient (beta) controllers for the per-token penalty r_t = -beta * kl_t.

The trainer reads `controller.value` when it builds the rewards of a batch, then calls
`controller.update(kl, n_steps)` with that batch's measured KL(pi_theta || pi_ref) (summed over the
response, mean over sequences, as lm-human-preferences does) and the number of episodes it covered.
Both controllers have `state_dict()` / `load_state_dict()` holding plain floats, so a checkpoint can
store them in JSON and a resumed run continues with the same beta.
"""

from __future__ import annotations

import math


class FixedKLController:
    """A constant beta; `update` does nothing (Ziegler et al. 2019, Sec. 2.2, without the adaptive schedule)."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL to `target` (Ziegler et al. 2019, Sec. 2.2):

        e_t       = clip(KL_t / target - 1, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    Too much KL (e > 0) raises beta, too little lowers it, by at most 20% of n_steps / horizon per
    update. OpenAI's defaults for the stylistic tasks: init 0.15, target 6, horizon 10000
    (detail 20 of Huang et al. 2023, "The N Implementation Details of RLHF with PPO").
    `n_steps` is the number of episodes (sequences) the KL was measured on, the batch size.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if not target > 0:
            raise ValueError(f"KL target must be positive, got {target}")
        if not horizon > 0:
            raise ValueError(f"KL horizon must be positive, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """beta *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon.

        A non-finite KL (the run has diverged) raises ValueError instead of turning beta into nan.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"adaptive KL controller got a non-finite KL ({current_kl})")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The current beta, plus target and horizon for the record."""
        return {"value": self.value, "target": self.target, "horizon": float(self.horizon)}

    def load_state_dict(self, state: dict) -> None:
        """Restores beta. target and horizon stay those of the constructor (the run's config), so a
        resumed run may change them on purpose; the saved ones are informational."""
        self.value = float(state["value"])


def adapt_penalty(beta: float, kl: float, target: float, factor: float = 2.0, band: float = 1.5) -> float:
    """The adaptive coefficient of PPO's KL-penalised objective (Schulman et al. 2017, Sec. 4):
    after an update whose measured KL(pi_old, pi) is d,

        d > target * band   ->  beta * factor   (the policy moved too far: penalise more)
        d < target / band   ->  beta / factor   (it barely moved: penalise less)
        otherwise           ->  beta

    The paper's band 1.5 and factor 2 ("the parameters 1.5 and 2 above are chosen heuristically,
    but the algorithm is not very sensitive to them"). A non-finite d raises ValueError."""
    kl = float(kl)
    if not math.isfinite(kl):
        raise ValueError(f"adaptive KL penalty got a non-finite KL ({kl})")
    if not (target > 0 and factor > 1 and band > 1):
        raise ValueError(f"need target > 0, factor > 1 and band > 1, got {target}, {factor}, {band}")
    if kl > target * band:
        return beta * factor
    if kl < target / band:
        return beta / factor
    return beta


class PenaltyController:
    """beta of PPO's KL-penalised objective: `value` during an update, `update(kl)` after it
    (`adapt_penalty`); `state_dict` / `load_state_dict` for checkpoints."""

    def __init__(self, init_beta: float, target: float, factor: float = 2.0, band: float = 1.5):
        adapt_penalty(init_beta, target, target, factor, band)  # checks the settings
        self.value, self.target, self.factor, self.band = float(init_beta), float(target), float(factor), float(band)

    def update(self, kl: float) -> float:
        self.value = adapt_penalty(self.value, kl, self.target, self.factor, self.band)
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def make_kl_controller(coef: float, target: float | None, horizon: int) -> FixedKLController | AdaptiveKLController:
    """Fixed beta = coef when `target` is None, else adaptive from coef towards `target`."""
    if target is None:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target, horizon)
