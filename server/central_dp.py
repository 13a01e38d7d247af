"""User-level central DP: every client's whole update clipped, Gaussian noise on the average.

Flower's `DifferentialPrivacyClientSideFixedClipping` does the mechanism: it sends the clipping
norm with each training instruction, the client's `fixedclipping_mod` clips the update before
it leaves the device, and the server adds noise of std σ·C/m to the average of the m sampled
clients. The average must be uniform (each client weighs 1), or one client could weigh more
than C/m; the wrapped FedAvg therefore weighs replies by `common.privacy.UNIT_WEIGHT` (always 1).

fedrec accounts the release (Flower's accountant only takes no-amplification accounting): each
round is a subsampled Gaussian mechanism over clients, sampled m of N, accounted with the PRV
accountant as Poisson sampling at q = m/N (the usual approximation of fixed-size sampling).
Every round counts, aggregated or not, so ε is never under-stated.

A server optimizer (`server-strategy = fedadam`) steps on the noised average, after the noise:
post-processing, so the guarantee is unchanged (`NoisedFedAdam`).

What it protects: all of one client's data (for one user per client: one user) against
everyone who sees the released models, assuming the server adds the noise honestly.

Distributed DP (`distributed-dp`, with SecAgg+) removes that assumption: each client adds
N(0, (σC)² / m_min) to its clipped update before SecAgg+ masks it (m_min = `min-train-nodes`, the
fewest survivors a round aggregates with), the server adds nothing and sees only the noised sum.
With m ≥ m_min survivors the sum holds noise of variance m/m_min · (σC)² ≥ (σC)², so the ε
accounted for σ holds (a bound: more survivors add more noise than it counts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, Strategy
from opacus.accountants.utils import get_noise_multiplier

from common.config import Config, ConfigError
from common.flower_compat import AdaptiveClipping
from common.memo import cached
from common.privacy import Ledger, quiet_opacus


def sampled_per_round(cfg: Config, num_clients: int) -> int:
    """As Flower's FedAvg samples: fraction-train of the clients, at least min-train-nodes."""
    return max(int(num_clients * cfg.fraction_train), cfg.min_train_nodes)


def sample_rate(cfg: Config, num_clients: int) -> float:
    """The share of clients sampled per round, accounted as Poisson q."""
    return min(sampled_per_round(cfg, num_clients) / num_clients, 1.0)


@cached(16)
def noise_multiplier(cfg: Config, num_clients: int) -> float:
    """σ given outright, or the smallest that keeps all rounds within central-target-epsilon."""
    if cfg.central_noise_multiplier > 0:
        return cfg.central_noise_multiplier
    with quiet_opacus():
        return float(get_noise_multiplier(target_epsilon=cfg.central_target_epsilon, target_delta=cfg.delta,
                                          sample_rate=sample_rate(cfg, num_clients), steps=cfg.num_server_rounds,
                                          accountant="prv", epsilon_tolerance=0.05))


def wrap(strategy: Strategy, cfg: Config, num_clients: int) -> Strategy:
    """Flower's client-side clipping wrapper, fixed or adaptive (`central-clip-quantile` > 0: the
    norm tracks that quantile of the update norms, so that share of the updates passes unclipped).

    The adaptive one (Andrew et al.) also releases a noised count of the clients that clipped.
    Flower splits the given σ between that count (std `m / 20`) and the update so that the two
    together are one Gaussian mechanism of noise multiplier σ: the ε accounted for σ holds."""
    sigma, sampled = noise_multiplier(cfg, num_clients), sampled_per_round(cfg, num_clients)
    if cfg.distributed_dp:  # the clients add the noise (client_noise_std): the wrapper only sends the norm
        return DifferentialPrivacyClientSideFixedClipping(strategy, 0.0, cfg.central_clip, sampled)
    if cfg.central_clip_quantile <= 0:
        return DifferentialPrivacyClientSideFixedClipping(strategy, sigma, cfg.central_clip, sampled)
    if sigma >= sampled / 10:  # Flower's bound: σ < 2 x the count's std, m / 20
        raise ConfigError(f"adaptive clipping cannot reach central noise multiplier {sigma:.3g} with {sampled} clients "
                          f"a round (it needs σ < clients / 10): sample more clients a round, or set "
                          "central-clip-quantile = 0 for fixed clipping")
    return AdaptiveClipping(strategy, sigma, sampled, initial_clipping_norm=cfg.central_clip,
                            target_clipped_quantile=1 - cfg.central_clip_quantile, clip_norm_lr=cfg.central_clip_lr)


def client_noise_std(cfg: Config, num_clients: int) -> float:
    """Under distributed DP, the std of the noise each client adds to every weight: σC/√m_min,
    so that any m_min survivors together add the central mechanism's σC."""
    return noise_multiplier(cfg, num_clients) * cfg.central_clip / math.sqrt(cfg.min_train_nodes)


