"""The small causal transformer trained jointly with a Prologue tokenizer (stage 1, z_len > 0).

Vocabulary: ids 0..V-1 are visual codes, V..V+P-1 prologue codes, V+P is EOS. The sequence is

    input   [BOS] [p_1 .. p_Z] [EOS] [v_1 .. v_{N-1}]          (Z + 1 + N tokens)
    target  [p_1 .. p_Z] [EOS] [v_1 .. v_N]

with a causal mask and 1D RoPE. BOS is one learned vector (the prior is unconditional), or, with
`prior_classes` (Prologue-OneStage), a class embedding whose last row is the unconditional class:
then the modules are those of `modeling.ar_model.ARModel` of the same size, name for name. Prologue
inputs are embedded as `onehot_st @ embedding[V:V+P]`, where `onehot_st` is the prologue quantizer's
straight-through one-hot, so the CE loss reaches the encoder through the prologue path; visual inputs
are discrete ids, so no CE gradient reaches the tokenizer through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.blocks import Transformer, rope_1d
from modeling.tokenizer import TokenizerConfig


class JointPrior(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.z_len < 1:
            raise ValueError("JointPrior needs prologue tokens (z_len > 0); the baseline trains without it")
        self.V, self.P, self.Z, self.N = cfg.visual_codebook, cfg.prologue_codebook, cfg.z_len, cfg.num_patches
        self.eos = self.V + self.P
        self.visual_dropout = cfg.visual_dropout
        vocab = self.V + self.P + 1
        self.embedding = nn.Embedding(vocab, cfg.prior_width)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.uncond, self.label_dropout = cfg.prior_classes, cfg.prior_label_dropout
        if cfg.prior_classes:
            self.class_embedding = nn.Embedding(cfg.prior_classes + 1, cfg.prior_width)
            nn.init.normal_(self.class_embedding.weight, std=0.02)
        else:
            self.bos = nn.Parameter(torch.randn(cfg.prior_width) * 0.02)
        self.transformer = Transformer(cfg.prior_width, cfg.prior_depth, cfg.prior_heads, causal=True)
        self.head = nn.Linear(cfg.prior_width, vocab, bias=False)
        T = self.Z + 1 + self.N
        self.register_buffer("angles", rope_1d(torch.arange(T), cfg.prior_width // cfg.prior_heads), persistent=False)
        # Which ids each output position may emit: prologue codes, then EOS, then visual codes.
        allowed = torch.zeros(T, vocab, dtype=torch.bool)
        allowed[: self.Z, self.V : self.eos] = True
        allowed[self.Z, self.eos] = True
        allowed[self.Z + 1 :, : self.V] = True
        self.register_buffer("allowed", allowed, persistent=False)

    def forward(
        self,
        prologue_onehot: Tensor,
        visual_codes: Tensor,
        visual_dropout: float | None = None,
        class_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """prologue_onehot [B, Z, P] (straight-through, carries gradient), visual_codes [B, N] long,
        class_ids [B] long for a class-conditional prior (None: the unconditional class; in training
        mode each class becomes the unconditional one with probability prior_label_dropout).

        visual_dropout: fraction of samples whose visual inputs all become EOS (targets unchanged);
        None means cfg.visual_dropout in training mode and 0 in eval mode.
        Returns scalar `ce_prologue` (prologue and EOS positions), scalar `ce_visual`, and the masked
        `logits` [B, Z + 1 + N, vocab].
        """
        B = visual_codes.shape[0]
        assert prologue_onehot.shape == (B, self.Z, self.P), f"prologue_onehot {tuple(prologue_onehot.shape)}"
        assert visual_codes.shape == (B, self.N), f"visual_codes {tuple(visual_codes.shape)}"
        if visual_dropout is None:
            visual_dropout = self.visual_dropout if self.training else 0.0
        dropped = torch.rand(B, 1, device=visual_codes.device) < visual_dropout  # [B, 1]
        visual_in = visual_codes[:, :-1].masked_fill(dropped, self.eos)  # [B, N-1]
        eos = torch.full((B, 1), self.eos, dtype=torch.long, device=visual_codes.device)
        x = torch.cat(
            [
                self._bos(class_ids, B),  # [B, 1, D]
                prologue_onehot.to(self.embedding.weight.dtype) @ self.embedding.weight[self.V : self.eos],  # [B, Z, D]
                self.embedding(torch.cat([eos, visual_in], dim=1)),  # [B, N, D]
            ],
            dim=1,
        )
        logits = self.head(self.transformer(x, self.angles)).masked_fill(~self.allowed, float("-inf"))
        targets = torch.cat([prologue_onehot.argmax(-1) + self.V, eos, visual_codes], dim=1)  # [B, Z + 1 + N]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(B, -1)
        return {"ce_prologue": ce[:, : self.Z + 1].mean(), "ce_visual": ce[:, self.Z + 1 :].mean(), "logits": logits}

    def _bos(self, class_ids: Tensor | None, B: int) -> Tensor:
        """The first input [B, 1, D]: the one BOS vector, or the (dropped-out) class embeddings."""
        if not self.uncond:
            return self.bos.expand(B, 1, -1)
        device = self.class_embedding.weight.device
        ids = torch.full((B,), self.uncond, device=device) if class_ids is None else class_ids.to(device)
        if self.training and self.label_dropout > 0:
            ids = ids.masked_fill(torch.rand(B, device=device) < self.label_dropout, self.uncond)
        return self.class_embedding(ids)[:, None]
