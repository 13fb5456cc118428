"""Stage-1 model code: tokenizer, quantizers, joint AR prior, discriminator and perceptual losses (CPU, tiny sizes)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from modeling.blocks import Transformer, grid_rope, rope_1d
from modeling.config import ConfigError, field_docs, from_dict
from modeling.discriminator import PatchDiscriminator, d_hinge_loss, g_loss
from modeling.joint_prior import JointPrior
from modeling.perceptual import ConvNeXtLogitLoss, VGGFeatureLoss
from modeling.quantizers import PrologueQuantizer, VisualQuantizer
from modeling.tokenizer import Decoder, Tokenizer, TokenizerConfig

B, Z, N, V, P = 3, 4, 16, 64, 16  # batch, prologue tokens, visual tokens (16/4)^2, codebook sizes


def tiny(z_len: int = Z, **kw) -> TokenizerConfig:
    return TokenizerConfig(
        image_size=16, patch_size=4, width=32, depth=2, heads=2, dec_width=32, dec_depth=1, dec_heads=2,
        visual_codebook=V, z_len=z_len, prologue_codebook=P, prior_width=32, prior_depth=1, prior_heads=2, **kw,
    )  # fmt: skip


def images(n: int = B, seed: int = 0, size: int = 16) -> torch.Tensor:
    """Smooth colour images in [-1, 1]: random 4x4 colour grids, bilinearly upsampled to size x size."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear", align_corners=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def nonzero(p: torch.nn.Parameter) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


# 1. shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("z_len", [0, Z])
def test_output_shapes(z_len):
    tok = Tokenizer(tiny(z_len))
    x = images()
    patches, queries = tok.encoder(x)
    assert patches.shape == (B, N, 32) and queries.shape == (B, z_len, 32)
    recon, enc = tok(x)
    assert recon.shape == x.shape
    v = enc.visual
    assert v.codes.shape == (B, N) and v.codes.dtype == torch.long and int(v.codes.max()) < V
    assert v.quantized.shape == (B, N, 8) and v.loss.shape == () and v.perplexity.shape == v.usage.shape == ()
    assert tok.visual_quantizer.lookup(v.codes).shape == (B, N, 8)
    assert tok.decode(v.quantized).shape == tok.decode_codes(v.codes).shape == x.shape
    if z_len == 0:
        assert enc.prologue is None
        return
    pro = enc.prologue
    assert pro.codes.shape == (B, Z) and pro.codes.dtype == torch.long and pro.onehot.shape == (B, Z, P)
    out = JointPrior(tiny(z_len))(pro.onehot, v.codes)
    assert out["logits"].shape == (B, Z + 1 + N, V + P + 1)
    assert out["ce_prologue"].shape == out["ce_visual"].shape == ()
    assert torch.isfinite(out["ce_prologue"]) and torch.isfinite(out["ce_visual"])


def test_decode_codes_equals_forward_reconstruction():
    tok = Tokenizer(tiny())
    recon, enc = tok(images())
    assert torch.equal(enc.visual.quantized, tok.visual_quantizer.lookup(enc.visual.codes))
    assert torch.equal(tok.decode_codes(enc.visual.codes), recon)


def test_rope_tables():
    assert rope_1d(torch.arange(5), 8).shape == (5, 4)
    grid = grid_rope(3, 8)  # 9 patches; first 2 pairs rotate with the row, last 2 with the column
    assert grid.shape == (9, 4)
    assert torch.equal(grid[4, :2], rope_1d(torch.tensor([1]), 4)[0]) and torch.equal(grid[5, 2:], grid[2, 2:])
    with pytest.raises(AssertionError):
        Transformer(8, 1, 2)(torch.zeros(1, 4, 8), rope_1d(torch.arange(3), 4))


