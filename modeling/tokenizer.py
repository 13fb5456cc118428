"""Stage-1 tokenizer: ViT encoder (patches + prologue queries) -> two quantizers -> ViT decoder.

The decoder sees only the visual tokens: prologue tokens are never decoded and are trained only
through the joint AR model's CE loss (`modeling.joint_prior`). `z_len = 0` is the 2D-tokenizer
baseline, which has no query tokens and no prologue quantizer at all; `layout = "1d"` is the 1D
(TiTok-style) baseline: N learnable latent queries beside the patches are what is quantized, and
the decoder reads those N codes beside a mask token at every patch position. Prologue-Post (`post_hoc`)
keeps the 2D encoder exactly as the baseline's and adds a separate prologue encoder
(`modeling.prologue_encoder`) that reads its patch outputs.

Modules are built in a fixed order, shared ones first (encoder trunk, visual quantizer, decoder, then
the prologue parts), so that every variant starts from the same initial weights for one seed.

Images are float in [-1, 1], shape [B, C, H, W]; N = (H / patch)^2 visual tokens, Z = z_len.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modeling.blocks import Transformer, grid_rope, rope_1d
from modeling.config import KEY_UNLESS_DEFAULT, Config, ConfigError
from modeling.prologue_encoder import PrologueEncoder
from modeling.quantizers import PrologueQuantized, PrologueQuantizer, VisualQuantized, VisualQuantizer


@dataclass
class TokenizerConfig(Config):
    image_size: int = 32
    """Side of the square input images, in pixels."""
    patch_size: int = 4
    """Side of the non-overlapping patches; (image_size / patch_size)^2 visual tokens."""
    channels: int = 3
    """Image channels."""
    width: int = 128
    """Encoder transformer width."""
    depth: int = 4
    """Encoder transformer layers."""
    heads: int = 4
    """Encoder attention heads."""
    dec_width: int = 128
    """Decoder transformer width."""
    dec_depth: int = 4
    """Decoder transformer layers."""
    dec_heads: int = 4
    """Decoder attention heads."""
    code_dim: int = 8
    """Dimension of the L2-normalised code vectors (both codebooks)."""
    visual_codebook: int = 1024
    """Entries of the visual codebook."""
    z_len: int = 4
    """Prologue tokens per image (0 = the 2D-tokenizer baseline: no prologue, no joint AR)."""
    prologue_codebook: int = 256
    """Entries of the prologue codebook."""
    prologue_temperature: float = 0.1
    """Softmax temperature of the prologue quantizer's probabilistic straight-through gradient."""
    beta: float = 0.25
    """Weight of the commitment term in the visual VQ loss."""
    prior_width: int = 128
    """Joint AR prior transformer width."""
    prior_depth: int = 3
    """Joint AR prior transformer layers."""
    prior_heads: int = 4
    """Joint AR prior attention heads."""
    visual_dropout: float = 0.5
    """Fraction of samples whose visual inputs to the joint AR prior are all replaced by EOS."""
    prior_classes: int = field(default=0, metadata=KEY_UNLESS_DEFAULT)
    """Classes of a class-conditional joint prior (Prologue-OneStage: its BOS is a class embedding
    with one more, unconditional, row); 0: unconditional, one learned BOS (the method's stage 1)."""
    prior_label_dropout: float = field(default=0.1, metadata=KEY_UNLESS_DEFAULT)
    """A class-conditional prior's training-time probability of the unconditional class."""
    post_hoc: bool = field(default=False, metadata=KEY_UNLESS_DEFAULT)
    """Prologue-Post: the 2D tokenizer (no queries) is frozen and a separate prologue encoder reads its
    patch outputs with the queries; only that encoder, the prologue quantizer and the prior train."""
    post_width: int = 128
    """Prologue-Post: width of the separate prologue encoder (paper 512)."""
    post_depth: int = 2
    """Prologue-Post: layers of the separate prologue encoder (paper 10)."""
    post_heads: int = 4
    """Prologue-Post: attention heads of the separate prologue encoder (paper 8)."""
    layout: str = field(default="2d", metadata=KEY_UNLESS_DEFAULT)
    """Visual tokens: 2d (one per patch, raster order) or 1d (the 1D-tokenizer baseline: N learnable
    latent queries quantized in 1-D order; needs z_len = 0)."""

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N, the number of visual tokens per image."""
        return self.grid**2

    def validate(self) -> None:
        positive = ("image_size", "patch_size", "channels", "width", "depth", "heads", "dec_width", "dec_depth",
                    "dec_heads", "code_dim", "visual_codebook", "prologue_codebook", "prior_width", "prior_depth",
                    "prior_heads", "post_width", "post_depth", "post_heads")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        # Rotary embeddings rotate channel pairs; 2D ones split each head in two halves: head dim % 4 == 0.
        pairs = (("width", "heads", 4), ("dec_width", "dec_heads", 4), ("prior_width", "prior_heads", 2),
                 ("post_width", "post_heads", 4))  # fmt: skip
        for width, heads, mult in pairs:
            w, h = getattr(self, width), getattr(self, heads)
            if w % h or (w // h) % mult:
                raise ConfigError(f"{heads}: {width} {w} / {heads} {h} must be a whole head dim divisible by {mult}")
        if self.z_len < 0:
            raise ConfigError(f"z_len: must be >= 0, got {self.z_len}")
        if self.layout not in ("2d", "1d"):
            raise ConfigError(f"layout: {self.layout!r} is not 2d or 1d")
        if self.layout == "1d" and self.z_len:
            raise ConfigError("layout: the 1D tokenizer is a baseline without prologue tokens (z_len = 0)")
        if self.post_hoc and self.z_len == 0:
            raise ConfigError("post_hoc: a prologue path needs z_len > 0")
        if self.prologue_temperature <= 0:
            raise ConfigError(f"prologue_temperature: must be > 0, got {self.prologue_temperature}")
        if self.beta < 0:
            raise ConfigError(f"beta: must be >= 0, got {self.beta}")
        if self.prior_classes < 0:
            raise ConfigError(f"prior_classes: must be >= 0, got {self.prior_classes}")
        if not 0 <= self.prior_label_dropout <= 1:
            raise ConfigError(f"prior_label_dropout: must be in [0, 1], got {self.prior_label_dropout}")
        if not 0 <= self.visual_dropout <= 1:
            raise ConfigError(f"visual_dropout: must be in [0, 1], got {self.visual_dropout}")


class Encoder(nn.Module):
    """Patch tokens (2D RoPE) + Q learnable queries (1D RoPE after the patches), one transformer:
    Q = z_len prologue queries, or N latent queries in the 1D layout. Prologue-Post's 2D encoder has
    no queries (its prologue encoder holds them)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.n_queries = cfg.num_patches if cfg.layout == "1d" else 0 if cfg.post_hoc else cfg.z_len
        self.patchify = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads)
        self.queries = None  # the baseline carries no unused prologue parameters; see add_queries
        head_dim, n = cfg.width // cfg.heads, cfg.num_patches
        angles = torch.cat([grid_rope(cfg.grid, head_dim), rope_1d(torch.arange(n, n + self.n_queries), head_dim)])
        self.register_buffer("angles", angles, persistent=False)  # [N + Q, head_dim/2]

    def add_queries(self) -> None:
        """Create the learnable queries; called after the shared modules are built, so that those draw
        the same initial weights in every variant."""
        if self.n_queries:
            self.queries = nn.Parameter(torch.randn(self.n_queries, self.patchify.out_channels) * 0.02)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, C, H, W] -> patch outputs [B, N, width], query outputs [B, Q, width] (Q may be 0)."""
        x = self.patchify(images).flatten(2).transpose(1, 2)  # [B, N, width], raster order
        n = x.shape[1]
        if self.n_queries:
            x = torch.cat([x, self.queries.expand(x.shape[0], -1, -1)], dim=1)  # [B, N + Z, width]
        x = self.transformer(x, self.angles)
        return x[:, :n], x[:, n:]


class Decoder(nn.Module):
    """Visual code vectors [B, N, code_dim] -> images [B, C, H, W]; it has no prologue input. In the 1D
    layout a learned mask token at every patch position (2D RoPE) reads the N codes (1D RoPE after
    them), and the patches are predicted at the mask positions."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.grid, self.patch, self.channels = cfg.grid, cfg.patch_size, cfg.channels
        self.proj_in = nn.Linear(cfg.code_dim, cfg.dec_width)
        self.transformer = Transformer(cfg.dec_width, cfg.dec_depth, cfg.dec_heads)
        self.proj_out = nn.Linear(cfg.dec_width, cfg.channels * cfg.patch_size**2)
        head_dim, n = cfg.dec_width // cfg.dec_heads, cfg.num_patches
        angles = grid_rope(cfg.grid, head_dim)  # [N, head_dim/2]
        self.mask = None
        if cfg.layout == "1d":  # drawn after the shared modules: their initial weights stay every variant's
            self.mask = nn.Parameter(torch.randn(cfg.dec_width) * 0.02)
            angles = torch.cat([angles, rope_1d(torch.arange(n, 2 * n), head_dim)])  # [2N, head_dim/2]
        self.register_buffer("angles", angles, persistent=False)

    def forward(self, quantized: Tensor) -> Tensor:
        x = self.proj_in(quantized)  # [B, N, dec_width]
        if self.mask is not None:
            n = x.shape[1]
            x = torch.cat([self.mask.expand(x.shape[0], n, -1), x], dim=1)  # [B, 2N, dec_width]
            x = self.proj_out(self.transformer(x, self.angles)[:, :n])  # the mask positions: [B, N, C*p*p]
        else:
            x = self.proj_out(self.transformer(x, self.angles))  # [B, N, C*p*p]
        B, g, p = x.shape[0], self.grid, self.patch
        x = x.view(B, g, g, self.channels, p, p).permute(0, 3, 1, 4, 2, 5)  # [B, C, g, p, g, p]
        return x.reshape(B, self.channels, g * p, g * p)


