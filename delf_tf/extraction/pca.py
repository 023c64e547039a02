"""PCA of DELF descriptors: fit in numpy, store as `.npz` (no pickle), apply in the graph."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from delf_tf.atomic import atomic_write


@dataclasses.dataclass(frozen=True)
class PcaParams:
    """PCA learnt from L2-normalised descriptors.

    Attributes:
      mean: float32 [D] descriptor mean.
      projection: float32 [K, D] principal axes as rows, by decreasing variance.
      variances: float32 [K] variance along each axis (eigenvalues).
      whiten: divide each component by the square root of its variance.
    """

    mean: np.ndarray
    projection: np.ndarray
    variances: np.ndarray
    whiten: bool = False

    def __post_init__(self) -> None:
        for name in ("mean", "projection", "variances"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        object.__setattr__(self, "whiten", bool(self.whiten))
        k, d = self.projection.shape if self.projection.ndim == 2 else (-1, -1)
        if self.mean.shape != (d,) or self.variances.shape != (k,) or k < 1:
            raise ValueError(
                f"inconsistent PCA shapes: mean {self.mean.shape}, projection "
                f"{self.projection.shape}, variances {self.variances.shape}"
            )

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.projection.shape[0])

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(
            path,
            lambda handle: np.savez(
                handle,
                mean=self.mean,
                projection=self.projection,
                variances=self.variances,
                whiten=np.array(self.whiten),
            ),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> PcaParams:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in ("mean", "projection", "variances")}
                arrays["whiten"] = bool(data["whiten"]) if "whiten" in data.files else False
        except KeyError as error:
            raise ValueError(f"{path}: not a PCA file (missing array {error})") from error
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise ValueError(f"{path}: not a readable PCA file ({error})") from error
        try:
            return cls(**arrays)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


def fit_pca(descriptors: np.ndarray, dim: int, whiten: bool = False) -> PcaParams:
    """Learns the top-`dim` principal axes of descriptors float [N, D].

    Axes are eigenvectors of the sample covariance (float64), sorted by
    decreasing eigenvalue, each signed so that its largest-magnitude component
    is positive (a deterministic choice of sign).
    """
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 descriptors [N, D] to fit PCA, got shape {x.shape}")
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"PCA dim must be in [1, {x.shape[1]}], got {dim}")
    mean = x.mean(axis=0)
    centered = x - mean
    covariance = centered.T @ centered / (x.shape[0] - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][:dim]
    axes = eigenvectors[:, order].T
    signs = np.sign(axes[np.arange(dim), np.argmax(np.abs(axes), axis=1)])
    axes *= np.where(signs == 0, 1.0, signs)[:, None]
    return PcaParams(
        mean=mean,
        projection=axes,
        variances=np.maximum(eigenvalues[order], 0.0),
        whiten=whiten,
    )
