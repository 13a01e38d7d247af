"""Checks that a federated run can make progress, made before its first round.

A run that could never aggregate must refuse to start: Flower's sampler waits forever for more
nodes than a simulation has, Bulyan skips every round it has too few replies for, and clients
whose fixed σ cannot keep the target ε decline every round. Each would otherwise end (or hang)
with an untrained model and no clear word why.
"""

from __future__ import annotations

from common.config import Config, ConfigError
from common.federation import Federation, client_dp_populations
from common.privacy import check_plan
from server.central_dp import sampled_per_round


def check(cfg: Config, fed: Federation, clients: int) -> None:
    """Raise ConfigError for a run of `clients` nodes that could never aggregate a round."""
    if cfg.partition == "devices":
        return  # deployed: the nodes are not known before they connect; Flower waits for min-train-nodes
    if clients < cfg.min_train_nodes:
        raise ConfigError(f"min-train-nodes is {cfg.min_train_nodes} but the run has {clients} client(s) "
                          f"(partition {cfg.partition}): no round could ever start; lower --min-train-nodes "
                          "or give the run more clients")
    sampled = sampled_per_round(cfg, clients)
    byzantine = int(cfg.byzantine_fraction * sampled)
    if cfg.aggregation == "bulyan" and sampled < 4 * byzantine + 3:
        raise ConfigError(f"bulyan needs at least {4 * byzantine + 3} replies a round (4 x {byzantine} assumed "
                          f"malicious + 3) but a round samples {sampled}: raise --fraction-train or "
                          "--min-train-nodes, or choose another --aggregation")
    if cfg.dp:
        epochs = cfg.num_server_rounds * cfg.local_epochs
        check_plan(cfg, [(units, epochs) for units in set(client_dp_populations(fed, cfg))])
