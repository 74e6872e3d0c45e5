"""Which parts of the self-distillation objective are on, and their settings.

`SelfKDConfig` is what `selfkd_tf.distillation.losses.selfkd_loss` and
`selfkd_tf.distillation.model.SelfKDModel` read: the methods and their
hyperparameters, with the defaults of the paper and of the reference code
(PS-KD's ``a_T = 0.8``; BYOT's ``a = 0.1``, ``lambda = 1e-6``, ``T = 3``).

The paper's methods (`METHODS`) are PS-KD, BYOT and DMFL. Two controls
(`CONTROLS`) answer whether they are more than the simplest alternatives:

- ``"ls"``, label smoothing (Szegedy et al., "Rethinking the Inception
  Architecture", CVPR 2016, Sec. 7): the one-hot label becomes
  ``(1 - eps) onehot(y) + eps / C``, a fixed softening where PS-KD's is
  learned. It softens the targets of every cross-entropy term, so it
  combines with BYOT, deep supervision and DMFL; with PS-KD, which softens
  the same target with the network's own predictions, it is refused.
- ``"ds"``, deep supervision (Lee et al., "Deeply-Supervised Nets", AISTATS
  2015): every exit learns from the targets by cross-entropy, with no
  distillation. It is BYOT's objective without its two distillation terms
  (the KL to the deepest exit and the feature hint), the same
  ``(1 - a)``-weighted cross-entropies of the same exits, so a ``ds`` run
  differs from a ``byot`` run only in the distillation; the two are refused
  together.
"""

from __future__ import annotations

import dataclasses

METHODS = ("pskd", "byot", "dmfl")
"""The paper's methods, and the default: the full method."""
CONTROLS = ("ls", "ds")
"""Label smoothing and deep supervision, the simplest alternatives."""
ALL_METHODS = ("pskd", "ls", "byot", "ds", "dmfl")
"""Every method and control, in their canonical order."""
EXCLUSIVE = (("pskd", "ls"), ("byot", "ds"))
"""Pairs of methods that change the same part of the objective."""
PSKD_TEACHERS = ("deepest", "ensemble")
DMFL_GRADIENTS = ("mutual", "none")


_EXCLUSIVE_WHY = {
    ("pskd", "ls"): "both soften the label in the target",
    ("byot", "ds"): "ds is BYOT without its distillation terms",
}


@dataclasses.dataclass(frozen=True)
class SelfKDConfig:
    """Which parts of the objective are on, and their hyperparameters.

    Args:
        methods: subset of ``("pskd", "ls", "byot", "ds", "dmfl")`` (the
            paper's methods and the two controls, see the module
            docstring); empty is the baseline (deepest-exit cross-entropy
            with one-hot labels).
        pskd_alpha: ``a_T``, the final weight of the network's own previous
            prediction in the soft target.
        pskd_teacher: which prediction is stored for the next epoch:
            ``"deepest"`` (softmax of the deepest exit, as PS-KD does) or
            ``"ensemble"`` (mean of all exits' softmax).
        label_smoothing: ``eps`` of ``"ls"``, in ``[0, 1)``; 0.1 as in
            Szegedy et al. (2016).
        byot_alpha: weight ``a`` of the distillation term in BYOT; deep
            supervision weighs its cross-entropies ``1 - a`` as BYOT does.
        byot_lambda: weight ``lam`` of the feature hint term in BYOT.
        temperature: softening temperature ``T`` of the BYOT KL term.
        byot_exits: 1-based indices of the shallow exits that get BYOT (or
            deep supervision) terms; ``None`` means all shallow exits.
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
    label_smoothing: float = 0.1
    byot_alpha: float = 0.1
    byot_lambda: float = 1e-6
    temperature: float = 3.0
    byot_exits: tuple[int, ...] | None = None
    dmfl_gradient: str = "mutual"

    def __post_init__(self):
        methods = tuple(self.methods)
        unknown = sorted(set(methods) - set(ALL_METHODS))
        if unknown:
            raise ValueError(
                f"methods: unknown {unknown}; allowed: {', '.join(ALL_METHODS)}."
            )
        for first, second in EXCLUSIVE:
            if first in methods and second in methods:
                raise ValueError(
                    f"methods: {first} and {second} change the same part of the "
                    f"objective ({_EXCLUSIVE_WHY[first, second]}); choose one.")
        # Canonical order keeps names, configs and run labels stable.
        object.__setattr__(
            self, "methods", tuple(m for m in ALL_METHODS if m in methods)
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
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing: must be in [0, 1); got {self.label_smoothing}.")
        if not 0.0 <= self.byot_alpha <= 1.0:
            raise ValueError(f"byot_alpha: must be in [0, 1]; got {self.byot_alpha}.")
        if self.byot_lambda < 0:
            raise ValueError(f"byot_lambda: must be >= 0; got {self.byot_lambda}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0; got {self.temperature}.")

    def uses(self, method: str) -> bool:
        return method in self.methods

    def trains_shallow_exits(self) -> bool:
        """Whether the shallow exits learn: BYOT or deep supervision."""
        return self.uses("byot") or self.uses("ds")

    def check_num_exits(self, num_exits: int) -> None:
        """Refuses methods that need shallow exits on a network without any.

        BYOT, deep supervision and DMFL compare each shallow exit with the
        deepest; with one exit they would be empty (DMFL a 0 / 0).

        Raises:
            ValueError: ``"methods: ..."``, one line.
        """
        needing = [m for m in self.methods if m in ("byot", "ds", "dmfl")]
        if num_exits < 2 and needing:
            raise ValueError(
                f"methods: {', '.join(needing)} compare shallow exits with the deepest; "
                f"a network with {num_exits} exit has none (use pskd or ls, or none)")

    def shallow_byot_exits(self, num_exits: int) -> tuple[int, ...]:
        """The 1-based shallow exits that get BYOT (or deep supervision)
        terms, checked against N."""
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

