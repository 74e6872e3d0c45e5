"""Which parts of the self-distillation objective are on, and their settings.

`SelfKDConfig` is what `selfkd_tf.distillation.losses.selfkd_loss` and
`selfkd_tf.distillation.model.SelfKDModel` read: the methods (PS-KD, BYOT,
DMFL) and their hyperparameters, with the defaults of the paper and of the
reference code (PS-KD's ``a_T = 0.8``; BYOT's ``a = 0.1``, ``lambda = 1e-6``,
``T = 3``).
"""

from __future__ import annotations

import dataclasses

METHODS = ("pskd", "byot", "dmfl")
PSKD_TEACHERS = ("deepest", "ensemble")
DMFL_GRADIENTS = ("mutual", "none")


@dataclasses.dataclass(frozen=True)
class SelfKDConfig:
    """Which parts of the objective are on, and their hyperparameters.

    Args:
        methods: subset of ``("pskd", "byot", "dmfl")``; empty is the
            baseline (deepest-exit cross-entropy with one-hot labels).
        pskd_alpha: ``a_T``, the final weight of the network's own previous
            prediction in the soft target.
        pskd_teacher: which prediction is stored for the next epoch:
            ``"deepest"`` (softmax of the deepest exit, as PS-KD does) or
            ``"ensemble"`` (mean of all exits' softmax).
        byot_alpha: weight ``a`` of the distillation term in BYOT.
        byot_lambda: weight ``lam`` of the feature hint term in BYOT.
        temperature: softening temperature ``T`` of the BYOT KL term.
        byot_exits: 1-based indices of the shallow exits that get BYOT
            terms; ``None`` means all shallow exits.
        dmfl_gradient: ``"mutual"`` (the stated method: each direction's
            target is constant, the other side learns) or ``"none"`` (the
            term is computed and logged but passes no gradient, which is
            what the public reference code does).

    Example:

    >>> config = SelfKDConfig(methods=("pskd", "byot"), byot_exits=(2, 3))
    >>> config.uses("dmfl")
    False
    """

    methods: tuple[str, ...] = METHODS
    pskd_alpha: float = 0.8
    pskd_teacher: str = "deepest"
    byot_alpha: float = 0.1
    byot_lambda: float = 1e-6
    temperature: float = 3.0
    byot_exits: tuple[int, ...] | None = None
    dmfl_gradient: str = "mutual"

    def __post_init__(self):
        methods = tuple(self.methods)
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(
                f"methods: unknown {unknown}; allowed: {', '.join(METHODS)}."
            )
        # Canonical order keeps names, configs and run labels stable.
        object.__setattr__(
            self, "methods", tuple(m for m in METHODS if m in methods)
        )
        if self.byot_exits is not None:
            object.__setattr__(
                self, "byot_exits", tuple(sorted({int(i) for i in self.byot_exits}))
            )
            if any(i < 1 for i in self.byot_exits):
                raise ValueError(
                    f"byot_exits: exit indices start at 1; got {self.byot_exits}."
                )
        if self.pskd_teacher not in PSKD_TEACHERS:
            raise ValueError(
                f"pskd_teacher: got {self.pskd_teacher!r}; allowed: "
                f"{', '.join(PSKD_TEACHERS)}."
            )
        if self.dmfl_gradient not in DMFL_GRADIENTS:
            raise ValueError(
                f"dmfl_gradient: got {self.dmfl_gradient!r}; allowed: "
                f"{', '.join(DMFL_GRADIENTS)}."
            )
        if not 0.0 <= self.pskd_alpha <= 1.0:
            raise ValueError(f"pskd_alpha: must be in [0, 1]; got {self.pskd_alpha}.")
        if not 0.0 <= self.byot_alpha <= 1.0:
            raise ValueError(f"byot_alpha: must be in [0, 1]; got {self.byot_alpha}.")
        if self.byot_lambda < 0:
            raise ValueError(f"byot_lambda: must be >= 0; got {self.byot_lambda}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0; got {self.temperature}.")

    def uses(self, method: str) -> bool:
        return method in self.methods

    def shallow_byot_exits(self, num_exits: int) -> tuple[int, ...]:
        """The 1-based shallow exits that get BYOT terms, checked against N."""
        if self.byot_exits is None:
            return tuple(range(1, num_exits))
        too_deep = [i for i in self.byot_exits if i >= num_exits]
        if too_deep:
            raise ValueError(
                f"byot_exits: {too_deep} not a shallow exit of a network with "
                f"{num_exits} exits; allowed: 1..{num_exits - 1}."
            )
        return self.byot_exits

    def get_config(self) -> dict:
        config = dataclasses.asdict(self)
        config["methods"] = list(self.methods)
        if self.byot_exits is not None:
            config["byot_exits"] = list(self.byot_exits)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "SelfKDConfig":
        config = dict(config)
        config["methods"] = tuple(config.get("methods", ()))
        if config.get("byot_exits") is not None:
            config["byot_exits"] = tuple(config["byot_exits"])
        return cls(**config)

