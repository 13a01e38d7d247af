import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant
from opacus.optimizers import DPOptimizer

import client.training
from client.training import noise_multiplier_for, private_gradients, train
from common.config import Config
from common.model import AttentionLSTM, window_loss

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


def _opacus_gradients(model, batch, max_grad_norm, noise_multiplier, expected_batch, generator):
    """The reference: Opacus's hooks for per-sample gradients, its DPOptimizer to clip, noise, scale."""
    model.private = True
    net = GradSampleModule(model, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=noise_multiplier,
                            max_grad_norm=max_grad_norm, expected_batch_size=expected_batch, generator=generator)
    window_loss(net, batch).backward()
    optimizer.pre_step()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    net.to_standard_module()
    model.private = False
    return grads


# vmap in chunks (the last of one window), vmap, plain autograd window by window, one window
@pytest.mark.parametrize("windows,chunk,one_by_one", [(7, 3, 1), (7, 32, 1), (7, 32, 8), (1, 32, 8)])
@pytest.mark.parametrize("noise_multiplier", [0.0, 1.3])
def test_private_gradients_equal_opacus(monkeypatch, windows, chunk, one_by_one, noise_multiplier):
    """Clipped, summed, noised (same seeded noise) and scaled exactly as Opacus does it."""
    monkeypatch.setattr(client.training, "PER_SAMPLE_CHUNK", chunk)
    monkeypatch.setattr(client.training, "ONE_BY_ONE", one_by_one)
    batch = torch.from_numpy(_windows()[1:1 + windows])  # windows 4 (padded) and 1..3, 5..7
    clip = 0.05  # below every window's gradient norm here: clipping is active
    ours, theirs = _model(), _model()
    theirs.load_state_dict(ours.state_dict())
    reference = _opacus_gradients(theirs, batch, clip, noise_multiplier, 5, torch.Generator().manual_seed(7))
    loss = private_gradients(ours, batch, clip, noise_multiplier, 5, torch.Generator().manual_seed(7))
    assert loss.item() == pytest.approx(window_loss(_model(), batch).item(), rel=1e-5)
    assert ours.head.weight is ours.item_embedding.weight  # still tied
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, reference[name], rtol=1e-4, atol=1e-6), name
    # it is clipping: unclipped, the same sum would be larger than `windows` x clip
    plain = _model()
    window_loss(plain, batch).backward()
    unclipped = torch.cat([p.grad.flatten() for p in plain.parameters()]).norm() * len(batch)
    assert unclipped > len(batch) * clip


def test_private_gradients_of_an_empty_batch_are_noise_only():
    """Poisson sampling can draw no window: the step is noise alone, as in Opacus."""
    model = _model()
    empty = torch.from_numpy(_windows()[:0])
    private_gradients(model, empty, 1.0, 2.0, 4, torch.Generator().manual_seed(1))
    expected = torch.normal(0.0, 2.0, size=model.item_embedding.weight.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(model.item_embedding.weight.grad, expected / 4)
