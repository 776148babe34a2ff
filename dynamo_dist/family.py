"""Architecture families: the one interface behind every "recurrent or convolutional" decision.

A family is what base models of some architectures have in common for DYNAMO: how their
hidden states are shaped, which meta-model emulates them, how the objective and the analyses
read their states, how their trajectories are laid out on disk. Everything else in the package
asks the family of a model (``get(name)``, ``of_arch(arch)``) instead of naming one, so adding
a family is one new module: a ``Family`` subclass and a ``register`` call. The built-in ones,
``rnn`` (``dynamo_dist.families.rnn``) and ``cnn`` (``dynamo_dist.families.cnn``), are found on
first use, as plugins are; another family is registered by importing its module.

A family's name is written into trajectory files (``dynamo.family``), checkpoints and run
states, so it is the name that stays, not the class.

Shape legend: B batch, T steps, H hidden units (a tap's width), M meta hidden units.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BUILTIN = ("dynamo_dist.families.rnn", "dynamo_dist.families.cnn")  # modules that register the built-in families

# How ``data.store`` lays a family's trajectories out in Parquet rows (the store owns the layout):
STEP_ROWS = "steps"  # one row per (example, step): one tap, its state and the output at that step
TAP_ROWS = "taps"    # one row per (example, tap): the tap's whole state; one output per example


class Family:
    """What differs between architecture families; one instance per family, registered by name.

    States: a family's models give ``trajectories(x) -> (hiddens, outputs)`` (``zoo``), per tap
    a batch-first tensor; a "row" of a state is one feature vector of a tap's width (the unit
    the maps V_n act on and the metrics pool over).
    """

    name: str                                   # written to files; "rnn" | "cnn" | a new family's
    archs: tuple[str, ...] = ()                 # manifest arch names of the models this family builds itself
    hooked_arch: str | None = None              # arch name of users' modules of this family read through hooks
    recurrent: bool = False                     # states evolve over the steps of an input sequence (fixed
    #                                             points, word valence, layers/directions apply)
    trajectory_rows: str = STEP_ROWS            # STEP_ROWS | TAP_ROWS: how the store lays its trajectories out

    # ---------------------------------------------------------------- base models

    def check_spec(self, spec) -> None:
        """ValueError naming the field when ``spec`` (a ``zoo.ArchSpec`` of this family) cannot be built."""

    def build(self, spec) -> nn.Module:
        """The base model of ``spec`` (one of ``archs``), freshly initialised."""
        raise NotImplementedError

    def check_population(self, rows: Sequence[Mapping], root: str) -> None:
        """ValueError, saying why, for manifest rows (of this family, files in the population root ``root``)
        that this family's meta-model cannot embed together; footers only, no values read (default: none)."""

    def state_target(self, model: nn.Module, state: Mapping) -> nn.Module:
        """The module of ``build(spec)`` a plain state dict of this family loads into (default: the model)."""
        return model

    # ---------------------------------------------------------------- states

    def hidden_shapes(self, hiddens: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
        """Per tap, the shape of one example's state (batch and, where there is one, time dropped)."""
        raise NotImplementedError

    def tap_width(self, shape: Sequence[int]) -> int:
        """A tap's width (what V_n maps to) from its per-example shape."""
        raise NotImplementedError

    def step_mask(self, lengths_B: torch.Tensor, num_steps: int) -> torch.Tensor | None:
        """The valid-step mask (B, T) of a batch of ``lengths``, or None where every row counts."""
        return None

    def state_rows(self, h: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
        """One tap's states as (rows, width), the padded steps left out."""
        raise NotImplementedError

    # V_n of a tap: by default affine in the last axis (states are vectors); a family of feature maps
    # (``cnn``) overrides the three together

    def map_shape(self, base_width: int, meta_width: int) -> tuple[int, ...]:
        """Shape of V_n's weight for one tap (its bias is (base_width,))."""
        return (base_width, meta_width)

    def apply_map(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """V_n of one tap applied to meta states ``h``."""
        return F.linear(h, weight, bias)

    def map_module(self, meta_width: int, base_width: int) -> nn.Module:
        """V_n of one tap as an empty module (on the meta device: its parameters are set by the caller)."""
        return nn.Linear(meta_width, base_width, device="meta")

    def hidden_loss(self, distances: Sequence[torch.Tensor], mask_BT: torch.Tensor | None) -> torch.Tensor:
        """Per-example L_hidden (B,) from the elementwise distances of every tap (paper eq. 2 or 6)."""
        raise NotImplementedError

    def spread(self, deviations: torch.Tensor) -> torch.Tensor:
        """A tap's target spread, in L_hidden's units, from its rows' deviations (rows, width)."""
        raise NotImplementedError

    def last_state(self, maps: Sequence[nn.Module], hiddens: Sequence[torch.Tensor]) -> torch.Tensor:
        """The base model's last hidden state as the meta-model emulates it (V_n applied where read)."""
        raise NotImplementedError

    def activation_taps(self, hiddens: Sequence[torch.Tensor], lengths: torch.Tensor | None = None) -> list:
        """One model's taps as float64 (rows, units) arrays for SVCCA/CKA (``analysis.baseline``)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the meta-model

    def meta_model(self, input_spec, output_sizes: Mapping[str, int], *, embedding_dim: int, hidden_size: int,
                   embed_dim: int, resnet_arch: str, theta_readout: bool, theta_gain: bool = False) -> nn.Module:
        """The meta-model emulating this family's models (``meta.model.build_meta_model``'s shape fields;
        a family reads those it needs). ``theta_readout`` / ``theta_gain``: ways for theta to act beyond the
        input (``MetaRNN``'s FiLM readout and recurrence gain); a family may ignore them."""
        raise NotImplementedError


_FAMILIES: dict[str, Family] = {}
_builtins = {"loaded": False, "loading": False}
_builtins_lock = threading.RLock()  # the store reads footers in threads: none may look before the built-ins are in


def register(family: Family) -> Family:
    """Make ``family`` known by its name and its archs; returns it. A name or arch taken by another
    family is a ValueError (registering the same family again is a no-op)."""
    _load_builtins()
    old = _FAMILIES.get(family.name)
    if old is not None and type(old) is not type(family):
        raise ValueError(f"family: {family.name!r} is registered already ({type(old).__qualname__})")
    taken = {a: f.name for f in _FAMILIES.values() if f.name != family.name for a in _archs(f)}
    clash = sorted(a for a in _archs(family) if a in taken)
    if clash:
        raise ValueError(f"family {family.name!r}: archs {clash} belong to family {taken[clash[0]]!r}")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Forget the family called ``name`` (a plugin's or a test's; the built-in ones come back on no call)."""
    _FAMILIES.pop(name, None)


def _archs(family: Family) -> tuple[str, ...]:
    return tuple(family.archs) + ((family.hooked_arch,) if family.hooked_arch else ())


def _load_builtins() -> None:
    if _builtins["loaded"]:
        return
    with _builtins_lock:
        if _builtins["loaded"] or _builtins["loading"]:  # loading: a built-in module's own ``register``
            return
        _builtins["loading"] = True
        try:
            for module in BUILTIN:  # in this order, whichever module asked first
                importlib.import_module(module)
            _builtins["loaded"] = True
        finally:
            _builtins["loading"] = False


def names() -> list[str]:
    _load_builtins()
    return list(_FAMILIES)


def get(name: str) -> Family:
    """The family called ``name``; ValueError for one never registered."""
    _load_builtins()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"family: unknown model family {name!r} ({' | '.join(_FAMILIES)})") from None


def of_arch(arch: str) -> Family | None:
    """The family whose models a manifest's ``arch`` names, None for an arch no family knows."""
    _load_builtins()
    return next((f for f in _FAMILIES.values() if arch in _archs(f)), None)


def known_archs() -> tuple[str, ...]:
    """Every arch a family builds itself (users' hooked archs left out), in registration order."""
    _load_builtins()
    return tuple(a for f in _FAMILIES.values() for a in f.archs)
