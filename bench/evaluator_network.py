"""Benchmark: the EfficientNet-Lite0 evaluator as the metric steps run it (BatchNorms folded into the
convolutions, channels-last tensors: `modeling.features.EffNetLite0`) vs the pretrained network as
loaded (timm's tf_efficientnet_lite0, eval mode, contiguous tensors), same run.

Workload: N uint8 32x32 RGB images (drawn at random: the compute does not depend on the pixels),
resized to 224x224 and embedded in batches of B, both networks alternating in rounds so that
machine noise hits both; best round of each. First checks that both give the same pooled features
(up to float rounding). Prints images/s of each and their ratio.

    python bench/evaluator_network.py [--images 300] [--batch 100] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import machine, report
from modeling.features import EffNetLite0, network_input, pretrained_net


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    batches = images.split(args.batch)
    ours, plain = EffNetLite0(), pretrained_net()

    def plain_pooled(x: torch.Tensor) -> torch.Tensor:  # what EffNetLite0 computes, on the unfolded net
        return plain.forward_head(plain.forward_features(network_input(x)), pre_logits=True)

    nets = {"ours": lambda x: ours(x)[0], "plain": plain_pooled}
    rates: dict[str, list[float]] = {name: [] for name in nets}
    with torch.inference_mode():
        a, b = nets["ours"](batches[0]), nets["plain"](batches[0])  # also the warm-up
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), f"features differ by {float((a - b).abs().max())}"
        for _ in range(args.rounds):
            for name, net in nets.items():
                t = time.perf_counter()
                for batch in batches:
                    net(batch)
                rates[name].append(args.images / (time.perf_counter() - t))
    best = {name: max(r) for name, r in rates.items()}
    figures = {
        "workload": f"{args.images} random 32x32 uint8 images -> EfficientNet-Lite0 at 224x224, batch {args.batch}, "
        f"best of {args.rounds} alternating rounds; pooled features equal within 1e-4 (max difference "
        f"{float((a - b).abs().max()):.1e})",
        "machine": machine(threads=True),
        "folded_images_per_s": round(best["ours"], 1),
        "pretrained_images_per_s": round(best["plain"], 1),
        "ratio": round(best["ours"] / best["plain"], 3),
    }
    report(
        "images/s",
        [("folded BatchNorms, channels-last (ours)", best["ours"]), ("pretrained net as loaded", best["plain"])],
        f"ours / pretrained: {figures['ratio']:.2f}x",
        figures,
        args.json,
        digits=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
