"""A small decoder-only language model (the ``transformer`` workload).

GPT-2's layout at a small size: token and learned position embeddings, then
blocks of pre-LayerNorm causal self-attention and a pre-LayerNorm MLP, each
added to the residual stream, a final LayerNorm and a linear head to the
vocabulary (not tied to the embedding). Attention is ordinary PyTorch:
separate nn.Linear projections for queries, keys, values and the output,
and ``F.scaled_dot_product_attention`` with a causal mask.

The MLP's transfer function is ReLU, not GPT-2's GELU: LocoProp-M matches
post-activations through the convex integral of the transfer function,
which needs it monotone, and GELU is not (M refuses it). The MLP is an
``nn.Sequential(Linear, ReLU, Linear)``, where LocoProp finds that ReLU.

What LocoProp makes units of: every nn.Linear (q, k, v, output and MLP
projections, the head); the embeddings and LayerNorms take the inner
optimizer's plain steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalSelfAttention", "DecoderBlock", "DecoderLM"]

INIT_STD = 0.02  # GPT-2's


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v and output projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"Invalid width: {width} does not split into {heads} heads")
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.output = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape

        def split_heads(t: Tensor) -> Tensor:  # (batch, length, width) -> (batch, heads, length, head width)
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x)), is_causal=True
        )
        return self.output(attended.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(·)): a pre-LayerNorm transformer block."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.ReLU(), nn.Linear(mlp_width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """Token ids (batch, length) -> next-token logits (batch, length, vocabulary)."""

    def __init__(self, vocab_size: int, max_length: int, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_length, width)
        self.blocks = nn.Sequential(*(DecoderBlock(width, heads, mlp_width) for _ in range(layers)))
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.final_norm(self.blocks(hidden)))