def test_config_validation_and_docs():
    cfg = from_dict(TokenizerConfig, {"z_len": "0", "beta": "0.5"})
    assert cfg.z_len == 0 and cfg.beta == 0.5
    assert set(field_docs(TokenizerConfig)) == {f.name for f in dataclasses.fields(TokenizerConfig)}
    for bad, message in [
        ({"patch_size": 5}, "patch_size: 5 does not divide image_size 32"),
        ({"heads": 3}, "heads: "),
        ({"z_len": -1}, "z_len: must be >= 0"),
        ({"visual_dropout": 1.5}, "visual_dropout: must be in [0, 1]"),
        ({"prologue_temperature": 0}, "prologue_temperature: must be > 0"),
        ({"layout": "3d"}, "layout: '3d' is not 2d or 1d"),
        ({"layout": "1d", "z_len": 4}, "layout: the 1D tokenizer is a baseline without prologue tokens"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            from_dict(TokenizerConfig, bad)


# 2. CE gradient reaches the encoder only through the prologue path -------------------------------


@pytest.mark.parametrize("detach", [True, False])
def test_prior_ce_gradient_path(detach):
    tok, prior = Tokenizer(tiny()), JointPrior(tiny())
    enc = tok.encode(images())
    onehot = enc.prologue.onehot.detach() if detach else enc.prologue.onehot
    out = prior(onehot, enc.visual.codes, visual_dropout=0.0)
    (out["ce_prologue"] + out["ce_visual"]).backward()
    encoder_params = dict(tok.encoder.named_parameters())
    if detach:  # visual tokens enter as ids: no CE gradient anywhere in the tokenizer
        assert not any(nonzero(p) for p in tok.parameters())
    else:
        assert [n for n, p in encoder_params.items() if not nonzero(p)] == []
        assert nonzero(tok.encoder.queries) and nonzero(tok.prologue_quantizer.proj.weight)
        assert not any(nonzero(p) for p in [*tok.visual_quantizer.parameters(), *tok.decoder.parameters()])
    assert nonzero(prior.head.weight) and nonzero(prior.bos)


# 3. the decoder never sees prologue tokens -------------------------------------------------------


def test_decoder_is_independent_of_prologue():
    assert list(inspect.signature(Decoder.forward).parameters) == ["self", "quantized"]
    tok = Tokenizer(tiny())
    x = images()
    recon, enc = tok(x)
    with torch.no_grad():  # a different prologue codebook and projection: same visual path, same images
        for p in tok.prologue_quantizer.parameters():
            p.add_(torch.randn_like(p))
    recon2, enc2 = tok(x)
    assert not torch.equal(enc.prologue.codes, enc2.prologue.codes)  # the prologue did change
    assert torch.equal(recon, recon2)
    with torch.no_grad():  # different queries: decoding the same visual codes gives the same images
        tok.encoder.queries.add_(torch.randn_like(tok.encoder.queries))
    assert torch.equal(tok.decode(enc.visual.quantized), recon)
    assert torch.equal(tok.decode_codes(enc.visual.codes), recon)
    tok.zero_grad()
    recon3, _ = tok(x)  # the reconstruction loss sends no gradient into the prologue path
    (recon3 - x).abs().mean().backward()
    assert not any(nonzero(p) for p in tok.prologue_quantizer.parameters())


# 4. the baseline has no prologue parameters ------------------------------------------------------


def test_baseline_has_no_prologue_parameters():
    base, pro = Tokenizer(tiny(0)), Tokenizer(tiny())
    names = [n for n, _ in base.named_parameters()]
    assert not [n for n in names if "prologue" in n or "queries" in n]
    assert base.prologue_quantizer is None and base.encoder.queries is None
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pro) - count(base) == count(pro.prologue_quantizer) + pro.encoder.queries.numel() > 0
    with pytest.raises(ValueError, match="z_len"):
        JointPrior(tiny(0))


# 5. straight-through estimators ------------------------------------------------------------------


def test_visual_ste_passes_gradient_to_encoder():
    tok = Tokenizer(tiny(0))
    recon, enc = tok(images())
    ((recon - images()).abs().mean() + enc.visual.loss).backward()
    assert nonzero(tok.encoder.patchify.weight) and nonzero(tok.visual_quantizer.proj.weight)
    assert nonzero(tok.visual_quantizer.codebook.weight)  # trained by the VQ loss


def test_prologue_ste_value_is_hard_and_gradient_is_softmax():
    q = PrologueQuantizer(in_dim=32, code_dim=8, codebook_size=P, temperature=0.1)
    x = torch.randn(B, Z, 32, requires_grad=True)
    w = torch.randn(B, Z, P)
    out = q(x)
    assert torch.equal(out.onehot, F.one_hot(out.codes, P).float())  # exact, not approximately
    (grad_ste,) = torch.autograd.grad((out.onehot * w).sum(), x)
    soft = torch.softmax(q.project(x) @ q.entries().T / 0.1, dim=-1)
    (grad_soft,) = torch.autograd.grad((soft * w).sum(), x)
    assert grad_ste.abs().sum() > 0 and torch.allclose(grad_ste, grad_soft, atol=1e-6)
    # Through the tokenizer the same one-hot sends gradient into the encoder.
    tok = Tokenizer(tiny())
    (tok.encode(images()).prologue.onehot * torch.randn(B, Z, P)).sum().backward()
    assert nonzero(tok.encoder.patchify.weight) and nonzero(tok.encoder.queries)


def test_prologue_entropy_loss_prefers_confident_and_spread_assignments():
    from modeling.quantizers import entropy_loss

    K = 8
    spread = F.one_hot(torch.arange(K).repeat(2), K).float()[:, None]  # [16, 1, K]: every code, confidently
    collapsed = F.one_hot(torch.zeros(16, dtype=torch.long), K).float()[:, None]  # one code for all
    unsure = torch.full((16, 1, K), 1 / K)  # uniform per image
    assert entropy_loss(spread) == pytest.approx(-math.log(K))  # its minimum
    assert entropy_loss(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert entropy_loss(unsure) == pytest.approx(0.0, abs=1e-6)
    # its gradient reaches the prologue projection and codebook through the softmax
    q = PrologueQuantizer(in_dim=32, code_dim=8, codebook_size=P, temperature=0.1)
    q(torch.randn(B, Z, 32)).entropy_loss.backward()
    assert nonzero(q.proj.weight) and nonzero(q.codebook.weight)


def test_sequence_ce_weights_segments_by_token_count():
    from modeling.tokenizer_trainer import TokenizerTrainConfig, TokenizerTrainer

    trainer = TokenizerTrainer(tiny(), TokenizerTrainConfig(), torch.device("cpu"))
    ce = {"ce_prologue": torch.tensor(2.0), "ce_visual": torch.tensor(1.0)}
    # Z + 1 = 5 prologue/EOS targets and N = 16 visual targets: the mean CE per token of the sequence
    assert trainer._sequence_ce(ce, 1.0, 1.0).item() == pytest.approx((5 * 2.0 + 16 * 1.0) / 21)
    assert trainer._sequence_ce(ce, 3.0, 3.0).item() == pytest.approx(3 * (5 * 2.0 + 16 * 1.0) / 21)


def test_visual_quantizer_picks_nearest_entry_by_cosine():
    q = VisualQuantizer(in_dim=32, code_dim=8, codebook_size=V)
    x = torch.randn(B, N, 32)
    out = q(x)
    sims = q.project(x) @ q.entries().T
    assert torch.equal(out.codes, sims.argmax(-1))
    assert torch.allclose(q.entries().norm(dim=-1), torch.ones(V)) and torch.equal(out.quantized, q.lookup(out.codes))
    assert out.loss > 0


# 6. visual dropout -------------------------------------------------------------------------------


def _prior_run(prior, onehot, codes, **kw):
    seen = []
    handle = prior.embedding.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    out = prior(onehot, codes, **kw)
    handle.remove()
    return out, seen[0]  # ids embedded: [EOS, visual inputs 1..N-1]


def test_visual_dropout():
    prior = JointPrior(tiny(visual_dropout=1.0)).eval()
    onehot = F.one_hot(torch.randint(0, P, (B, Z)), P).float()
    codes, other = torch.randint(0, V, (B, N)), torch.randint(0, V, (B, N))
    eos = V + P

    out, ids = _prior_run(prior, onehot, codes, visual_dropout=1.0)
    out2, _ = _prior_run(prior, onehot, other, visual_dropout=1.0)
    assert (ids == eos).all()  # every visual input became EOS
    assert torch.equal(out["logits"], out2["logits"])  # so the visual codes cannot change any logit
    assert out["ce_visual"] != out2["ce_visual"]  # while the targets are still the real codes

    out, ids = _prior_run(prior, onehot, codes, visual_dropout=0.0)
    out2, _ = _prior_run(prior, onehot, other, visual_dropout=0.0)
    assert (ids[:, 0] == eos).all() and torch.equal(ids[:, 1:], codes[:, :-1])
    assert torch.equal(out["logits"][:, : Z + 1], out2["logits"][:, : Z + 1])  # causal: prologue ignores visuals
    assert not torch.equal(out["logits"][:, Z + 2 :], out2["logits"][:, Z + 2 :])

    _, ids = _prior_run(prior, onehot, codes)  # eval default: no dropout
    assert torch.equal(ids[:, 1:], codes[:, :-1])
    _, ids = _prior_run(prior.train(), onehot, codes)  # train default: cfg.visual_dropout (= 1 here)
    assert (ids == eos).all()
    _, ids = _prior_run(prior, onehot, codes, visual_dropout=0.5)  # per sample: all or none of a row
    assert all((row == eos).all() or torch.equal(row[1:], c[:-1]) for row, c in zip(ids, codes, strict=True))


# 7. logit masks ----------------------------------------------------------------------------------


def test_logit_masks():
    prior = JointPrior(tiny())
    with torch.no_grad():
        prior.head.weight.normal_(std=10.0)  # large random logits everywhere before masking
    onehot = F.one_hot(torch.randint(0, P, (8, Z)), P).float()
    logits = prior(onehot, torch.randint(0, V, (8, N)))["logits"]
    top = logits.argmax(-1)
    assert ((top[:, :Z] >= V) & (top[:, :Z] < V + P)).all()
    assert (top[:, Z] == V + P).all()
    assert (top[:, Z + 1 :] < V).all()
    assert torch.isinf(logits[:, :Z, :V]).all() and torch.isinf(logits[:, Z + 1 :, V:]).all()


# 8. a short overfit ------------------------------------------------------------------------------


# the 1D decoder must first learn where each latent's content goes (through attention): twice the steps
@pytest.mark.parametrize("layout, steps", [("2d", 100), ("1d", 200)])
def test_overfit_reduces_l1_by_half(layout, steps):
    tok = Tokenizer(tiny(0, layout=layout))
    x = images(8)
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-3)
    with torch.no_grad():
        start = (tok(x)[0] - x).abs().mean().item()
    for _ in range(steps):
        recon, enc = tok(x)
        loss = (recon - x).abs().mean() + enc.visual.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        recon, enc = tok(x)
    end = (recon - x).abs().mean().item()
    assert end <= 0.5 * start, (start, end)
    used = enc.visual.usage.item() * V
    assert 1 <= enc.visual.perplexity.item() <= used + 1e-4 and 1 <= used <= min(V, 8 * N)


def test_1d_tokenizer_quantizes_latent_queries_and_shares_the_2d_initial_weights():
    """The 1D baseline: its N visual codes come from N learnable latent queries (not from the
    patches), the decoder reads them beside a mask token per patch; the modules it shares with the
    2D baseline start from the same weights for one seed."""
    torch.manual_seed(0)
    one = Tokenizer(tiny(0, layout="1d"))
    torch.manual_seed(0)
    two = Tokenizer(tiny(0))
    shared = dict(two.named_parameters())
    own = {n for n, _ in one.named_parameters() if n not in shared}
    assert own == {"encoder.queries", "decoder.mask"} and one.encoder.queries.shape == (N, 32)
    assert all(torch.equal(p, shared[n]) for n, p in one.named_parameters() if n in shared)
    x = images()
    recon, enc = one(x)
    assert enc.visual.codes.shape == (B, N) and enc.prologue is None and recon.shape == x.shape
    assert torch.equal(one.decode_codes(enc.visual.codes), recon)
    with torch.no_grad():  # the codes move with the latent queries, the 2D tokenizer has none
        before = one.encode(x).visual.codes
        one.encoder.queries.add_(torch.randn_like(one.encoder.queries))
        assert not torch.equal(one.encode(x).visual.codes, before) and two.encoder.queries is None


# 9. discriminator and perceptual losses-----------------------------------------------------------


def test_patch_discriminator_and_hinge_losses():
    d = PatchDiscriminator(channels=3, base=8, layers=3)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 4, 4)
    assert d(torch.randn(1, 3, 16, 16)).shape == (1, 1, 2, 2)  # batch 1 in train mode (GroupNorm)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in d.modules())
    ones = torch.ones(2, 1, 4, 4)
    assert d_hinge_loss(2 * ones, -2 * ones).item() == 0.0  # confident and right: no loss
    assert d_hinge_loss(0 * ones, 0 * ones).item() == 1.0
    assert d_hinge_loss(0.5 * ones, 0.5 * ones).item() == pytest.approx(0.5 * (0.5 + 1.5))
    assert g_loss(3 * ones).item() == -3.0


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """A randomly initialised torchvision VGG16's `features.*` weights, written locally (no download)."""
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    state = torchvision.models.vgg16(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, path)
    return str(path)


