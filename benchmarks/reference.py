"""A straightforward SASRec, the yardstick of bench_train.py: `nn.TransformerEncoder` over all
positions with an explicit causal + padding mask, full-length (untrimmed) batches, output read
at the last real position. Same configuration and loss as fmpaper's model."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ReferenceSASRec(nn.Module):
    def __init__(self, n_items, cfg):
        super().__init__()
        self.item_emb = nn.Embedding(n_items + 2, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.n_heads, cfg.inner, cfg.dropout,
                                           activation="gelu", layer_norm_eps=cfg.ln_eps, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.n_items = n_items

    def loss(self, seq, lengths, target):
        B, L = seq.shape
        x = self.drop(self.ln(self.item_emb(seq) + self.pos_emb(torch.arange(L))))
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        h = self.encoder(x, mask=causal, src_key_padding_mask=seq == 0)   # (B, L, d)
        h = h[torch.arange(B), lengths - 1]                                # (B, d)
        logits = h @ self.item_emb.weight[1 : self.n_items + 1].T
        return F.cross_entropy(logits, target - 1)
