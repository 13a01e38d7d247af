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

What it protects: all of one client's data (for one user per client: one user) against
everyone who sees the released models, assuming the server adds the noise honestly.
"""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from opacus.accountants.utils import get_noise_multiplier

from common.config import Config
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
    return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier(cfg, num_clients), cfg.central_clip,
                                                      sampled_per_round(cfg, num_clients))


def ledger(cfg: Config, num_clients: int, rounds: int) -> Ledger:
    """The server's release history: `rounds` subsampled Gaussian mechanisms."""
    mechanism = (noise_multiplier(cfg, num_clients), sample_rate(cfg, num_clients), rounds)
    return Ledger((mechanism,)) if rounds else Ledger()


def guarantee(cfg: Config, num_clients: int, rounds: int) -> dict:
    """summary.json's statement of the central guarantee."""
    spent = ledger(cfg, num_clients, rounds)
    return {"enabled": True, "epsilon": spent.epsilon(cfg.delta), "delta": cfg.delta,
            "noise_multiplier": noise_multiplier(cfg, num_clients), "clipping_norm": cfg.central_clip,
            "sample_rate": spent.history[0][1] if spent.history else None, "rounds": rounds,
            "history": [list(h) for h in spent.history], "accountant": "prv",
            "unit": "all of one client's data (its whole update in every round)",
            "protects_against": "everyone who sees the released models; assumes the server adds the noise"}
