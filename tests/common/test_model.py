import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from common.errors import DataError
from common.model import AttentionLSTM, recommend, window_loss, window_losses

N = 30


@pytest.fixture
def model() -> AttentionLSTM:
    torch.manual_seed(0)
    return AttentionLSTM(N, embedding_dim=8, hidden_dim=12, dropout=0.0).eval()


@pytest.fixture
def items() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randint(1, N + 1, (3, 7))
    x[0, 4:] = 0  # right padding: user 0 has 4 items
    return x, torch.tensor([4, 7, 7])


def test_shapes_and_attention(model, items):
    x, lengths = items
    assert model(x).shape == (3, 7, N + 1)
    scores, attention = model.last_scores(x, lengths, return_attention=True)
    assert scores.shape == (3, N + 1) and attention.shape == (3, 7)
    assert torch.allclose(attention.sum(1), torch.ones(3))
    assert torch.all(attention[0, 4:] == 0)  # padding gets no attention


def test_padding_and_future_do_not_leak(model, items):
    x, _ = items
    changed = x.clone()
    changed[0, 4:] = 5  # overwrite padding
    assert torch.equal(model(x)[0, :4], model(changed)[0, :4])
    future = x.clone()
    future[1, 5:] = 1  # change the future of user 1
    assert torch.allclose(model(x)[1, :5], model(future)[1, :5])
    assert not torch.allclose(model(x)[1, 5:], model(future)[1, 5:])


def test_last_scores_equal_forward_at_last_position(model, items):
    x, lengths = items
    full = model(x)
    last = model.last_scores(x, lengths)
    for u, n in enumerate(lengths.tolist()):
        assert torch.allclose(full[u, n - 1], last[u], atol=1e-6)


def test_opacus_accepts_the_model_and_weights_move_unchanged(model):
    assert ModuleValidator.validate(model.train(), strict=False) == []
    assert model.head.weight is model.item_embedding.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataLoader(TensorDataset(torch.randint(1, N + 1, (8, 6))), batch_size=4)
    wrapped, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
        noise_multiplier=1.0, max_grad_norm=1.0)
    inner = wrapped._module.state_dict()
    assert list(inner) == list(before)
    assert all(torch.equal(inner[k], before[k]) for k in before)
    plain = AttentionLSTM(N, embedding_dim=8, hidden_dim=12)
    plain.load_state_dict(inner)  # strict: same keys, same shapes
    wrapped.to_standard_module()


def test_per_window_gradients_match_single_window_gradients(model):
    """Opacus's hooks give each window its own exact gradient (DPLSTM, tied weights, masks)."""
    torch.manual_seed(2)
    windows = torch.randint(1, N + 1, (3, 6))
    windows[1, 3:] = 0
    model.train()
    expected = []
    for w in windows:
        model.zero_grad()
        window_loss(model, w.unsqueeze(0)).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})  # fused LSTM path
    model.private = True  # DPLSTM's own forward, which Opacus hooks
    wrapped, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(windows), batch_size=3), noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks")
    window_losses(wrapped, windows, select=False).mean().backward()  # Opacus's hooks need every position's scores
    for name, p in model.named_parameters():
        for i in range(3):
            assert torch.allclose(p.grad_sample[i], expected[i][name], atol=1e-5), name
    wrapped.to_standard_module()


def test_fused_and_dp_lstm_paths_agree(model, items):
    x, lengths = items
    fast = model(x)
    model.private = True
    assert torch.allclose(fast, model(x), atol=1e-5)


def test_loss_ignores_padding_targets(model):
    w = torch.tensor([[3, 4, 5, 0, 0]])
    padded_more = torch.tensor([[3, 4, 5, 0, 0, 0, 0]])
    assert torch.allclose(window_loss(model, w), window_loss(model, padded_more))


def test_recommend_never_returns_padding_and_explains(model):
    top, scores, attention = recommend(model, [1, 2, 3, 4, 5], k=N, max_len=3)
    assert len(top) == N and 0 not in top and sorted(top) == list(range(1, N + 1))
    assert scores == sorted(scores, reverse=True)
    assert len(attention) == 3 and abs(sum(attention) - 1) < 1e-6


def test_tied_state_dict_holds_the_embedding_once():
    tied = AttentionLSTM(N, embedding_dim=8, hidden_dim=12).state_dict()
    assert "item_embedding.weight" in tied and "head.weight" not in tied
    untied = AttentionLSTM(N, embedding_dim=8, hidden_dim=12, tie_weights=False).state_dict()
    assert {"item_embedding.weight", "head.weight"} <= set(untied)
    assert not torch.equal(untied["head.weight"], untied["item_embedding.weight"])
    AttentionLSTM(N, embedding_dim=8, hidden_dim=12, tie_weights=False).load_state_dict(untied)


