"""What inversion says about one position (``collide.invert.sipit`` finds it, ``collide.invert.context`` decides
its alternatives, ``collide.invert.output`` writes it). Distances are L2 (not squared), fp64."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Alternative:
    """Another token (the first of its identical-row group) whose state was also within ε at a position."""

    token: int
    distance: float  # L2 from the target to its state, fp64
    # excluded: with it in place, a later position had no candidate within ε (the whole vocabulary verified there);
    # consistent: with it in place, the recovered rest of the prompt still lies within ε at every later position;
    # open: neither shown (not checked, or a later position fits another token after it)
    status: str = "open"
    at: Optional[int] = None  # the later position that decided (excluded) or first did not fit the recovered token
    note: str = ""  # how it was decided, in words


@dataclass
class PositionResult:
    """What happened at one position (distances L2, not squared, fp64)."""

    position: int  # 0-based index in the prompt
    token: int  # the accepted token (the first of its identical-row group), or the best candidate if not recovered
    group: list[int]  # every token whose input-embedding row is bitwise identical to ``token``'s
    recovered: bool  # ``token`` is within ε (and, after the whole prompt, no later position missed after it)
    distance: float  # distance from the target to ``token``'s state
    epsilon: float  # the acceptance radius used
    tried: int  # candidates verified (distinct input rows)
    best_rejected: Optional[float]  # smallest distance among the other tried candidates (None if none)
    margin: Optional[float] = None  # exhaustive: distance to the nearest other token's state (Δ)
    certified: Optional[bool] = None  # exhaustive: Δ > 2ε, ``token`` is the only one within ε
    known: bool = False  # the position held the tokenizer's BOS and was verified, not searched
    seconds: float = 0.0  # wall time spent on this position
    epsilon_noise: float = 0.0  # the noise radius: a candidate within it ends the search (see ``radii``)
    # the other verified tokens within ε, nearest first, each with what the later positions said of it
    alternatives: list[Alternative] = field(default_factory=list)

    @property
    def ratio(self) -> Optional[float]:
        """distance / best_rejected: how much closer the accepted state is than the best other one."""
        if self.best_rejected is None or self.best_rejected == 0:
            return None
        return self.distance / self.best_rejected

    @property
    def ties(self) -> list[int]:
        """The alternatives not excluded: tokens the states do not tell apart from ``token`` at this ε."""
        return [a.token for a in self.alternatives if a.status != "excluded"]

    @property
    def unique(self) -> bool:
        """Recovered within the noise radius, and every other verified candidate within ε excluded."""
        return self.recovered and self.distance <= self.epsilon_noise and not self.ties
