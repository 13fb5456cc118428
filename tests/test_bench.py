"""The benchmarks' own correctness: the plain reference computes our model's function (else the
speed comparison means nothing), and the benchmark scripts still run against the current code."""

from __future__ import annotations

import torch

from bench.reference_ar import from_ours, non_embedding_params, reference_sample, workload
from modeling.ar_model import ARModel


def small_pair():
    torch.manual_seed(0)
    ours = ARModel(workload(width=64, depth=2, heads=2)).eval()
    return ours, from_ours(ours).eval()


def test_the_reference_computes_our_logits_from_our_weights():
    ours, ref = small_pair()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert non_embedding_params(ours) == non_embedding_params(ref) == ours.num_params(exclude_embeddings=True)
    B, cfg = 4, ours.cfg
    g = torch.Generator().manual_seed(1)
    classes = torch.randint(0, cfg.num_classes, (B,), generator=g)
    prologue = torch.randint(0, cfg.prologue_codebook, (B, cfg.z_len), generator=g)
    visual = torch.randint(0, cfg.visual_codebook, (B, cfg.num_visual), generator=g)
    with torch.no_grad():
        a, b = ours(classes, prologue, visual)["logits"], ref(classes, prologue, visual)["logits"]
    assert a.shape == b.shape and torch.equal(a.isfinite(), b.isfinite())
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=1e-4, rtol=1e-4)
    # a weight left uncopied would show: perturb one of the reference's and the logits part
    with torch.no_grad():
        ref.layers[1].feed_forward.w_gate.weight.add_(0.1)
        c = ref(classes, prologue, visual)["logits"]
    assert not torch.allclose(a.nan_to_num(), c.nan_to_num(), atol=1e-3)


def test_the_reference_sampler_respects_the_position_masks():
    ours, ref = small_pair()
    ids = reference_sample(ref, torch.arange(3) % ours.cfg.num_classes, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, ours.T)
    allowed = ours.allowed  # [T, vocab]
    assert all(bool(allowed[t, ids[:, t]].all()) for t in range(ours.T))


def test_the_token_reader_benchmark_reads_back_what_it_writes(tmp_path):
    rows = 300
    from bench.token_reader import N, Z, read_rate, write_dataset
    from pipelines.store import Store

    art, size = write_dataset(Store(str(tmp_path)), rows)
    assert set(size) == {"parquet", "wds"} and all(b > rows * (Z + N) for b in size.values())
    for fmt in ("parquet", "wds"):
        assert read_rate(art, fmt, rows) > 0  # read_rate asserts every token came back
