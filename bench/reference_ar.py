"""A plain-PyTorch reference of the stage-3 AR architecture, for bench/ar_reference.py.

The same function as `modeling.ar_model.ARModel` (class token + token embedding, pre-norm blocks of
RMSNorm, causal attention with 1D rotary positions and a GEGLU MLP 4x the width wide, a final
RMSNorm, an untied head, per-position logit masks, label dropout) with the same parameters, written
the way a research codebase typically writes it: separate q / k / v / output projections, separate
gate / up / down MLP matrices, rotary embeddings through complex multiplication, a KV cache that
grows by `torch.cat` at every step, and a sampler that guides, softmaxes and calls
`torch.multinomial`. No fused projections, no preallocated buffers.

`from_ours` copies an ARModel's weights into a ReferenceAR (splitting the fused matrices), so the
benchmark can check that both compute the same logits before timing them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.ar_model import ARConfig, ARModel


def workload(**overrides) -> ARConfig:
    """The model both reference benchmarks use: width 256, 6 layers, 4 heads; 10 classes, visual
    codebook 512, prologue codebook 64, 8 prologue + 64 visual tokens (T = 73 positions)."""
    kw = dict(width=256, depth=6, heads=4, num_classes=10, visual_codebook=512, prologue_codebook=64, z_len=8,
              num_visual=64)  # fmt: skip
    return ARConfig(**(kw | overrides))


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the lookup tables (nn.Embedding), head included: the 6·N of 6·N·tokens."""
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - embeddings


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float = 10000.0) -> Tensor:
    """Complex rotations [T, head_dim/2]: channel pair j of position t turns by t * base^(-2j/head_dim)."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """x [B, T, H, d], freqs_cis [T, d/2] -> x with channel pairs (2j, 2j+1) rotated."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    return out.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.gelu(self.w_gate(x)) * self.w_up(x))


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, freqs_cis: Tensor, cache: dict | None = None) -> Tensor:
        """x [B, T, D]. With a cache (dict with "k", "v" or empty), x holds the new positions only and
        the keys and values are appended to it."""
        B, T, D = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        causal = T > 1  # one new query attends to every cached key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, D))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = Attention(dim, n_heads)
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = FeedForward(dim, 4 * dim)

    def forward(self, x: Tensor, freqs_cis: Tensor, cache: dict | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class ReferenceAR(nn.Module):
    """Input [class][p_1..p_Z][EOS][v_1..v_{N-1}], targets shifted by one, as in ARModel."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.V, self.P, self.Z, self.N, self.T = (
            cfg.visual_codebook, cfg.prologue_codebook, cfg.z_len, cfg.num_visual, cfg.seq_len
        )  # fmt: skip
        self.eos = self.V + self.P if self.Z else None
        self.uncond = cfg.num_classes
        vocab = cfg.vocab_size
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, cfg.width)
        self.tok_embeddings = nn.Embedding(vocab, cfg.width)
        self.layers = nn.ModuleList(TransformerBlock(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width)
        self.output = nn.Linear(cfg.width, vocab, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(self.T, cfg.width // cfg.heads), persistent=False)
        allowed = torch.zeros(self.T, vocab, dtype=torch.bool)
        allowed[: self.Z, self.V : self.V + self.P] = True
        if self.Z:
            allowed[self.Z, self.eos] = True
        allowed[self.T - self.N :, : self.V] = True
        self.register_buffer("allowed", allowed, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def logits(self, x: Tensor, start: int = 0, cache: list[dict] | None = None) -> Tensor:
        """Embeddings x [B, L, D] at positions start..start+L-1 -> masked logits [B, L, vocab]."""
        L = x.shape[1]
        freqs_cis = self.freqs_cis[start : start + L]
        for i, layer in enumerate(self.layers):
            x = layer(x, freqs_cis, None if cache is None else cache[i])
        logits = self.output(self.norm(x))
        return logits.masked_fill(~self.allowed[start : start + L], float("-inf"))

    def forward(self, class_ids: Tensor, prologue: Tensor | None, visual: Tensor) -> dict[str, Tensor]:
        B = visual.shape[0]
        if self.training and self.cfg.label_dropout > 0:
            drop = torch.rand(B, device=class_ids.device) < self.cfg.label_dropout
            class_ids = torch.where(drop, torch.full_like(class_ids, self.uncond), class_ids)
        targets = visual
        if self.Z:
            eos = torch.full((B, 1), self.eos, dtype=torch.long, device=visual.device)
            targets = torch.cat([prologue + self.V, eos, visual], dim=1)
        x = torch.cat([self.cls_embedding(class_ids).unsqueeze(1), self.tok_embeddings(targets[:, :-1])], dim=1)
        logits = self.logits(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return {"loss": loss, "logits": logits}


@torch.no_grad()
def reference_sample(model: ReferenceAR, class_ids: Tensor, cfg_scale: float = 2.0, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Classifier-free guided sampling with a growing KV cache: class_ids [B] -> ids [B, T] (vocabulary
    ids: prologue codes V.., EOS, visual codes). Constant guidance scale, one temperature, multinomial."""
    B = class_ids.shape[0]
    cond = torch.cat([class_ids, torch.full_like(class_ids, model.uncond)])  # [2B]
    cache = [{} for _ in model.layers]
    x = model.cls_embedding(cond).unsqueeze(1)  # [2B, 1, D]
    out = []
    for t in range(model.T):
        logits = model.logits(x, t, cache)[:, -1]  # [2B, vocab]
        c, u = logits.chunk(2)
        allowed = model.allowed[t]
        guided = u + cfg_scale * (c - u).masked_fill(~allowed, 0.0)  # -inf stays -inf
        probs = F.softmax(guided / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
        out.append(nxt)
        x = model.tok_embeddings(torch.cat([nxt, nxt])).view(2 * B, 1, -1)
    return torch.cat(out, dim=1)


@torch.no_grad()
def from_ours(ours: ARModel) -> ReferenceAR:
    """A ReferenceAR with the weights of `ours` (the fused qkv and up matrices split)."""
    ref = ReferenceAR(ours.cfg)
    D = ours.cfg.width
    ref.cls_embedding.weight.copy_(ours.class_embedding.weight)
    ref.tok_embeddings.weight.copy_(ours.embedding.weight)
    ref.output.weight.copy_(ours.head.weight)
    ref.norm.weight.copy_(ours.transformer.norm.weight)
    for layer, block in zip(ref.layers, ours.transformer.blocks, strict=True):
        layer.attention_norm.weight.copy_(block.norm1.weight)
        layer.ffn_norm.weight.copy_(block.norm2.weight)
        wq, wk, wv = block.attn.qkv.weight.split(D)
        layer.attention.wq.weight.copy_(wq)
        layer.attention.wk.weight.copy_(wk)
        layer.attention.wv.weight.copy_(wv)
        layer.attention.wo.weight.copy_(block.attn.proj.weight)
        up, gate = block.mlp.up.weight.chunk(2)
        layer.feed_forward.w_up.weight.copy_(up)
        layer.feed_forward.w_gate.weight.copy_(gate)
        layer.feed_forward.w_down.weight.copy_(block.mlp.down.weight)
    return ref.to(ours.head.weight.device)
