import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

import client.training
import common.privacy
from client.training import ClientJob, _Cohort, train
from common.config import Config
from common.model import AttentionLSTM, window_loss, window_losses
from common.privacy import batches_per_epoch, noise_multiplier_for, sample_rate

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


@pytest.mark.parametrize("num_windows,batch_size", [(200, 20), (57, 20), (7, 3), (49, 1), (5, 256)])
def test_one_sample_rate_for_sampling_accounting_and_the_noise_search(monkeypatch, cfg, num_windows, batch_size):
    """Opacus's loader's rate is the one training samples at, the ledger records and σ is searched for."""
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(num_windows)), batch_size=batch_size))
    rate = sample_rate(num_windows, batch_size)
    assert rate == loader.sample_rate
    cfg = Config.from_run_config({**cfg.to_run_config(), "batch-size": batch_size,
                                  "target-epsilon": 1000 + num_windows})  # a σ search of its own
    result = train(_model(), _windows()[:num_windows], cfg, epochs=2, noise_multiplier=1.0)
    assert result.history == [(1.0, rate, 2 * len(loader))]
    searched = {}
    monkeypatch.setattr(common.privacy, "get_noise_multiplier", lambda **kwargs: searched.update(kwargs) or 1.5)
    assert noise_multiplier_for(cfg, num_windows, epochs=3) == 1.5
    assert (searched["sample_rate"], searched["steps"]) == (rate, 3 * len(loader))


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
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


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
    window_losses(net, batch, select=False).mean().backward()  # every position scored: Opacus's hooks need (B, L, ·)
    optimizer.pre_step()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    net.to_standard_module()
    model.private = False
    return grads


def _cohort_gradients(model, batches, cfg, noise_multiplier, seeds, shared=True):
    """fedrec's DP step for several clients at once, each client's batch its whole windows."""
    jobs = [ClientJob(b.numpy(), seed, noise_multiplier) for b, seed in zip(batches, seeds, strict=True)]
    cohort = _Cohort(model, jobs, cfg)
    cohort._step([torch.arange(len(b)) for b in batches], shared=shared)
    return cohort, [{name: p.grad[c] for name, p in cohort.params.items()} for c in range(len(jobs))]


# parts of about 3 windows, one part; one window; two clients side by side,
# sharing the starting weights (one vmap) or each through its own weights (gathered)
@pytest.mark.parametrize("sizes,chunk,shared", [((7,), 40_000, True), ((7,), 10**9, True), ((1,), 10**9, True),
                                                 ((7, 8), 40_000, True), ((7, 8), 10**9, False)])
@pytest.mark.parametrize("noise_multiplier", [0.0, 1.3])
def test_private_gradients_equal_opacus(monkeypatch, cfg, sizes, chunk, shared, noise_multiplier):
    """Clipped, summed, noised (same seeded noise) and scaled exactly as Opacus does it, per client."""
    monkeypatch.setattr(client.training, "PER_SAMPLE_BYTES", chunk)
    clip = 0.05  # below every window's gradient norm here: clipping is active
    cfg = Config.from_run_config({**cfg.to_run_config(), "max-grad-norm": clip, "batch-size": 3})
    all_windows = _windows()
    batches = [torch.from_numpy(all_windows[1 + 10 * c:1 + 10 * c + n]) for c, n in enumerate(sizes)]  # padded ones too
    ours = _model()
    cohort, grads = _cohort_gradients(ours, batches, cfg, noise_multiplier, seeds=[7 + c for c in range(len(sizes))],
                                      shared=shared)
    for c, batch in enumerate(batches):
        theirs = _model()
        expected_batch = int(len(batch) / batches_per_epoch(len(batch), 3))
        reference = _opacus_gradients(theirs, batch, clip, noise_multiplier, expected_batch,
                                      torch.Generator().manual_seed(7 + c))
        for name, g in grads[c].items():
            assert torch.allclose(g, reference[name], rtol=1e-4, atol=1e-6), (c, name)
    assert ours.head.weight is ours.item_embedding.weight  # the model is untouched, still tied
    # it is clipping: unclipped, the same sum would be larger than `windows` x clip
    plain = _model()
    window_loss(plain, batches[0]).backward()
    unclipped = torch.cat([p.grad.flatten() for p in plain.parameters()]).norm() * len(batches[0])
    assert unclipped > len(batches[0]) * clip


def test_private_gradients_of_an_empty_batch_are_noise_only(cfg):
    """Poisson sampling can draw no window: the step is noise alone, as in Opacus."""
    model = _model()
    cohort = _Cohort(model, [ClientJob(_windows()[:8], seed=1, noise_multiplier=2.0)], cfg)
    cohort._step([torch.arange(0)], shared=True)
    generator = torch.Generator().manual_seed(1)
    expected = torch.normal(0.0, 2.0, size=model.item_embedding.weight.shape, generator=generator)
    assert torch.allclose(cohort.params["item_embedding.weight"].grad[0], expected / 8)


