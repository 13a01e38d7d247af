import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant

from client.training import noise_multiplier_for, train
from common.config import Config
from common.model import AttentionLSTM

N = 40


def _windows(seed: int = 0) -> np.ndarray:
    """Windows where item i is always followed by i+1: easy to learn."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(1, N - 9, 200)
    windows = starts[:, None] + np.arange(9)[None, :]
    windows[::4, 6:] = 0  # some short windows, right-padded
    return windows.astype(np.int64)


@pytest.fixture
def cfg() -> Config:
    return Config.from_run_config({"batch-size": 20, "lr": 0.01, "dropout": 0.0, "delta": 1e-5})


def _model() -> AttentionLSTM:
    torch.manual_seed(0)
    return AttentionLSTM(N, embedding_dim=16, hidden_dim=16, dropout=0.0)


def test_plain_training_learns(cfg):
    model = _model()
    first = train(model, _windows(), cfg, epochs=1).loss
    last = train(model, _windows(), cfg, epochs=5).loss
    assert last < first * 0.7
    assert train(_model(), _windows(), cfg, epochs=1).epsilon is None


def test_dp_training_spends_what_the_target_allows(cfg):
    cfg = Config.from_run_config({**cfg.to_run_config(), "dp": True, "target-epsilon": 3.0})
    windows = _windows()
    sigma = noise_multiplier_for(cfg, len(windows), epochs=3)
    model = _model()
    result = train(model, windows, cfg, epochs=3, noise_multiplier=sigma)
    assert result.steps == 3 * 10  # 200 windows / expected batch 20
    assert result.history == [(sigma, 0.1, 30)]
    assert 2.9 < result.epsilon <= 3.0 + 1e-6
    # the model is a plain module again, with the same parameters, and can be wrapped anew
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert list(model.state_dict()) == list(_model().state_dict())
    assert train(model, windows, cfg, epochs=1, noise_multiplier=sigma).steps == 10


def test_history_carries_over_calls(cfg):
    windows = _windows()
    first = train(_model(), windows, cfg, epochs=2, noise_multiplier=1.2)
    second = train(_model(), windows, cfg, epochs=1, noise_multiplier=0.9, history=first.history)
    independent = PRVAccountant()
    independent.history = [(1.2, 0.1, 20), (0.9, 0.1, 10)]
    assert second.history == independent.history
    assert second.epsilon == pytest.approx(independent.get_epsilon(cfg.delta), rel=1e-9)
    assert second.epsilon > first.epsilon


def test_training_is_reproducible(cfg):
    a, b = _model(), _model()
    train(a, _windows(), cfg, epochs=1, noise_multiplier=1.0, seed=3)
    train(b, _windows(), cfg, epochs=1, noise_multiplier=1.0, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_early_stop_callback(cfg):
    seen = []
    result = train(_model(), _windows(), cfg, epochs=10,
                   on_epoch_end=lambda epoch, loss, eps: seen.append(epoch) or epoch == 2)
    assert seen == [1, 2] and result.epochs == 2
