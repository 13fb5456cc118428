"""Stage-3 class-conditional autoregressive model: a LlamaGen-style decoder-only transformer.

Vocabulary (as in `modeling.joint_prior`): ids 0..V-1 are visual codes, V..V+P-1 prologue codes, V+P
is EOS. The class is a learned embedding used as the first token (one row per class plus a last
"unconditional" row for classifier-free guidance). With Z = z_len prologue and N visual tokens:

    input   [class] [p_1 .. p_Z] [EOS] [v_1 .. v_{N-1}]          (T = Z + 1 + N tokens)
    target  [p_1 .. p_Z] [EOS] [v_1 .. v_N]

The baseline (z_len = 0) has no prologue codes and no EOS: its vocabulary is the V visual codes and

    input   [class] [v_1 .. v_{N-1}]                              (T = N tokens)
    target  [v_1 .. v_N]

Every output position may only emit its own kind of id (`allowed` mask). Training runs the whole
sequence through `modeling.blocks.Transformer`; sampling decodes one token at a time with a KV cache
(`init_cache`, `start`, `step`) that reuses the same blocks' weights and gives the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.blocks import Transformer, apply_rope, rope_1d
from modeling.config import Config, ConfigError

# Transformer shapes by name; the paper's B / L / XL are LlamaGen's sizes.
AR_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"width": 64, "depth": 2, "heads": 4},
    "fashion32": {"width": 128, "depth": 4, "heads": 4},  # ~1.2M parameters: minutes on 2 CPU cores
    "B": {"width": 768, "depth": 12, "heads": 12},
    "L": {"width": 1024, "depth": 24, "heads": 16},
    "XL": {"width": 1280, "depth": 32, "heads": 20},
}


@dataclass
class ARConfig(Config):
    width: int = 192
    """Transformer width."""
    depth: int = 6
    """Transformer layers."""
    heads: int = 6
    """Attention heads (width / heads must be an even head dim for the rotary embedding)."""
    num_classes: int = 10
    """Class labels 0..num_classes-1; id num_classes is the unconditional class."""
    visual_codebook: int = 1024
    """V, entries of the tokenizer's visual codebook."""
    prologue_codebook: int = 256
    """P, entries of the tokenizer's prologue codebook (unused when z_len = 0)."""
    z_len: int = 4
    """Z, prologue tokens per image (0 = the baseline: visual tokens only, no EOS)."""
    num_visual: int = 64
    """N, visual tokens per image."""
    label_dropout: float = 0.1
    """Training-time probability of replacing a sample's class by the unconditional class (for CFG)."""

    @property
    def vocab_size(self) -> int:
        """V + P + 1 (visual, prologue, EOS), or V for the baseline."""
        return self.visual_codebook + self.prologue_codebook + 1 if self.z_len else self.visual_codebook

    @property
    def seq_len(self) -> int:
        """T, positions per sample: Z + 1 + N, or N for the baseline."""
        return self.z_len + 1 + self.num_visual if self.z_len else self.num_visual

    def validate(self) -> None:
        for name in ("width", "depth", "heads", "num_classes", "visual_codebook", "prologue_codebook", "num_visual"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(f"heads: width {self.width} / heads {self.heads} must be a whole, even head dim")
        if self.z_len < 0:
            raise ConfigError(f"z_len: must be >= 0, got {self.z_len}")
        if not 0 <= self.label_dropout <= 1:
            raise ConfigError(f"label_dropout: must be in [0, 1], got {self.label_dropout}")


@dataclass
class KVCache:
    """Rotated keys and values of every layer for the first `length` positions of a batch."""

    k: Tensor  # [depth, B, H, T, d]
    v: Tensor  # [depth, B, H, T, d]
    length: int = 0  # positions decoded so far = the position of the next input token


class ARModel(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.V, self.P, self.Z, self.N, self.T = (
            cfg.visual_codebook, cfg.prologue_codebook, cfg.z_len, cfg.num_visual, cfg.seq_len
        )  # fmt: skip
        self.eos = self.V + self.P if self.Z else None
        self.uncond = cfg.num_classes  # class id of the unconditional embedding row
        vocab = cfg.vocab_size
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.width)
        self.embedding = nn.Embedding(vocab, cfg.width)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, causal=True)
        self.head = nn.Linear(cfg.width, vocab, bias=False)
        self.register_buffer("angles", rope_1d(torch.arange(self.T), cfg.width // cfg.heads), persistent=False)
        # Which ids each output position may emit: prologue codes, then EOS, then visual codes.
        allowed = torch.zeros(self.T, vocab, dtype=torch.bool)
        allowed[: self.Z, self.V : self.V + self.P] = True
        if self.Z:
            allowed[self.Z, self.eos] = True
        allowed[self.T - self.N :, : self.V] = True
        self.register_buffer("allowed", allowed, persistent=False)  # [T, vocab]
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, class_ids: Tensor, prologue: Tensor | None, visual: Tensor) -> dict[str, Tensor]:
        """class_ids [B] long, prologue [B, Z] long prologue codes 0..P-1 (None for the baseline),
        visual [B, N] long visual codes 0..V-1.

        In training mode each class is replaced by the unconditional class with probability
        cfg.label_dropout. Returns scalars `loss` (mean CE over all T positions), `ce_visual`,
        `accuracy_visual` and, with a prologue, `ce_prologue`, `accuracy_prologue` (prologue and EOS
        positions); and the masked `logits` [B, T, vocab].
        """
        B = visual.shape[0]
        assert visual.shape == (B, self.N), f"visual {tuple(visual.shape)}, expected ({B}, {self.N})"
        if self.training and self.cfg.label_dropout > 0:
            dropped = torch.rand(B, device=class_ids.device) < self.cfg.label_dropout  # [B]
            class_ids = class_ids.masked_fill(dropped, self.uncond)
        targets = visual  # [B, N]
        if self.Z:
            assert prologue is not None and prologue.shape == (B, self.Z), "prologue must be [B, z_len] codes"
            eos = torch.full((B, 1), self.eos, dtype=torch.long, device=visual.device)
            targets = torch.cat([prologue + self.V, eos, visual], dim=1)  # [B, Z + 1 + N]
        else:
            assert prologue is None, "the baseline (z_len = 0) takes no prologue"
        x = torch.cat([self.class_embedding(class_ids)[:, None], self.embedding(targets[:, :-1])], dim=1)  # [B, T, D]
        logits = self.head(self.transformer(x, self.angles))  # [B, T, vocab]
        logits = logits.masked_fill(~self.allowed, float("-inf"))
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(B, -1)  # [B, T]
        correct = (logits.argmax(-1) == targets).float()  # [B, T]
        k = self.T - self.N  # first visual target position
        out = {"loss": ce.mean(), "ce_visual": ce[:, k:].mean(), "accuracy_visual": correct[:, k:].mean()}
        if self.Z:
            out |= {"ce_prologue": ce[:, :k].mean(), "accuracy_prologue": correct[:, :k].mean()}
        return out | {"logits": logits}

    # Incremental decoding --------------------------------------------------------------------------

    def init_cache(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        """An empty cache for `batch_size` sequences of up to T input positions."""
        cfg = self.cfg
        shape = (cfg.depth, batch_size, cfg.heads, self.T, cfg.width // cfg.heads)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def start(self, class_ids: Tensor, cache: KVCache) -> Tensor:
        """Feed the class tokens class_ids [B] (self.uncond for the unconditional rows) into an empty
        cache -> masked logits [B, vocab] for the first target (p_1, or v_1 for the baseline).
        No label dropout here: the caller chooses conditional or unconditional classes."""
        assert cache.length == 0, "start() needs an empty cache"
        return self._decode(self.class_embedding(class_ids), cache)

    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Feed vocabulary ids tokens [B] (the previous samples: prologue ids V.., EOS, visual ids) at
        position cache.length -> masked logits [B, vocab] for the target at that position."""
        assert 1 <= cache.length < self.T, f"step() at position {cache.length}; call start() first, T = {self.T}"
        return self._decode(self.embedding(tokens), cache)

    def _decode(self, x: Tensor, cache: KVCache) -> Tensor:
        """One input embedding x [B, D] at position p = cache.length through every block, reading and
        extending the cache; the same computation as Block.forward restricted to the last query."""
        p, (B, D) = cache.length, x.shape
        angles = self.angles[p : p + 1]  # [1, d/2]
        cos, sin = angles.cos(), angles.sin()
        x = x[:, None]  # [B, 1, D]
        for i, block in enumerate(self.transformer.blocks):
            attn = block.attn
            q, k, v = attn.qkv(block.norm1(x)).view(B, 1, 3, attn.heads, D // attn.heads).permute(2, 0, 3, 1, 4)
            cache.k[i, :, :, p : p + 1] = apply_rope(k, cos, sin)  # [B, H, 1, d]
            cache.v[i, :, :, p : p + 1] = v
            keys, values = cache.k[i, :, :, : p + 1], cache.v[i, :, :, : p + 1]  # [B, H, p + 1, d]
            y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), keys.type_as(q), values.type_as(q))
            x = x + attn.proj(y.transpose(1, 2).reshape(B, 1, D))  # all cached positions are in the past
            x = x + block.mlp(block.norm2(x))
        cache.length = p + 1
        logits = self.head(self.transformer.norm(x))[:, 0]  # [B, vocab]
        return logits.masked_fill(~self.allowed[p], float("-inf"))

    # Accounting ------------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the class and token lookup tables (no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.class_embedding.weight.numel() + self.embedding.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token of a full T-token sequence, for MFU:
        6 * (non-embedding parameters, head included) for the matmuls, plus 12 * depth * width * T for
        the attention scores and weighted values (2 matmuls * 2 FLOPs/MAC * 3 for forward + backward,
        counted over all T keys as in the PaLM paper's convention, although the causal mask halves
        the useful work)."""
        return 6 * self.num_params(exclude_embeddings=True) + 12 * self.cfg.depth * self.cfg.width * self.T
