"""The one place where settings are read.

Defaults live in the Flower run config (`[tool.flwr.app.config]` in pyproject.toml), so a
`flwr run .` and a `fedrec` command see the same values. Every entry point turns a run-config
mapping into a `Config` here, which checks names, types and ranges once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

PARTITIONS = ("user", "iid", "skew", "devices")  # devices: clients bring their own data (deployment)
STRATEGIES = ("fedavg", "fedadam")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")
ATTACKS = ("none", "scale", "sign-flip", "random", "nan", "target")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
DP_UNITS = ("user", "window")  # what local DP-SGD samples, clips and protects
DATASETS = ("synthetic", "ml-100k", "ml-1m", "ml-latest-small", "ml-latest", "seq", "inter", "csv")
SEED_LIMIT = 2**32  # what np.random.seed accepts, and within torch.manual_seed's range
# Sizes far beyond any data set or device (a model with these would not fit in memory): refused
# here with one line rather than failing in numpy or torch with a traceback or an allocation error.
SIZE_LIMITS = {"max_len": 100_000, "embedding_dim": 65_536, "hidden_dim": 65_536,
               "synthetic_users": 100_000_000, "synthetic_items": 100_000_000, "synthetic_max_len": 100_000}


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str
    data_dir: str
    kcore: int
    min_rating: float
    max_len: int
    window_stride: int
    mask_history: bool
    seed: int
    csv_sep: str
    csv_user_col: str
    csv_item_col: str
    csv_time_col: str
    csv_rating_col: str
    synthetic_users: int
    synthetic_items: int
    synthetic_groups: int
    synthetic_min_len: int
    synthetic_max_len: int
    embedding_dim: int
    hidden_dim: int
    dropout: float
    tie_weights: bool
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    optimizer: str
    lr_schedule: str
    num_server_rounds: int
    partition: str
    num_clients: int
    skew_alpha: float
    holdout_users: float
    fraction_train: float
    min_train_nodes: int
    fraction_evaluate: float
    local_epochs: int
    server_strategy: str
    server_lr: float
    aggregation: str
    byzantine_fraction: float
    max_update_norm: float
    update_norm_factor: float
    eval_every: int
    round_timeout: float
    out_dir: str
    resume: bool
    dp: bool
    dp_unit: str
    noise_multiplier: float
    target_epsilon: float
    delta: float
    max_grad_norm: float
    central_dp: bool
    central_noise_multiplier: float
    central_target_epsilon: float
    central_clip: float
    central_clip_quantile: float
    central_clip_lr: float
    distributed_dp: bool
    secagg: bool
    secagg_num_shares: int
    secagg_reconstruction_threshold: int
    secagg_max_weight: float
    attack: str
    attack_fraction: float
    attack_scale: float
    target_item: str

    def __post_init__(self) -> None:
        self._check_numbers()
        _check(self.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        for name, allowed in (("partition", PARTITIONS), ("server_strategy", STRATEGIES), ("optimizer", OPTIMIZERS),
                              ("lr_schedule", LR_SCHEDULES), ("aggregation", AGGREGATIONS), ("attack", ATTACKS),
                              ("dp_unit", DP_UNITS)):
            _check(getattr(self, name) in allowed,
                   f"{_key(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("num_server_rounds", "num_clients", "local_epochs", "eval_every", "server_lr", "skew_alpha",
                     "round_timeout"):
            _check(getattr(self, name) > 0, f"{_key(name)} must be positive, got {getattr(self, name)}")
        _check(0 < self.fraction_train <= 1,
               f"fraction-train must be in (0, 1] (0 would train nothing), got {self.fraction_train}")
        _check(0 <= self.fraction_evaluate <= 1, f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        _check(0 <= self.holdout_users < 1, f"holdout-users must be in [0, 1), got {self.holdout_users}")
        _check(self.min_train_nodes >= 1, f"min-train-nodes must be >= 1, got {self.min_train_nodes}")
        for name in ("max_len", "embedding_dim", "hidden_dim", "epochs", "batch_size",
                     "synthetic_users", "synthetic_items", "synthetic_groups", "synthetic_min_len"):
            _check(getattr(self, name) > 0, f"{_key(name)} must be positive, got {getattr(self, name)}")
        for name in ("kcore", "patience", "min_rating", "weight_decay", "noise_multiplier"):
            _check(getattr(self, name) >= 0, f"{_key(name)} must be >= 0, got {getattr(self, name)}")
        _check(0 <= self.window_stride <= self.max_len,
               f"window-stride must be from 0 (max-len) to max-len ({self.max_len}), got {self.window_stride}")
        _check(not self.dp or self.dp_unit == "user" or self.stride == self.max_len,
               f"dp-unit = window needs window-stride 0 or max-len ({self.max_len}): overlapping windows share "
               f"items, so one window's ε would not bound what a user's overlapping windows reveal together")
        _check(self.synthetic_min_len >= 3, "synthetic-min-len must be >= 3 (leave-one-out needs 3 items)")
        _check(self.synthetic_max_len >= self.synthetic_min_len, "synthetic-max-len must be >= synthetic-min-len")
        _check(self.synthetic_groups <= self.synthetic_items, "synthetic-groups must be <= synthetic-items")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        _check(self.max_grad_norm > 0, f"max-grad-norm must be positive, got {self.max_grad_norm}")
        _check(self.central_clip > 0, f"central-clip must be positive, got {self.central_clip}")
        _check(0 <= self.central_clip_quantile < 1,
               f"central-clip-quantile must be in [0, 1) (0: fixed clipping), got {self.central_clip_quantile}")
        _check(self.central_clip_lr > 0, f"central-clip-lr must be positive, got {self.central_clip_lr}")
        _check(self.central_noise_multiplier >= 0,
               f"central-noise-multiplier must be >= 0, got {self.central_noise_multiplier}")
        _check(not self.central_dp or self.central_noise_multiplier > 0 or self.central_target_epsilon > 0,
               "with central-dp on, set central-target-epsilon > 0 or central-noise-multiplier > 0")
        _check(not self.distributed_dp or (self.central_dp and self.secagg and self.central_clip_quantile == 0),
               "distributed-dp needs central-dp and secagg on and fixed clipping (central-clip-quantile = 0): "
               "the clients add the noise, SecAgg+ hides each one's share, and adaptive clipping's count "
               "would need noise of its own")
        _check(not self.distributed_dp or self.min_train_nodes >= 2,
               f"distributed-dp needs min-train-nodes >= 2 (each client adds 1/min-train-nodes of the noise variance), "
               f"got {self.min_train_nodes}")
        _check(self.secagg_num_shares > 2, f"secagg-num-shares must be > 2, got {self.secagg_num_shares}")
        _check(2 <= self.secagg_reconstruction_threshold < self.secagg_num_shares,
               "secagg-reconstruction-threshold must be >= 2 and < secagg-num-shares, "
               f"got {self.secagg_reconstruction_threshold}")
        _check(self.secagg_max_weight >= 0, f"secagg-max-weight must be >= 0, got {self.secagg_max_weight}")
        _check(not self.secagg or self.partition != "devices" or self.central_dp or self.secagg_max_weight > 0,
               "secagg with deployed clients (partition = devices) needs secagg-max-weight > 0: "
               "at least the windows of the largest client (the server cannot count them)")
        _check(0 <= self.byzantine_fraction < 0.5,
               f"byzantine-fraction must be in [0, 0.5), got {self.byzantine_fraction}")
        _check(0 <= self.attack_fraction <= 1, f"attack-fraction must be in [0, 1], got {self.attack_fraction}")
        for name in ("max_update_norm", "update_norm_factor", "attack_scale"):
            _check(getattr(self, name) >= 0, f"{_key(name)} must be >= 0, got {getattr(self, name)}")
        robust = self.aggregation != "fedavg"
        _check(not robust or (self.server_strategy == "fedavg" and not self.central_dp and not self.secagg),
               f"aggregation = {self.aggregation} needs server-strategy = fedavg, central-dp off and secagg off "
               "(it must see each update, and central DP's noise is calibrated to a mean)")
        _check(self.attack != "target" or self.target_item != "", "attack = target needs target-item (a raw item id)")
        _check(self.attack == "none" or self.partition != "devices",
               "attacks are simulated by the in-process engine only, not with deployed clients")
        _check(not self.dp or self.target_epsilon > 0,
               "with dp on, target-epsilon must be > 0: it is the budget every client keeps to")

    @property
    def stride(self) -> int:
        """Items between the ends of a user's training windows (`window-stride`, 0: max-len)."""
        return self.window_stride or self.max_len

    def _check_numbers(self) -> None:
        """NaN, infinities, a seed out of range and absurd sizes fail late and obscurely (NaN scores,
        Opacus's accountant looping forever, numpy asking for terabytes): refuse them first."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "float":
                _check(math.isfinite(value), f"{_key(field.name)} must be a finite number, got {value}")
            if field.name in SIZE_LIMITS:
                _check(value <= SIZE_LIMITS[field.name],
                       f"{_key(field.name)} must be at most {SIZE_LIMITS[field.name]:,}, got {value:,}")
        _check(0 <= self.seed < SEED_LIMIT, f"seed must be an integer from 0 to {SEED_LIMIT - 1}, got {self.seed}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> Config:
        """Build from a Flower run config (hyphenated keys) over the defaults, then overrides.

        Overrides use hyphenated keys too; a `None` override means "keep the default", which is
        what an unset command-line option passes.
        """
        merged = {**defaults(), **dict(run_config)}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return _parsed(cls, tuple(sorted(merged.items())))
        except TypeError:  # an unhashable value: parse it uncached, for the clear error
            return cls._parse(merged)

    @classmethod
    def _parse(cls, merged: Mapping[str, Any]) -> Config:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in merged.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise ConfigError(_unknown(str(key), [_key(f) for f in fields]))
            values[name] = _coerce(key, value, fields[name].type)
        missing = set(fields) - set(values)
        _check(not missing, f"missing settings: {', '.join(sorted(_key(m) for m in missing))}")
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}


@functools.lru_cache(maxsize=64)
def _parsed(cls: type[Config], items: tuple[tuple[str, Any], ...]) -> Config:
    """Cached: a simulation parses the same run config for every one of thousands of messages."""
    return cls._parse(dict(items))


def defaults() -> dict[str, Any]:
    """The `[tool.flwr.app.config]` table of the project's pyproject.toml."""
    return dict(_defaults())


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    """Read once per process: every message of a simulation asks for it."""
    if not PYPROJECT.is_file():
        raise ConfigError(f"{PYPROJECT} not found: install fedrec from its source tree (pip install -e .)")
    with PYPROJECT.open("rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def _key(name: str) -> str:
    return name.replace("_", "-")


def _unknown(key: str, known: list[str]) -> str:
    """A misspelt setting would otherwise silently keep its default (a privacy budget, say)."""
    close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
    hint = f": did you mean {close[0]!r}?" if close else " (`fedrec <command> --help` lists the settings)"
    return f"unknown setting {key!r}{hint}"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _coerce(key: str, value: Any, kind: str) -> Any:
    """Accept the types a run config may carry (a CLI string, an int for a float, ...)."""
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {kind}, got {value!r}") from None
