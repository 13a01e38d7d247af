"""Settings refused up front, with one line, instead of failing late, looping or silently ignored."""

from __future__ import annotations

import pytest

from common.config import Config, ConfigError


@pytest.mark.parametrize("key, value, message", [
    ("seed", -1, "seed must be an integer from 0 to 4294967295, got -1"),
    ("seed", 2**64, "seed must be an integer from 0 to 4294967295, got 18446744073709551616"),
    ("lr", "inf", "lr must be a finite number, got inf"),
    ("lr", "nan", "lr must be a finite number, got nan"),
    ("max-grad-norm", "inf", "max-grad-norm must be a finite number, got inf"),
    ("noise-multiplier", "inf", "noise-multiplier must be a finite number, got inf"),  # Opacus loops forever on it
    ("target-epsilon", "-inf", "target-epsilon must be a finite number, got -inf"),
    ("max-len", 2**40, "max-len must be at most 100,000, got 1,099,511,627,776"),
    ("embedding-dim", 2**31, "embedding-dim must be at most 65,536, got 2,147,483,648"),
])
def test_out_of_range_numbers_are_refused(key, value, message):
    with pytest.raises(ConfigError) as error:
        Config.from_run_config({key: value})
    assert str(error.value) == message


def test_seed_bounds_are_accepted():
    assert Config.from_run_config({"seed": 0}).seed == 0
    assert Config.from_run_config({"seed": 2**32 - 1}).seed == 2**32 - 1


def test_unknown_key_is_refused_with_the_closest_valid_one():
    with pytest.raises(ConfigError) as error:
        Config.from_run_config({"target-epsilom": 1})
    assert str(error.value) == "unknown setting 'target-epsilom': did you mean 'target-epsilon'?"
    with pytest.raises(ConfigError, match=r"^unknown setting 'zzz' \(`fedrec <command> --help` lists"):
        Config.from_run_config({}, zzz=1)


def test_every_key_of_a_config_round_trips():
    cfg = Config.from_run_config({"seed": 7})
    assert Config.from_run_config(cfg.to_run_config()) == cfg


def test_the_defaults_are_the_recommended_private_configuration():
    """`fedrec simulate` with no options: user-level central DP, one user per client, adaptive
    clipping, FedAdam on the noised average (BENCHMARKS.md, "What was tried for user-level DP")."""
    cfg = Config.from_run_config({})
    assert (cfg.partition, cfg.central_dp, cfg.dp) == ("user", True, False)
    assert cfg.central_clip_quantile == 0.5 and cfg.server_strategy == "fedadam" and cfg.local_epochs == 1
    assert cfg.central_target_epsilon == 8.0 and cfg.delta == 1e-5


def test_window_stride_is_bounded_by_max_len_and_overlap_needs_user_level_dp():
    assert Config.from_run_config({"max-len": 20, "window-stride": 0}).stride == 20
    assert Config.from_run_config({"max-len": 20, "window-stride": 5, "dp": True, "dp-unit": "user"}).stride == 5
    with pytest.raises(ConfigError, match=r"^window-stride must be from 0 \(max-len\) to max-len \(20\), got 21$"):
        Config.from_run_config({"max-len": 20, "window-stride": 21})
    with pytest.raises(ConfigError, match=r"^dp-unit = window needs window-stride 0 or max-len \(20\)"):
        Config.from_run_config({"max-len": 20, "window-stride": 5, "dp": True, "dp-unit": "window"})
