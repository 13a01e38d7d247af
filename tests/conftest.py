"""Fixtures for every test: an isolated data cache, Flower kept quiet, and real data when present."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
torch.set_num_threads(1)  # the tests' models are tiny: threads only add overhead on a shared 2-core box


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own FEDREC_CACHE, so tests never touch ~/.cache or each other."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDREC_CACHE", str(cache))
    return cache


@pytest.fixture
def shared_data() -> Callable[[str], Path]:
    """A path under ../shared/data; the test is skipped, saying why, where it is absent."""

    def get(relative: str) -> Path:
        path = SHARED_DATA / relative
        if not path.exists():
            pytest.skip(f"real data not available: {path} is absent (tests read ../shared/data)")
        return path

    return get


@pytest.fixture
def interrupted_run(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """`interrupted_run(cfg, after)`: a simulation that loses power right after it checkpointed
    round `after`, leaving what a kill -9 would leave for `--resume`."""
    from server import checkpoint
    from simulation.run import simulate

    original = checkpoint.save

    def run(cfg: object, after: int) -> None:
        def crash(out: Path, done: int, *args: object, **kwargs: object) -> None:
            original(out, done, *args, **kwargs)
            if done == after:
                raise KeyboardInterrupt("power cut")

        monkeypatch.setattr(checkpoint, "save", crash)
        try:
            with pytest.raises(KeyboardInterrupt):
                simulate(cfg, quiet=True)
        finally:
            monkeypatch.setattr(checkpoint, "save", original)

    return run
