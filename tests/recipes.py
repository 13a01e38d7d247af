"""Run-config settings the tests share.

`LOCAL_DP` is the recipe most tests of the federation were written for, and the run config's
defaults until user-level central DP became the default private configuration: local DP-SGD on
every client (one window the unit), plain FedAvg, three local epochs, no central DP. Tests of
local DP, of the robust aggregators, of SecAgg+ and of resuming start from it, so that what they
check does not move with the recommended defaults (the model too: width 32, dropout 0.1,
the defaults before the accuracy recipe's width 64 and dropout 0.3).
"""

LOCAL_DP = {"dp": True, "central-dp": False, "central-clip": 1.0, "central-clip-quantile": 0.0,
            "server-strategy": "fedavg", "server-lr": 1.0, "local-epochs": 3, "fraction-train": 0.1,
            "num-server-rounds": 5, "embedding-dim": 32, "hidden-dim": 32, "dropout": 0.1}
