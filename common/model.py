"""The attention-LSTM next-item model, built so that Opacus can train it privately.

Items are embedded, an LSTM reads the history, and additive attention lets each position look
back over the hidden states so far:

    score_{t,i} = vᵀ tanh(W_h h_i + W_q h_t),   i ≤ t (and i not padding)
    c_t = Σ_i softmax(score_t)_i h_i
    z_t = tanh(W_o [c_t; h_t])
    logits_t = z_t Eᵀ  (E the item embedding when weights are tied)

Why it looks the way it does:
- The LSTM is `opacus.layers.DPLSTM`: its step-by-step forward is made of plain tensor operations,
  which `torch.func.vmap` batches for per-window gradients (and Opacus's hooks, our reference,
  can follow).
- Sequences are right-padded and padding is masked out of attention and loss. No PackedSequence
  (Opacus clips the wrong per-sample gradients when it reorders) and no left padding (the pad
  embedding would then receive gradient and noise through the LSTM).
- Attention is causal, so every position of a training window is a next-item target of its own
  (the whole window trains in one pass), and the last position is exactly what serving computes.
- The output layer may share the item embedding (`tie_weights`): half the parameters, which
  matters under DP where noise is added to every parameter. Tied, the state dict holds the
  tensor once (as `item_embedding.weight`), so messages, aggregation and checkpoints move and
  average the largest tensor once, not twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.layers import DPLSTM
from torch import nn

from common.config import Config
from common.dataset import window_inputs, window_targets
from common.errors import DataError
from common.metrics import top_k_items


class AttentionLSTM(nn.Module):
    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        hidden_dim: int = 64,
        dropout: float = 0.2,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.item_embedding = nn.Embedding(num_items + 1, embedding_dim, padding_idx=0)
        # N(0, 0.1²) rather than PyTorch's N(0, 1): with tied output weights the first logits are
        # then moderate; tuning on ml-100k found it better both without and with DP noise.
        nn.init.normal_(self.item_embedding.weight, std=0.1)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.lstm = DPLSTM(embedding_dim, hidden_dim, batch_first=True)
        # DPLSTM steps through time in Python so that Opacus can hook every gate; outside DP
        # training the same parameters run through PyTorch's fused LSTM kernel (2-4x faster).
        self.private = False  # set while DP training takes per-window gradients through vmap
        self.attn_key = nn.Linear(hidden_dim, hidden_dim, bias=False)  # W_h
        self.attn_query = nn.Linear(hidden_dim, hidden_dim)  # W_q
        self.attn_score = nn.Linear(hidden_dim, 1, bias=False)  # v
        self.combine = nn.Linear(2 * hidden_dim, embedding_dim)  # W_o
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embedding_dim, num_items + 1, bias=False)
        if tie_weights:
            self.head.weight = self.item_embedding.weight
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_fill_tied_head)
        # DPLSTM's weights appear twice in a parent's state dict (`lstm.weight_ih_l0` and its
        # layer's `lstm.l0.ih.weight`, one tensor). Each travels once, under the first name: two
        # copies would be averaged and noised apart (central DP), and an update measured against
        # the copy the model does not use would be clipped for noise it never trained on.
        self.aliases = _aliases(self)
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    def forward(
        self,
        items: torch.Tensor,
        dropout_masks: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        embedded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-item logits: (B, L) right-padded ids -> (B, L, N+1), or (T, N+1) at the T
        positions where `select` (B, L) is true: on a large catalogue the output layer is most of
        the cost, and only the positions with a real target need it.

        `dropout_masks` (2, B, L, E), already scaled by 1 / (1 - p), replace the dropout layers'
        own draws: a client's masks then come from its own generator, so training many clients
        at once gives each the same result as training it alone.

        Given `embedded` (B, L, E), the items' embeddings looked up by the caller, the result is
        the features (B, L, E) that the output layer scores: DP training does the lookup and the
        scoring itself, per client, and clips their per-window gradients without materialising
        them (`client.training`).
        """
        masks = (None, None) if dropout_masks is None else dropout_masks.unbind(0)
        mask = items != 0
        x = self.item_embedding(items) if embedded is None else embedded
        states = self._lstm(self._drop(x, masks[0]))
        length = items.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        allowed = causal.unsqueeze(0) & mask.unsqueeze(1)  # (B, query t, key i)
        context, _ = self._attend(states, states, allowed)
        features = self._combine(context, states, masks[1])  # (B, L, E)
        if embedded is not None:
            return features
        return self.head(features if select is None else features[select])

    def last_scores(
        self, items: torch.Tensor, lengths: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores of the item that follows each user's last real position: (B, N+1).

        With `return_attention`, also the attention each past position received (B, L), which
        explains a recommendation by the history items it drew on.
        """
        states, mask = self._lstm(self.dropout(self.item_embedding(items))), items != 0
        last = states[torch.arange(items.shape[0], device=items.device), lengths - 1]  # (B, H)
        context, weights = self._attend(states, last.unsqueeze(1), mask.unsqueeze(1))
        scores = self.head(self._combine(context, last.unsqueeze(1))).squeeze(1)
        return (scores, weights.squeeze(1)) if return_attention else scores

    def _lstm(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, H) of embedded inputs (B, L, E)."""
        if self.private:
            return self.lstm(x)[0]
        lstm = self.lstm
        zeros = x.new_zeros(1, x.shape[0], lstm.hidden_size)
        weights = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]  # nn.LSTM's order
        return torch.lstm(x, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)[0]

    def _attend(
        self, keys: torch.Tensor, queries: torch.Tensor, allowed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive attention of each query over the allowed keys: context (B, Q, H), weights (B, Q, L)."""
        energy = torch.tanh(self.attn_key(keys).unsqueeze(1) + self.attn_query(queries).unsqueeze(2))
        scores = self.attn_score(energy).squeeze(-1).masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return weights @ keys, weights

    def _combine(self, context: torch.Tensor, states: torch.Tensor,
                 dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._drop(torch.tanh(self.combine(torch.cat([context, states], dim=-1))), dropout_mask)

    def _drop(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.dropout(x) if mask is None or not self.training else x * mask


def _drop_tied_head(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: dict) -> None:
    """The tied output weight is the item embedding: the state dict carries it once."""
    state_dict.pop(prefix + "head.weight", None)


def _fill_tied_head(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
    """Load a state dict without `head.weight` (the embedding stands for it), or one from before
    the tensor travelled once, whose `head.weight` must then equal the embedding."""
    embedding, head = state_dict.get(prefix + "item_embedding.weight"), state_dict.get(prefix + "head.weight")
    if embedding is None:
        return  # strict loading reports the missing key
    if head is not None and not torch.equal(head, embedding):
        raise DataError("head.weight differs from item_embedding.weight: these are the weights of a model with "
                        "an output layer of its own (tie-weights = false), not of this tied one")
    state_dict[prefix + "head.weight"] = embedding


def _aliases(module: nn.Module) -> dict[str, str]:
    """State-dict keys that name a tensor an earlier key already names: alias -> that first key."""
    first: dict[int, str] = {}
    aliases = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    return aliases


def _drop_aliases(module: AttentionLSTM, state_dict: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
    for alias in module.aliases:
        state_dict.pop(prefix + alias, None)


def _fill_aliases(module: AttentionLSTM, state_dict: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
    """Load a state dict that holds each tensor once, or an older one that held the aliases too:
    then the alias's copy is the one the model ran with (it was loaded last), so it wins."""
    for alias, first in module.aliases.items():
        if prefix + alias in state_dict:
            state_dict[prefix + first] = state_dict[prefix + alias]
        elif prefix + first in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + first]