def test_weights_stay_tied_through_a_message_round_trip(model, items):
    """Server -> client -> server as Flower carries them: an ArrayRecord in a Message, copied on delivery."""
    import copy

    from flwr.app import ArrayRecord, Message, MessageType, RecordDict

    from common.flower_compat import server_task_identity

    with server_task_identity(run_id=1):
        instruction = Message(RecordDict({"arrays": ArrayRecord(model.state_dict())}), 100, MessageType.TRAIN)
    client = AttentionLSTM(N, embedding_dim=8, hidden_dim=12, dropout=0.0)
    client.load_state_dict(copy.deepcopy(instruction).content["arrays"].to_torch_state_dict())
    assert client.head.weight is client.item_embedding.weight
    optimizer = torch.optim.SGD(client.parameters(), lr=0.5)
    window_loss(client, torch.randint(1, N + 1, (4, 6))).backward()
    optimizer.step()
    reply = ArrayRecord(client.state_dict())
    assert list(reply.keys()) == list(instruction.content["arrays"].keys()) and "head.weight" not in reply

    server = AttentionLSTM(N, embedding_dim=8, hidden_dim=12, dropout=0.0).eval()
    server.load_state_dict(reply.to_torch_state_dict())
    assert server.head.weight is server.item_embedding.weight
    assert torch.equal(server.head.weight, client.item_embedding.weight)
    x, lengths = items
    assert torch.equal(server.last_scores(x, lengths), client.eval().last_scores(x, lengths))


def test_an_older_state_dict_with_an_equal_head_loads(model):
    old = {**model.state_dict(), "head.weight": model.item_embedding.weight.detach().clone()}
    fresh = AttentionLSTM(N, embedding_dim=8, hidden_dim=12)
    fresh.load_state_dict(old)  # strict
    assert fresh.head.weight is fresh.item_embedding.weight
    assert torch.equal(fresh.item_embedding.weight, model.item_embedding.weight)
    assert "head.weight" not in fresh.state_dict()


def test_a_head_that_differs_from_the_embedding_is_refused(model):
    untied = AttentionLSTM(N, embedding_dim=8, hidden_dim=12, tie_weights=False).state_dict()
    with pytest.raises(DataError, match="head.weight differs from item_embedding.weight") as refused:
        AttentionLSTM(N, embedding_dim=8, hidden_dim=12).load_state_dict(untied)
    assert "\n" not in str(refused.value)


def test_scoring_only_real_targets_gives_the_same_losses(model):
    """Logits at real targets only (the training path) and at every position, padding ignored
    (the old loss, and the one `vmap` computes) give the same per-window losses and gradients."""
    torch.manual_seed(3)
    windows = torch.randint(1, N + 1, (4, 7))
    windows[1, 4:] = 0
    windows[2, 2:] = 0
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = model(inputs)
    old = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0, reduction="none")
    old = old.view_as(targets).sum(1) / (targets != 0).sum(1)
    selected, everywhere = window_losses(model, windows), window_losses(model, windows, select=False)
    assert torch.allclose(selected, old, atol=1e-6) and torch.allclose(everywhere, old, atol=1e-6)
    grads = [torch.autograd.grad(losses.sum(), list(model.parameters())) for losses in (selected, everywhere)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("select", [True, False])
def test_history_only_positions_are_read_but_not_scored(model, select):
    """A strided window's negated items (`training_windows`) are inputs like any other, and
    their targets do not count: the loss is the mean over the remaining targets only."""
    model.eval()
    torch.manual_seed(4)
    windows = torch.randint(1, N + 1, (3, 7))
    windows[2, 5:] = 0
    marked = windows.clone()
    marked[:2, 1:4] *= -1
    logits = model(windows[:, :-1])
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")  # (3, 6)
    expected = torch.stack([token[0, 3:].mean(), token[1, 3:].mean(), token[2, :4].mean()])
    assert torch.allclose(window_losses(model, marked, select=select), expected, atol=1e-6)


def test_the_lstm_weights_travel_once_and_an_older_state_dict_with_both_copies_loads():
    """DPLSTM's weights are listed twice in the parent's state dict (one tensor, two names). Sent
    twice, the copies were averaged and noised apart under central DP, and each client's update
    was measured against the copy its model did not run with: clipped for noise it never saw."""
    model = AttentionLSTM(20, embedding_dim=8, hidden_dim=8)
    keys = list(model.state_dict())
    assert "lstm.weight_ih_l0" in keys and not any(k.startswith("lstm.l0.") for k in keys)
    assert len({id(t) for t in model.state_dict(keep_vars=True).values()}) == len(keys)
    older = {**model.state_dict(), **{alias: model.state_dict()[first] + 1.0 for alias, first in model.aliases.items()}}
    fresh = AttentionLSTM(20, embedding_dim=8, hidden_dim=8)
    fresh.load_state_dict(older)  # the alias's copy is the one the older model ran with (loaded last)
    assert torch.equal(fresh.lstm.weight_ih_l0, model.state_dict()["lstm.weight_ih_l0"] + 1.0)
