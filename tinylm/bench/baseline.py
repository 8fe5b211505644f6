"""The baseline of `make bench`'s `nanogpt-shape` row: a GPT written the obvious way in eager PyTorch.

Learned position embeddings, pre-LayerNorm blocks, causal attention through SDPA, a GELU MLP four times the
width, tied embeddings, GPT-2's initialization, `torch.optim.AdamW`. Nothing here is tinylm's: the row measures what a user gets
without tinylm, at the same size, on the same random tokens.
"""

from __future__ import annotations

import time

import numpy as np


def baseline_throughput(layers: int, width: int, heads: int, context: int, batch_size: int, vocab_size: int,
                        steps: int) -> tuple[float, list[float]]:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
            q, k, v = (y.view(b, t, heads, c // heads).transpose(1, 2) for y in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab_size, width), nn.Embedding(context, width)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln = nn.LayerNorm(width)

        def forward(self, idx, targets):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.ln(x) @ self.tok.weight.T
            return F.cross_entropy(logits.view(-1, vocab_size), targets.reshape(-1))

    torch.manual_seed(0)
    net = GPT()
    for module in net.modules():  # GPT-2's initialization: N(0, 0.02) weights, zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    rows = torch.from_numpy(np.random.default_rng(0).integers(0, vocab_size, (batch_size, context + 1)))
    losses, elapsed = [], 0.0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        loss = net(rows[:, :-1], rows[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            elapsed += time.perf_counter() - t0
        losses.append(loss.item())
    return steps * batch_size * context / elapsed, losses