def build_model(cfg: Config, num_items: int) -> AttentionLSTM:
    """The model a run config describes; the server and every client build it the same way."""
    return AttentionLSTM(num_items, cfg.embedding_dim, cfg.hidden_dim, cfg.dropout, cfg.tie_weights)


def window_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean over windows of each window's mean next-item cross-entropy.

    Averaging inside a window first makes the batch loss a mean of per-window losses, which is
    the reduction Opacus's per-sample clipping assumes (`loss_reduction="mean"`).
    """
    return window_losses(model, windows).mean()


def window_losses(
    model: nn.Module, windows: torch.Tensor, dropout_masks: torch.Tensor | None = None, *, select: bool = True
) -> torch.Tensor:
    """Each window's mean next-item cross-entropy: (B, L+1) -> (B,).

    A window is read as `window_inputs` and `window_targets`; padding and the history a later
    stride re-reads (target 0) do not count. With `select`, logits are computed only where a
    target is real; under `vmap` (one window at a time, no data-dependent shapes) every position
    is scored and padding is ignored in the loss instead, which gives the same values.
    """
    inputs, targets = window_inputs(windows), window_targets(windows)
    real = targets != 0
    counts = real.sum(1).clamp(min=1)
    if select:
        token_loss = F.cross_entropy(model(inputs, dropout_masks, real), targets[real], reduction="none")  # (T,)
        rows = torch.arange(len(windows), device=windows.device).unsqueeze(1).expand_as(targets)[real]
        return torch.zeros(len(windows), dtype=token_loss.dtype).index_add(0, rows, token_loss) / counts
    # (B*L, N+1) rows, not (B, N+1, L): log-softmax over a contiguous last dimension is several
    # times faster, and it dominated a training step on large catalogues.
    logits = model(inputs, dropout_masks)
    token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0, reduction="none")
    return token_loss.view_as(targets).sum(1) / counts


@torch.no_grad()
def recommend(
    model: AttentionLSTM | torch.jit.ScriptModule, history: list[int], k: int, max_len: int
) -> tuple[list[int], list[float], list[float]]:
    """Top-k next items for one history of item ids (1..N), best first, and the attention each
    of the last `max_len` history items received. Padding (0) is never recommended. `model` is
    the model or its TorchScript export (`common.export`), which computes the same."""
    model.eval()
    recent = history[-max_len:]
    items, lengths = torch.tensor([recent], dtype=torch.long), torch.tensor([len(recent)])
    if isinstance(model, AttentionLSTM):
        scores, attention = model.last_scores(items, lengths, return_attention=True)
    else:
        scores, attention = model(items, lengths)
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    order = top_k_items(scores, min(k, scores.shape[1] - 1))[0]
    return order.tolist(), scores[0, order].tolist(), attention[0].tolist()