def _users(num_windows: int) -> np.ndarray:
    """Each window's user: users of one to three consecutive windows."""
    sizes = np.resize([1, 3, 2, 1, 2], num_windows)
    return np.repeat(np.arange(len(sizes)), sizes)[:num_windows]


def _per_user_reference(windows: torch.Tensor, users: np.ndarray, clip: float, expected_batch: int):
    """The reference for user-level DP-SGD: each user's summed window losses through plain
    autograd, its whole gradient clipped to `clip`, summed over users, scaled (no noise)."""
    total = None
    for user in np.unique(users):
        model = _model()
        window_losses(model, windows[torch.from_numpy(users == user)]).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        norm = torch.cat([g.flatten() for g in grads.values()]).norm()
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = {k: g * factor + (0 if total is None else total[k]) for k, g in grads.items()}
    return {k: v / expected_batch for k, v in total.items()}


# one part or several (each holding whole users); two clients through their own weights (gathered);
# strided windows, whose re-read history is input only
@pytest.mark.parametrize("chunk,clients,shared,strided", [(10**9, 1, True, False), (40_000, 1, True, False),
                                                          (10**9, 2, False, False), (40_000, 2, False, True)])
def test_user_level_gradients_clip_each_users_sum(monkeypatch, cfg, chunk, clients, shared, strided):
    monkeypatch.setattr(client.training, "PER_SAMPLE_BYTES", chunk)
    clip = 0.05
    cfg = Config.from_run_config({**cfg.to_run_config(), "max-grad-norm": clip, "batch-size": 3})
    windows = [torch.from_numpy(_windows()[1 + 20 * c:1 + 20 * c + 11]) for c in range(clients)]
    if strided:
        for w in windows:
            w[1::2, 1:5] *= -1
    users = [_users(11) for _ in range(clients)]
    jobs = [ClientJob(w.numpy(), 5 + c, 0.0, (), u) for c, (w, u) in enumerate(zip(windows, users, strict=True))]
    assert jobs[0].population() == 7
    cohort = _Cohort(_model(), jobs, cfg)
    cohort._step([torch.arange(len(w)) for w in windows], shared=shared)
    expected_batch = int(7 / batches_per_epoch(7, 3))  # in users
    for c in range(clients):
        reference = _per_user_reference(windows[c], users[c], clip, expected_batch)
        for name, p in cohort.params.items():
            assert torch.allclose(p.grad[c], reference[name], rtol=1e-4, atol=1e-6), (c, name)


def test_user_level_with_one_window_per_user_is_the_per_window_step(cfg):
    cfg = Config.from_run_config({**cfg.to_run_config(), "max-grad-norm": 0.05, "batch-size": 3})
    windows = _windows()[:9]
    steps = []
    for units in (None, np.arange(9)):
        cohort = _Cohort(_model(), [ClientJob(windows, 3, 1.1, (), units)], cfg)
        cohort._step([torch.arange(9)], shared=True)
        steps.append({name: p.grad.clone() for name, p in cohort.params.items()})
    for name in steps[0]:
        assert torch.allclose(steps[0][name], steps[1][name], rtol=1e-5, atol=1e-7), name


def test_user_level_sampling_takes_whole_users_at_the_users_rate(cfg):
    cfg = Config.from_run_config({**cfg.to_run_config(), "batch-size": 3})
    windows, users = _windows()[:60], _users(60)
    result = train(_model(), windows, cfg, epochs=1, noise_multiplier=1.0, units=users)
    population = int(users[-1]) + 1
    assert result.history == [(1.0, sample_rate(population, 3), batches_per_epoch(population, 3))]
    cohort = _Cohort(_model(), [ClientJob(windows, 4, 1.0, (), users)], cfg)
    for step in range(20):
        picked = cohort._sample(0, None, step).numpy()
        for user in np.unique(users[picked]):  # all of a sampled user's windows, none of the others'
            assert set(np.flatnonzero(users == user)) <= set(picked)


def test_cosine_schedule_falls_from_lr_to_zero_over_the_call(cfg):
    cosine = Config.from_run_config({**cfg.to_run_config(), "lr-schedule": "cosine"})
    cohort = _Cohort(_model(), [ClientJob(_windows(), 0)], cosine)
    rates = []
    for done in (0.0, 0.5, 1.0):
        cohort._schedule(done)
        rates.append(cohort.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([cfg.lr, cfg.lr / 2, 0.0])
    constant = train(_model(), _windows(), cfg, epochs=2)
    decayed = train(_model(), _windows(), cosine, epochs=2)
    assert not torch.equal(constant.weights["item_embedding.weight"], decayed.weights["item_embedding.weight"])