def _check_perceptual(loss, size: int):
    assert not loss.net.training and not any(p.requires_grad for p in loss.parameters())
    a, b = images(2, seed=1, size=size), images(2, seed=2, size=size)
    assert loss(a, a).item() == 0.0
    a.requires_grad_(True)
    value = loss(a, b)
    value.backward()
    assert value.item() > 0 and a.grad.abs().sum() > 0


def test_vgg_feature_loss(vgg_weights, tmp_path):
    _check_perceptual(VGGFeatureLoss(vgg_weights).train(), 16)
    with pytest.raises(FileNotFoundError, match="VGG16 weights"):
        VGGFeatureLoss(str(tmp_path / "missing.pth"))


def test_convnext_logit_loss(tmp_path, vgg_weights):
    """Prologue-L's perceptual loss: ConvNeXt-S logits from a local state dict (random weights here)."""
    path = tmp_path / "convnext_small.pth"
    torch.save(torchvision.models.convnext_small(weights=None).state_dict(), path)
    _check_perceptual(ConvNeXtLogitLoss(str(path)).train(), 32)
    with pytest.raises(FileNotFoundError, match="ConvNeXt-S weights"):
        ConvNeXtLogitLoss(str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match="state_dict"):  # a VGG file is not a ConvNeXt-S one
        ConvNeXtLogitLoss(vgg_weights)


