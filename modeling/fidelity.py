"""Sample-quality metrics, each named after its evaluator: FD / KID / IS-style / precision-recall.

The default evaluator is EfficientNet-Lite0 (`fd_effnetlite0`, offline). InceptionV3 (`fid_inception`) runs only
from a local weights file: nothing is ever downloaded. Reference statistics are `.npz` files with `mu` and `sigma`
(the ADM reference batches load as they are), so rFD/gFD can be recomputed without re-embedding the reference set.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np
import torch
from scipy import linalg
from torch.utils.data import DataLoader, Dataset

from modeling.features import EffNetLite0, register


class ImageSet(Dataset):
    """uint8 images [N, 3, H, W] as a Dataset of [3, H, W] tensors (what torch-fidelity reads)."""

    def __init__(self, images: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, (images.dtype, images.shape)
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def as_dataset(images: torch.Tensor | Dataset) -> Dataset:
    return ImageSet(images) if torch.is_tensor(images) else images


# Fréchet distance between Gaussians fitted to features ----------------------------------------------------------


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> mean [D] and covariance [D, D] (unbiased), in float64."""
    f = np.asarray(features, dtype=np.float64)
    assert f.ndim == 2 and len(f) > 1, f.shape
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    As in the reference implementations (TTUR, pytorch-fid, ADM's evaluator): if the square root of the product is
    not finite (near-singular covariances), eps * I is added to both covariances; a complex result whose diagonal
    has a non-negligible imaginary part is an error, otherwise the real part is kept.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    d = len(mu1)
    assert mu1.shape == mu2.shape == (d,) and sigma1.shape == sigma2.shape == (d, d), (mu1.shape, sigma2.shape)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise ValueError(f"matrix square root has an imaginary component {imaginary:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fd_from_features(features: np.ndarray | torch.Tensor, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """Fréchet distance of features [N, D] to cached reference statistics (rFD / gFD without re-embedding)."""
    return frechet_distance(*feature_stats(features), ref_mu, ref_sigma)


@torch.no_grad()
def image_features(images: torch.Tensor | Dataset, batch_size: int = 64) -> np.ndarray:
    """EfficientNet-Lite0 pooled features [N, 1280] (float32) of uint8 images [N, 3, H, W] or a Dataset of them."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = EffNetLite0().to(device)
    loader = DataLoader(as_dataset(images), batch_size=batch_size, shuffle=False)
    return torch.cat([model(batch.to(device))[0].cpu() for batch in loader]).numpy()


# reference statistics files -------------------------------------------------------------------------------------


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes `mu` [D] and `sigma` [D, D] to exactly `path` (an .npz; byte-identical for identical statistics)."""
    with open(path, "wb") as f:
        np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads `mu` and `sigma` from an .npz (ours or an ADM reference batch; other arrays in it are not read)."""
    with np.load(path) as data:
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes: the checksum to record beside a metric's reference set."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# the metrics the pipeline reports --------------------------------------------------------------------------------


class Embedder:
    """A torch-fidelity feature extractor: uint8 batches -> (pooled features, logits).

    effnetlite0: EfficientNet-Lite0 (registered by modeling.features), 1280-d pool + 1000 logits.
    inception: torch-fidelity's InceptionV3 from a local weights file, 2048-d pool + unbiased logits.
    """

    def __init__(self, evaluator: str, weights_path: str = ""):
        from torch_fidelity.utils import create_feature_extractor

        self.cuda = torch.cuda.is_available()
        if evaluator == "effnetlite0":
            self.extractor = create_feature_extractor(register(), ["pool", "logits"], cuda=self.cuda, verbose=False)
        elif evaluator == "inception" and weights_path:
            self.extractor = create_feature_extractor(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                cuda=self.cuda,
                verbose=False,
                feature_extractor_weights_path=weights_path,
            )
        else:
            raise ValueError(f"evaluator {evaluator!r} needs a local weights file (nothing is downloaded)")

    @torch.no_grad()
    def __call__(self, batches: Iterable[torch.Tensor], limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        pools, logits, seen = [], [], 0
        for images in batches:
            if limit:
                images = images[: limit - seen]
            pool, logit = self.extractor(images.cuda() if self.cuda else images)
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
            seen += len(images)
            if limit and seen >= limit:
                break
        return torch.cat(pools), torch.cat(logits)


def set_metrics(pool: torch.Tensor, logits: torch.Tensor, ref: tuple, evaluator: str) -> dict[str, float]:
    """FD, KID, precision/recall against the reference, and the IS-style score, named by evaluator."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    mu, sigma, ref_pool = ref
    n = min(len(pool), len(ref_pool))
    kid = kid_features_to_metric(pool, ref_pool, kid_subset_size=min(1000, n), verbose=False)
    prc = prc_features_to_metric(pool, ref_pool, save_cpu_ram=True, verbose=False)
    isc = isc_features_to_metric(logits, splits=min(10, len(logits)))
    e = evaluator
    fd = "fid" if e == "inception" else "fd"  # only InceptionV3's Fréchet distance is a FID
    return {
        f"{fd}_{e}": fd_from_features(pool.numpy(), mu, sigma),
        f"kid_{e}_mean": kid["kernel_inception_distance_mean"],
        f"kid_{e}_std": kid["kernel_inception_distance_std"],
        f"precision_{e}": prc["precision"],
        f"recall_{e}": prc["recall"],
        f"is_{e}_mean": isc["inception_score_mean"],
        f"is_{e}_std": isc["inception_score_std"],
    }
