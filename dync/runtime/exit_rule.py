"""The exit rule: a sample leaves at the first exit whose confidence reaches that exit's threshold.

Confidence comes from the exit's logits through the exit's criterion, higher meaning more confident, every
value in [0, 1]: `max_softmax` (the largest softmax probability, MSDNet's and RANet's rule), `entropy`
(1 - H(p) / ln C, the normalized negative entropy of BranchyNet-style exits), `margin` (top-1 minus top-2
probability), or a user criterion the package holds as an ONNX graph (`criterion_onnx`, run in onnxruntime).
Logits of more than two dims are flattened per sample: the criterion sees [B, C] with C their product.

The built-in criteria are float32 and bit-identical to torch's CPU softmax (`torch.softmax(logits.float(), -1)`),
so that thresholds chosen with PyTorch evaluation scripts pick the same exits: in particular a saturated
sample's max softmax is exactly 1.0, which a threshold of 1.0 takes. Being bit-identical means computing as
ATen's `_vec_softmax_lastdim` does: exp as Sleef's `expf_u10` (with FMA), the sum in the lane order of its
vectorized reduction (16 lanes where torch dispatches to AVX-512, 8 elsewhere: see `TORCH_LANES`), and a
multiply by 1/sum.

Thresholds: one per exit but the last (K-1 values); K values are accepted with the last ignored, because the
last exit always takes every sample still running. 0 always fires. A threshold up to 1 is rounded to the nearest
float32, as torch does when it compares a float32 confidence with a Python float; one above 1 is kept as it is,
so it never fires, however close to 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dync.errors import InputError, PackageError
from dync.package import MANIFEST_FILE, ExitSpec

_F32, _F64 = np.float32, np.float64


def _torch_lanes() -> int:
    """Floats per vector in torch's CPU kernels on this machine: 16 where ATen picks its AVX-512 kernels (as
    `ATEN_CPU_CAPABILITY` or the CPU's AVX-512 F/BW/VL/DQ and FMA say), else 8 (AVX2, and ARM's NEON pairs)."""
    requested = os.environ.get("ATEN_CPU_CAPABILITY")
    if requested:
        return 16 if requested == "avx512" else 8
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return 16 if all(features.get(f) for f in ("AVX512F", "AVX512BW", "AVX512VL", "AVX512DQ", "FMA3")) else 8


TORCH_LANES = _torch_lanes()

_LN2_INV = _F32(1.442695040888963407359924681001892137426645954152985934135449406931)
_LN2_HI, _LN2_LO = _F32(0.693145751953125), _F32(1.428606765330187045e-06)
_EXP_POLY = [_F32(c) for c in (0.000198527617612853646278381, 0.00139304355252534151077271,
                               0.00833336077630519866943359, 0.0416664853692054748535156,
                               0.166666671633720397949219, 0.5)]


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 a * b + c rounded once: the product of two float32 is exact in float64."""
    return (a.astype(_F64) * b + c).astype(_F32)


def _sleef_exp(d: np.ndarray) -> np.ndarray:
    """Sleef's `xexpf` (u10, FMA form), which `Vectorized<float>::exp` calls; for d <= 0 as softmax feeds it."""
    with np.errstate(invalid="ignore", over="ignore"):  # -inf and NaN logits: masked below, or NaN as in torch
        q = np.rint(d * _LN2_INV)
        s = _fma(q, -_LN2_LO, _fma(q, -_LN2_HI, d))
        u = _fma(s, _EXP_POLY[0], _EXP_POLY[1])
        for c in _EXP_POLY[2:]:
            u = _fma(u, s, c)
        u = _F32(1) + _fma(s * s, u, s)
        return np.where(d < -104, _F32(0), np.ldexp(u, q.astype(np.int32)))


def _lane_sum(x: np.ndarray, lanes: int) -> np.ndarray:
    """Row sums in the order of ATen's `vec::reduce_all`: lane-wise over `lanes`-wide chunks (the tail masked),
    then the lanes folded in halves; rows shorter than a vector are summed left to right."""
    rows, n = x.shape
    if n < lanes:
        return np.add.accumulate(x, axis=1)[:, -1]
    chunks = np.pad(x, ((0, 0), (0, -n % lanes))).reshape(rows, -1, lanes)
    acc = np.add.accumulate(chunks, axis=1)[:, -1]
    while acc.shape[1] > 1:
        half = acc.shape[1] // 2
        acc = acc[:, :half] + acc[:, half:]
    return acc[:, 0]


def softmax(logits: np.ndarray, lanes: int = TORCH_LANES) -> np.ndarray:
    """float32 probabilities [B, C] of the flattened logits, as `torch.softmax(logits.float().flatten(1), -1)`
    computes them on a CPU whose torch kernels are `lanes` floats wide."""
    flat = logits.reshape(len(logits), -1).astype(_F32, copy=False)
    e = _sleef_exp(flat - flat.max(axis=1, keepdims=True))
    return e * (_F32(1) / _lane_sum(e, lanes))[:, None]


def max_softmax(logits: np.ndarray, lanes: int = TORCH_LANES) -> np.ndarray:
    """The largest softmax probability per sample: torch's `softmax(...).max(-1)`; 1.0 when saturated."""
    return softmax(logits, lanes).max(axis=1)


def entropy(logits: np.ndarray, lanes: int = TORCH_LANES) -> np.ndarray:
    """1 - H(p) / ln C per sample, clipped to [0, 1] against rounding: 1 for a one-hot p (and for C = 1), 0 for a
    uniform one. BranchyNet's and DeeBERT's rule "exit when H(p) < T" is this confidence >= 1 - T / ln C."""
    p = softmax(logits, lanes)
    if p.shape[1] == 1:
        return np.ones(len(p), dtype=_F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), _F32(0)).sum(axis=1)
    return np.clip(_F32(1) - h / _F32(np.log(p.shape[1])), _F32(0), _F32(1))


def margin(logits: np.ndarray, lanes: int = TORCH_LANES) -> np.ndarray:
    """Top-1 minus top-2 softmax probability per sample (the top-1 probability when there is one class)."""
    p = softmax(logits, lanes)
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
