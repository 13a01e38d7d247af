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
  matters under DP where noise is added to every parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.layers import DPLSTM
from torch import nn

from common.config import Config
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

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Next-item logits at every position: (B, L) right-padded ids -> (B, L, N+1)."""
        states, mask = self._encode(items)
        length = items.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        allowed = causal.unsqueeze(0) & mask.unsqueeze(1)  # (B, query t, key i)
        context, _ = self._attend(states, states, allowed)
        return self.head(self._combine(context, states))

    def last_scores(
        self, items: torch.Tensor, lengths: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores of the item that follows each user's last real position: (B, N+1).

        With `return_attention`, also the attention each past position received (B, L), which
        explains a recommendation by the history items it drew on.
        """
        states, mask = self._encode(items)
        last = states[torch.arange(items.shape[0], device=items.device), lengths - 1]  # (B, H)
        context, weights = self._attend(states, last.unsqueeze(1), mask.unsqueeze(1))
        scores = self.head(self._combine(context, last.unsqueeze(1))).squeeze(1)
        return (scores, weights.squeeze(1)) if return_attention else scores

    def _encode(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(self.item_embedding(items))
        if self.private:
            states, _ = self.lstm(x)
        else:
            lstm = self.lstm
            zeros = x.new_zeros(1, x.shape[0], lstm.hidden_size)
            weights = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]  # nn.LSTM's order
            states, _, _ = torch.lstm(x, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)
        return states, items != 0

    def _attend(
        self, keys: torch.Tensor, queries: torch.Tensor, allowed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive attention of each query over the allowed keys: context (B, Q, H), weights (B, Q, L)."""
        energy = torch.tanh(self.attn_key(keys).unsqueeze(1) + self.attn_query(queries).unsqueeze(2))
        scores = self.attn_score(energy).squeeze(-1).masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return weights @ keys, weights

    def _combine(self, context: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.tanh(self.combine(torch.cat([context, states], dim=-1))))


def build_model(cfg: Config, num_items: int) -> AttentionLSTM:
    """The model a run config describes; the server and every client build it the same way."""
    return AttentionLSTM(num_items, cfg.embedding_dim, cfg.hidden_dim, cfg.dropout, cfg.tie_weights)


def window_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean over windows of each window's mean next-item cross-entropy.

    A window (B, L+1) is read as inputs window[:, :-1] and targets window[:, 1:]; padding targets
    (0) do not count. Averaging inside a window first makes the batch loss a mean of per-window
    losses, which is the reduction Opacus's per-sample clipping assumes (`loss_reduction="mean"`).
    """
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = model(inputs)
    # (B*L, N+1) rows, not (B, N+1, L): log-softmax over a contiguous last dimension is several
    # times faster, and it dominated a training step on large catalogues.
    token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0, reduction="none")
    per_window = token_loss.view_as(targets).sum(1) / (targets != 0).sum(1).clamp(min=1)
    return per_window.mean()


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