def test_post_hoc_tokenizer_is_the_2d_tokenizer_plus_a_separate_prologue_encoder():
    """Prologue-Post: the 2D encoder has no queries and loads the baseline's weights as they are; a
    separate prologue encoder reads its patch outputs, so the visual codes are exactly the 2D
    tokenizer's whatever the prologue path holds, and the CE cannot reach the 2D encoder."""
    base = Tokenizer(tiny(z_len=0)).eval()
    post = Tokenizer(tiny(post_hoc=True, post_width=16, post_depth=1, post_heads=1)).eval()
    missing, unexpected = post.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing
    assert all(k.startswith(("prologue_encoder.", "prologue_quantizer.")) for k in missing)
    assert post.encoder.queries is None
    assert post.prologue_quantizer.proj.in_features == 16  # the prologue encoder's width, not the 2D one's
    x = images()
    with torch.no_grad():
        codes = post.encode(x).visual.codes
        assert torch.equal(codes, base.encode(x).visual.codes)
        before = post.encode(x).prologue.codes
        post.prologue_encoder.queries.normal_()
        after = post.encode(x)
        assert torch.equal(after.visual.codes, codes) and not torch.equal(after.prologue.codes, before)
    out = post.encode(x)
    out.prologue.onehot.sum().backward()
    assert all(p.grad is None for p in post.encoder.parameters())  # the 2D features are read detached
    assert nonzero(post.prologue_encoder.queries)
    with pytest.raises(ConfigError, match="post_hoc: a prologue path needs z_len > 0"):
        Tokenizer(tiny(z_len=0, post_hoc=True))


def test_every_variant_starts_from_the_same_shared_weights():
    """One seed, one initialisation of the shared modules, whatever the variant adds."""
    made = {}
    for name, cfg in {"baseline": tiny(z_len=0), "prologue": tiny(), "z2": tiny(z_len=2)}.items():
        torch.manual_seed(7)
        made[name] = Tokenizer(cfg).state_dict()
    for name, sd in made.items():
        for k, v in made["baseline"].items():
            assert torch.equal(sd[k], v), f"{name}: {k}"
