"""SASRec, the backbone every model of the paper shares (book chapter "The models", book/models.md).

Item rows of the (tied) embedding table: 0 = padding, 1..n_items = items, n_items + 1 = the
CL4SRec mask token. Every variant reserves the mask row, so all five models have identical
parameter names and shapes and can be merged; models that never mask leave it untouched.

Speed (see benchmarks/bench_train.py): attention is `F.scaled_dot_product_attention`; the last
block is computed only at the position the loss reads (keys/values still cover the prefix);
callers may trim right padding (`trim`) since causal attention never looks right.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with the distribution of F.dropout, about twice as fast on CPU: comparing
    a uniform draw with p costs less than torch's Bernoulli sampler (benchmarks/bench_train.py)."""
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return torch.zeros_like(x)
    return x * ((torch.rand_like(x) >= p) * (1.0 / (1.0 - p)))


def attention(q, k, v, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Softmax attention (B, H, Lq, dh) where `keep` allows a key. Without dropout this is torch's
    fused kernel; with dropout an explicit softmax plus `dropout` above is ~1.6x faster on CPU
    than the fused kernel's own dropout."""
    if p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    a = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5                  # (B, H, Lq, L)
    return dropout(a.masked_fill(~keep, float("-inf")).softmax(-1), p, True) @ v


class Block(nn.Module):
    """Post-LayerNorm transformer block: attention -> add & norm -> FFN -> add & norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.hidden
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(d, cfg.inner)
        self.fc2 = nn.Linear(cfg.inner, d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.p_hidden = cfg.dropout
        self.p_attn = cfg.attn_dropout

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, d = t.shape
        return t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, L, d/H)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d). With `last` (B,) the block is evaluated only at those positions and
        returns (B, 1, d); otherwise at every position, causally, returning (B, L, d)."""
        B, L, d = x.shape
        p_attn = self.p_attn if self.training else 0.0
        q, k, v = self.qkv(x).split(d, dim=-1)
        if last is None:
            keep = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()   # causal (L, L)
            x_res = x
        else:
            idx = last.view(B, 1, 1).expand(B, 1, d)
            q = torch.gather(q, 1, idx)                                    # (B, 1, d)
            x_res = torch.gather(x, 1, idx)                                # (B, 1, d)
            keep = torch.arange(L, device=x.device).view(1, 1, 1, L) <= last.view(B, 1, 1, 1)
        ctx = attention(self._heads(q), self._heads(k), self._heads(v), keep, p_attn)
        ctx = ctx.transpose(1, 2).reshape(B, -1, d)                        # (B, L or 1, d)
        h = self.ln1(x_res + dropout(self.proj(ctx), self.p_hidden, self.training))
        f = self.fc2(F.gelu(self.fc1(h)))
        return self.ln2(h + dropout(f, self.p_hidden, self.training))


class SASRec(nn.Module):
    def __init__(self, n_items: int, cfg: Config):
        super().__init__()
        self.n_items = n_items
        self.mask_id = n_items + 1
        self.item_emb = nn.Embedding(n_items + 2, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.p_hidden = cfg.dropout
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.apply(lambda m: _init(m, cfg.init_std))
        with torch.no_grad():
            self.item_emb.weight[0].zero_()  # padding row: never read at a real position

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) right-padded item ids -> item + position embeddings (B, L, d)."""
        pos = torch.arange(seq.shape[1], device=seq.device)
        return self.item_emb(seq) + self.pos_emb(pos)

    def encode_embedded(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, L, d) from `embed`, lengths (B,) >= 1 -> representation at the last real item (B, d)."""
        x = dropout(self.ln(x), self.p_hidden, self.training)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, last=lengths - 1).squeeze(1)

    def encode(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.encode_embedded(self.embed(seq), lengths)

    def item_weights(self) -> torch.Tensor:
        """Output embeddings of the real items (n_items, d); column j of the logits is item j + 1."""
        return self.item_emb.weight[1 : self.n_items + 1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_weights().T                                   # (B, n_items)

    def encode_all(self, seq: torch.Tensor) -> torch.Tensor:
        """Every position's output (B, L, d), causally; for tests of the masking."""
        x = dropout(self.ln(self.embed(seq)), self.p_hidden, self.training)
        for block in self.blocks:
            x = block(x)
        return x


def _init(m: nn.Module, std: float) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, std)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def trim(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Drop right padding beyond the batch's longest sequence (exact: attention is causal)."""
    return seq[:, : int(lengths.max())]