def clipping_norm(strategy: Strategy) -> float | None:
    """The adaptive clipping norm reached so far (it moves every round), for the checkpoint and
    summary; None with fixed clipping or without central DP."""
    dp = getattr(strategy, "dp", strategy)
    return float(dp.clipping_norm) if isinstance(dp, AdaptiveClipping) else None


def restore_clipping_norm(strategy: Strategy, norm: float) -> None:
    getattr(strategy, "dp", strategy).clipping_norm = norm


class _NoisedAverage(FedAvg):
    """FedAvg whose average is the central-DP wrapper's: the clipped updates' mean with the noise
    already on it. Mixed in under a Flower server optimizer, that optimizer steps on the noised
    average, which is post-processing and keeps the guarantee. Flower's wrapper around the
    optimizer instead would add its noise after the step, to a quantity whose sensitivity is no
    longer C/m (Adam divides by its second moment)."""

    dp: Strategy  # DifferentialPrivacyClientSideFixedClipping over a plain FedAvg

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.dp.configure_train(server_round, arrays, config, grid)  # sends the clipping norm

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.dp.aggregate_train(server_round, replies)


class NoisedFedAdam(FedAdam, _NoisedAverage):
    """Flower's FedAdam stepping on the central-DP noised average (its `super()` average, by the
    method order FedAdam → FedOpt → _NoisedAverage → FedAvg), with Adam's τ at the noise floor.

    Adam divides each weight's step by √v + τ. Where a weight gets no signal, an item row no user
    of the round touched, v is the noise's own variance, so with Flower's τ = 10⁻³ (below the noise
    std of a large cohort's average) every such weight takes a large step in a random direction each
    round, and the rare items' embeddings random-walk away (with Flower's τ, user-level DP on Beauty
    stalled at popularity level from round 20: BENCHMARKS.md, tuning record). τ = `TAU_NOISE_FLOOR`
    × the noise std keeps those steps at most about η / 2, while weights whose signal clears the
    noise still get Adam's scaling. Ten times the std was too much: the embedded default's test
    NDCG@10 fell from 0.285 (once the std) to 0.133, popularity level; on Beauty at ε = 8, 0.0079
    once the std against 0.0065 ten times it.
    """

    noise_multiplier: float  # the central mechanism's σ (the clients' together, under distributed DP)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        noise_std = self.noise_multiplier * self.dp.clipping_norm / self.dp.num_sampled_clients
        self.tau = max(FLOWER_TAU, TAU_NOISE_FLOOR * noise_std)
        return super().aggregate_train(server_round, replies)


FLOWER_TAU = 1e-3  # FedAdam's default
TAU_NOISE_FLOOR = 1.0


def with_server_adam(cfg: Config, num_clients: int, **common: Any) -> Strategy:
    """FedAdam (η = `server-lr`) after central DP's noise: the server optimizer of user-level DP-FedAvg."""
    strategy = NoisedFedAdam(eta=cfg.server_lr, tau=FLOWER_TAU, **common)
    strategy.dp = wrap(FedAvg(**common), cfg, num_clients)
    strategy.noise_multiplier = noise_multiplier(cfg, num_clients)
    return strategy


def ledger(cfg: Config, num_clients: int, rounds: int) -> Ledger:
    """The server's release history: `rounds` subsampled Gaussian mechanisms."""
    mechanism = (noise_multiplier(cfg, num_clients), sample_rate(cfg, num_clients), rounds)
    return Ledger((mechanism,)) if rounds else Ledger()


def guarantee(cfg: Config, num_clients: int, rounds: int) -> dict:
    """summary.json's statement of the central guarantee."""
    spent = ledger(cfg, num_clients, rounds)
    return {"enabled": True, "epsilon": spent.epsilon(cfg.delta), "delta": cfg.delta,
            "noise_multiplier": noise_multiplier(cfg, num_clients), "clipping_norm": cfg.central_clip,
            "clipping": (f"adaptive: from {cfg.central_clip:g} towards the {cfg.central_clip_quantile:g} quantile "
                         f"of the update norms, learning rate {cfg.central_clip_lr:g}"
                         if cfg.central_clip_quantile > 0 else "fixed"),
            "sample_rate": spent.history[0][1] if spent.history else None, "rounds": rounds,
            "history": [list(h) for h in spent.history], "accountant": "prv",
            "noise": (f"distributed: each client adds N(0, (σC)²/{cfg.min_train_nodes}) to its clipped update "
                      "before SecAgg+ masks it; the server adds none and sees only the noised sum"
                      if cfg.distributed_dp else "central: the server adds N(0, (σC/m)²) to the average"),
            "unit": ("one user's whole history (one user per client: its whole update in every round)"
                     if cfg.partition == "user" else
                     "all of one client's data (its whole update in every round): a silo's users together"),
            "protects_against": ("everyone who sees the released models, the server included, while at least "
                                 "min-train-nodes clients a round add their share honestly"
                                 if cfg.distributed_dp else
                                 "everyone who sees the released models; assumes the server adds the noise")}