@dataclass
class Encoded:
    visual: VisualQuantized
    prologue: PrologueQuantized | None  # None for the baseline (z_len == 0)


class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.visual_quantizer = VisualQuantizer(cfg.width, cfg.code_dim, cfg.visual_codebook, cfg.beta)
        self.decoder = Decoder(cfg)
        self.encoder.add_queries()
        self.prologue_encoder = PrologueEncoder(cfg) if cfg.post_hoc else None
        self.prologue_quantizer = None
        if cfg.z_len:
            width = cfg.post_width if cfg.post_hoc else cfg.width
            self.prologue_quantizer = PrologueQuantizer(width, cfg.code_dim, cfg.prologue_codebook,
                                                        cfg.prologue_temperature)  # fmt: skip

    def encode(self, images: Tensor) -> Encoded:
        patches, queries = self.encoder(images)
        if self.prologue_encoder is not None:  # the frozen 2D features: no gradient flows back into them
            queries = self.prologue_encoder(patches.detach())
        if self.cfg.layout == "1d":  # the latent queries are the visual tokens
            return Encoded(self.visual_quantizer(queries), None)
        prologue = self.prologue_quantizer(queries) if self.prologue_quantizer is not None else None
        return Encoded(self.visual_quantizer(patches), prologue)

    def decode(self, quantized: Tensor) -> Tensor:
        """Visual code vectors [B, N, code_dim] -> images [B, C, H, W]."""
        return self.decoder(quantized)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Visual codes [B, N] -> images [B, C, H, W]."""
        return self.decoder(self.visual_quantizer.lookup(codes))

    def forward(self, images: Tensor) -> tuple[Tensor, Encoded]:
        encoded = self.encode(images)
        return self.decode(encoded.visual.quantized), encoded
