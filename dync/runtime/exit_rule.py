"""The exit rule: a sample leaves at the first exit whose confidence reaches that exit's threshold.

Confidence comes from the exit's logits through the exit's criterion, higher meaning more confident, every
value in [0, 1]: `max_softmax` (the largest softmax probability, MSDNet's and RANet's rule), `entropy`
(1 - H(p) / ln C, the normalized negative entropy of BranchyNet-style exits), `margin` (top-1 minus top-2
probability), or a user criterion the package holds as an ONNX graph (`criterion_onnx`, run in onnxruntime).
Logits of more than two dims are flattened per sample: the criterion sees [B, C] with C their product.

The built-in criteria are computed in float32 as `torch.softmax(logits.float(), -1)` is (subtract the max,
exp, sum, divide), so that thresholds chosen with PyTorch evaluation scripts pick the same exits: a saturated
sample's max softmax is exactly 1.0 in both, which a threshold of 1.0 takes. Elsewhere the two agree to a few
float32 ulps (torch's vectorized exp and summation order are its own); only a threshold within those ulps of a
sample's confidence can decide differently.

Thresholds: one per exit but the last (K-1 values); K values are accepted with the last ignored, because the
last exit always takes every sample still running. 0 always fires. A threshold up to 1 is rounded to the nearest
float32, as torch does when it compares a float32 confidence with a Python float; one above 1 is kept as it is,
so it never fires, however close to 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dync.errors import InputError, PackageError
from dync.package import MANIFEST_FILE, ExitSpec

_F32 = np.float32


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 probabilities [B, C] of the flattened logits, computed as torch's softmax computes them."""
    flat = logits.reshape(len(logits), -1).astype(_F32, copy=False)
    with np.errstate(invalid="ignore"):  # a row of -inf gives NaN, as in torch
        e = np.exp(flat - flat.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """The largest softmax probability per sample: torch's `softmax(...).max(-1)`; 1.0 when saturated."""
    return softmax(logits).max(axis=1)


def entropy(logits: np.ndarray) -> np.ndarray:
    """1 - H(p) / ln C per sample, clipped to [0, 1] against rounding: 1 for a one-hot p (and for C = 1), 0 for a
    uniform one. BranchyNet's and DeeBERT's rule "exit when H(p) < T" is this confidence >= 1 - T / ln C."""
    p = softmax(logits)
    if p.shape[1] == 1:
        return np.ones(len(p), dtype=_F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), _F32(0)).sum(axis=1)
    return np.clip(_F32(1) - h / _F32(np.log(p.shape[1])), _F32(0), _F32(1))


def margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability per sample (the top-1 probability when there is one class)."""
    p = softmax(logits)
    if p.shape[1] == 1:
        return p[:, 0]
    top = np.partition(p, -2, axis=1)
    return top[:, -1] - top[:, -2]


BUILTIN_CRITERIA: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_softmax": max_softmax,
    "entropy": entropy,
    "margin": margin,
}
DEFAULT_CRITERION = "max_softmax"


class OnnxCriterion:
    """A user criterion exported into the package: an onnxruntime session of logits [B, C] -> confidence [B]."""

    def __init__(self, path: Path) -> None:
        from dync.runtime.backends.ort import OrtSettings, session_from_onnx

        self.path = path
        self._session = session_from_onnx(path, OrtSettings(threads=1, fixed_batches=0))
        self._input = self._session.get_inputs()[0].name

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        flat = logits.reshape(len(logits), -1).astype(_F32, copy=False)
        (values,) = self._session.run(None, {self._input: flat})
        if values.shape != (len(flat),):
            raise PackageError(f"{self.path} returned shape {list(values.shape)} for logits {list(flat.shape)}, not "
                               f"one confidence per sample; re-export the package with a criterion that does.")
        return values.astype(_F32, copy=False)


class ExitCriteria:
    """Each exit's confidence function for one package: a built-in, or the package's ONNX graph of a user
    criterion (one session per graph file, built at load so that a broken package fails there)."""

    def __init__(self, package_dir: Path, exits: Sequence[ExitSpec]) -> None:
        graphs: dict[str, OnnxCriterion] = {}
        self._functions: list[Callable[[np.ndarray], np.ndarray]] = []
        for k, spec in enumerate(exits):
            if spec.criterion_onnx is not None:
                if spec.criterion_onnx not in graphs:
                    graphs[spec.criterion_onnx] = OnnxCriterion(Path(package_dir) / spec.criterion_onnx)
                self._functions.append(graphs[spec.criterion_onnx])
            elif spec.criterion in BUILTIN_CRITERIA:
                self._functions.append(BUILTIN_CRITERIA[spec.criterion])
            else:
                raise PackageError(
                    f"{Path(package_dir) / MANIFEST_FILE}: exit {k}'s criterion '{spec.criterion}' is unknown to "
                    f"this dync (built-in: {', '.join(BUILTIN_CRITERIA)}) and the package holds no ONNX graph for "
                    "it; re-export the package with this dync."
                )

    def confidence(self, k: int, logits: np.ndarray) -> np.ndarray:
        """Exit k's confidence per sample (float32 [B]) from its logits [B, ...]."""
        return self._functions[k](logits)

    def confidences(self, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Every exit's confidences, from every exit's outputs on one batch."""
        return [self.confidence(k, out) for k, out in enumerate(outputs)]


def resolve_thresholds(thresholds: Sequence[float] | None, num_exits: int) -> np.ndarray:
    """K-1 thresholds as float64 holding what the exit rule compares (see the module docstring); None means no
    early exit (every sample takes the last exit)."""
    if thresholds is None:
        return np.full(num_exits - 1, np.inf)
    values = np.asarray(list(thresholds), dtype=np.float64)
    if values.ndim != 1 or len(values) not in (num_exits - 1, num_exits):
        raise InputError(
            f"got {values.size} thresholds for a package with {num_exits} exits; give {num_exits - 1} "
            f"(one per exit but the last) or {num_exits}."
        )
    if np.isnan(values).any():
        raise InputError("thresholds contain NaN; give numbers (above 1 never exits, 0 always exits).")
    values = values[: num_exits - 1]
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, as in torch
        return np.where(values > 1, values, values.astype(_F32).astype(np.float64))


def forcing_thresholds(exit_index: int, num_exits: int) -> np.ndarray:
    """Thresholds that send every sample to `exit_index`, to measure or verify one exit path."""
    assert 0 <= exit_index < num_exits
    values = np.full(num_exits - 1, np.inf)
    values[exit_index:] = 0.0
    return values
