"""PCA of DELF descriptors: fit in numpy, store as `.npz` (no pickle), apply in the graph.

Also reads and writes the reference's layout: a folder of `.datum` files
(mean.datum [D], pca_proj_mat.datum [K, D] with the components as rows,
optional pca_vars.datum), see `PcaParams.from_datum_folder`.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from delf_tf.atomic import atomic_write
from delf_tf.errors import ConfigError, InputError
from delf_tf.formats.datum import read_datum, write_datum

# File names of the reference release (pca_vars.datum: name used by the example data,
# the release ships no variances).
MEAN_DATUM = "mean.datum"
PROJECTION_DATUM = "pca_proj_mat.datum"
VARIANCES_DATUM = "pca_vars.datum"


@dataclasses.dataclass(frozen=True)
class PcaParams:
    """PCA learnt from L2-normalised descriptors.

    Attributes:
      mean: float32 [D] descriptor mean.
      projection: float32 [K, D] principal axes as rows, by decreasing variance.
      variances: float32 [K] variance along each axis (eigenvalues), or None when
        unknown (a reference release ships none); whitening then is refused.
      whiten: divide each component by the square root of its variance.
    """

    mean: np.ndarray
    projection: np.ndarray
    variances: np.ndarray | None
    whiten: bool = False

    def __post_init__(self) -> None:
        for name in ("mean", "projection", "variances"):
            if name == "variances" and self.variances is None:
                continue
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        object.__setattr__(self, "whiten", bool(self.whiten))
        k, d = self.projection.shape if self.projection.ndim == 2 else (-1, -1)
        variances_shape = None if self.variances is None else self.variances.shape
        if self.mean.shape != (d,) or variances_shape not in (None, (k,)) or k < 1:
            raise ValueError(
                f"inconsistent PCA shapes: mean {self.mean.shape}, projection "
                f"{self.projection.shape}, variances {variances_shape}"
            )
        if self.whiten and self.variances is None:
            raise ConfigError("PCA whitening needs the variances of the components; none given")

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.projection.shape[0])

    def save(self, path: str | os.PathLike) -> None:
        """Writes an `.npz` (mean, projection, whiten, and variances unless None)."""
        arrays = {"mean": self.mean, "projection": self.projection}
        if self.variances is not None:
            arrays["variances"] = self.variances
        atomic_write(path, lambda handle: np.savez(handle, **arrays, whiten=np.array(self.whiten)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PcaParams:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in ("mean", "projection")}
                arrays["variances"] = data["variances"] if "variances" in data.files else None
                arrays["whiten"] = bool(data["whiten"]) if "whiten" in data.files else False
        except KeyError as error:
            raise InputError(f"{path}: not a PCA file (missing array {error})") from error
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            # np.load takes any other file for a pickle, which it refuses: say what it is not.
            reason = "not an .npz archive" if "pickle" in str(error) else error
            raise InputError(f"{path}: not a readable PCA file ({reason})") from error
        try:
            return cls(**arrays)
        except ValueError as error:
            raise ConfigError(f"{path}: {error}") from error

    @classmethod
    def from_datum_folder(
        cls,
        folder_or_paths: str | os.PathLike | tuple[str | os.PathLike, str | os.PathLike],
        whiten: bool = False,
        variances_path: str | os.PathLike | None = None,
    ) -> PcaParams:
        """Reads PCA parameters in the reference layout.

        Args:
          folder_or_paths: a folder holding mean.datum [D] and pca_proj_mat.datum
            [K, D] (components as rows), or the pair (mean path, projection path),
            e.g. the mean_path / projection_matrix_path of a DelfConfig.
          whiten: as DelfPcaParameters.use_whitening; needs variances.
          variances_path: a [K] or [D] (first K used) variances datum (the
            config's pca_variances_path). Default: pca_vars.datum in the folder
            when it exists, else no variances.
        Raises:
          InputError (DatumError) for unreadable files, ConfigError for
          inconsistent shapes or whitening without variances.
        """
        if isinstance(folder_or_paths, tuple):
            mean_path, projection_path = (Path(p) for p in folder_or_paths)
        else:
            folder = Path(folder_or_paths)
            mean_path, projection_path = folder / MEAN_DATUM, folder / PROJECTION_DATUM
            if variances_path is None and (folder / VARIANCES_DATUM).is_file():
                variances_path = folder / VARIANCES_DATUM
        mean = read_datum(mean_path).astype(np.float32)
        projection = read_datum(projection_path).astype(np.float32)
        variances = None
        if variances_path is not None:
            variances = read_datum(variances_path).astype(np.float32)
            if variances.ndim == 1 and projection.ndim == 2:
                variances = variances[: projection.shape[0]]
        try:
            return cls(mean=mean, projection=projection, variances=variances, whiten=whiten)
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(f"{projection_path.parent}: {error}") from error

    def save_datum_folder(self, folder: str | os.PathLike) -> None:
        """Writes mean.datum, pca_proj_mat.datum and (unless None) pca_vars.datum, each
        atomically, in the reference layout (float32 DatumProtos)."""
        folder = Path(folder)
        write_datum(folder / MEAN_DATUM, self.mean)
        write_datum(folder / PROJECTION_DATUM, self.projection)
        if self.variances is not None:
            write_datum(folder / VARIANCES_DATUM, self.variances)


def fit_pca(descriptors: np.ndarray, dim: int, whiten: bool = False) -> PcaParams:
    """Learns the top-`dim` principal axes of descriptors float [N, D].

    Axes are eigenvectors of the sample covariance (float64), sorted by
    decreasing eigenvalue, each signed so that its largest-magnitude component
    is positive (a deterministic choice of sign).
    """
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"need at least 2 descriptors [N, D] to fit PCA, got shape {x.shape}")
    if not 1 <= dim <= x.shape[1]:
        raise ConfigError(f"PCA dim must be in [1, {x.shape[1]}] (the descriptor size), got {dim}")
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
