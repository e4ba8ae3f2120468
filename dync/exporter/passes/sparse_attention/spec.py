"""`--sparse-attention SPEC` and `--attention-fp8 FORMAT`: what the user asks for, parsed and checked.

    tile:T=21,H=30,W=52,tile=3x6x4,window=3x3x3     a static sliding tile window over a T x H x W token grid
    meansim:cdf=0.9,sim=0.5[,block=128]             per input, from mean-pooled blocks (or topk=0.25)
    dense[:block=128]                               every block (with --attention-fp8: dense fp8 attention)

Either takes `dense-until=0.3` (with `timestep=NAME`, default the input named t, timestep or timesteps, and
`t-max=1000`): samples whose timestep is above `(1 - 0.3) * t-max`, the first 30% of a denoising run from
t-max down to 0, keep dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from dync.errors import InputError, PluginError
from dync.plugins.block_sparse_attention import FP8_MAX, tile_grid

RULES = ("tile", "meansim", "dense")
FP8_CHOICES = ("off", *FP8_MAX)
TIMESTEP_NAMES = ("t", "timestep", "timesteps")
DEFAULT_BLOCK = 128
DEFAULT_T_MAX = 1000.0


@dataclass(frozen=True)
class SparseAttentionSpec:
    """One mask rule for every softmax attention of a model; sizes in tokens (grid, tile) and tiles (window)."""

    rule: str
    grid: tuple[int, int, int] | None = None
    tile: tuple[int, int, int] | None = None
    window: tuple[int, int, int] | None = None
    block: int = DEFAULT_BLOCK
    cdf: float = 0.0
    topk: float = 0.0
    sim: float = 0.0
    fp8: str = "off"
    dense_until: float = 0.0
    timestep: str | None = None
    t_max: float = DEFAULT_T_MAX

    @property
    def tokens(self) -> int | None:
        return None if self.grid is None else self.grid[0] * self.grid[1] * self.grid[2]

    def describe(self) -> str:
        """E.g. 'tile 3x6x4, window 3x3x3 over a 21x30x52 grid' or 'meansim cdf 0.9, sim 0.5, blocks of 128'."""
        if self.rule == "tile":
            rule = f"tile {_sizes(self.tile)}, window {_sizes(self.window)} over a {_sizes(self.grid)} grid"
        elif self.rule == "dense":
            rule = f"every block of {self.block}"
        else:
            kept = f"cdf {self.cdf:g}" if self.cdf else f"top {self.topk:g}"
            rule = f"meansim {kept}{f', sim {self.sim:g}' if self.sim else ''}, blocks of {self.block}"
        schedule = f", dense while t > {(1 - self.dense_until) * self.t_max:g}" if self.dense_until else ""
        return f"{rule}{schedule}{f', fp8 {self.fp8}' if self.fp8 != 'off' else ''}"


def _sizes(sizes: tuple[int, ...] | None) -> str:
    return "x".join(map(str, sizes or ()))


def parse_sparse_attention(text: str, fp8: str = "off") -> SparseAttentionSpec:
    """The spec of `--sparse-attention text` with `--attention-fp8 fp8`; InputError naming what is wrong."""
    if fp8 not in FP8_CHOICES:
        raise InputError(f"--attention-fp8 {fp8!r} is unknown; use one of {', '.join(FP8_CHOICES)}.")
    rule, _, rest = text.partition(":")
    if rule not in RULES:
        raise InputError(f"--sparse-attention {text!r}: the rule {rule!r} is unknown; write tile:T=..,H=..,W=..,"
                         "tile=AxBxC,window=AxBxC or meansim:cdf=..,sim=.. .")
    options = _options(text, rest)
    shared = dict(fp8=fp8, dense_until=_fraction(text, options, "dense-until", allow_zero=True),
                  timestep=options.pop("timestep", None), t_max=_number(text, options, "t-max", DEFAULT_T_MAX))
    if rule == "tile":
        spec = _tile(text, options, shared)
    elif rule == "meansim":
        spec = _meansim(text, options, shared)
    else:
        spec = SparseAttentionSpec("dense", block=_integer(text, options.pop("block", str(DEFAULT_BLOCK)), "block"),
                                   **shared)
    if options:
        raise InputError(f"--sparse-attention {text!r}: {', '.join(sorted(options))} is not an option of the "
                         f"{rule} rule; see `dync export --help`.")
    return spec


def _options(text: str, rest: str) -> dict[str, str]:
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise InputError(f"--sparse-attention {text!r}: {item!r} is not KEY=VALUE.")
        options[key.strip()] = value.strip()
    return options


def _tile(text: str, options: dict[str, str], shared: dict) -> SparseAttentionSpec:
    missing = [key for key in ("T", "H", "W", "tile", "window") if key not in options]
    if missing:
        raise InputError(f"--sparse-attention {text!r} lacks {', '.join(missing)}; the tile rule needs the token "
                         "grid T, H, W, the tile and the window, e.g. tile:T=4,H=8,W=8,tile=2x4x4,window=1x3x3.")
    grid = tuple(_integer(text, options.pop(key), key) for key in ("T", "H", "W"))
    tile, window = _triple(text, options.pop("tile"), "tile"), _triple(text, options.pop("window"), "window")
    try:
        tile_grid(grid, tile)
    except PluginError as exc:
        raise InputError(f"--sparse-attention {text!r}: {exc}") from None
    return SparseAttentionSpec("tile", grid=grid, tile=tile, window=window, block=tile[0] * tile[1] * tile[2],
                               **shared)


def _meansim(text: str, options: dict[str, str], shared: dict) -> SparseAttentionSpec:
    if ("cdf" in options) == ("topk" in options):
        raise InputError(f"--sparse-attention {text!r}: give exactly one of cdf= (the pooled mass to keep) and "
                         "topk= (the fraction of key blocks to keep), each in (0, 1].")
    cdf = _fraction(text, options, "cdf") if "cdf" in options else 0.0
    topk = _fraction(text, options, "topk") if "topk" in options else 0.0
    sim = _fraction(text, options, "sim") if "sim" in options else 0.0
    block = _integer(text, options.pop("block", str(DEFAULT_BLOCK)), "block")
    return SparseAttentionSpec("meansim", block=block, cdf=cdf, topk=topk, sim=sim, **shared)


def _fraction(text: str, options: dict[str, str], key: str, allow_zero: bool = False) -> float:
    value = _number(text, options, key, 0.0)
    if not (0.0 < value <= 1.0 or (allow_zero and value == 0.0)):
        raise InputError(f"--sparse-attention {text!r}: {key}={value:g} is outside (0, 1]; give a fraction such as "
                         f"{key}=0.5.")
    return value


def _number(text: str, options: dict[str, str], key: str, default: float) -> float:
    raw = options.pop(key, None)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise InputError(f"--sparse-attention {text!r}: {key}={raw!r} is not a number.") from None


def _integer(text: str, raw: str, key: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"--sparse-attention {text!r}: {key}={raw!r} is not a positive integer.")
    return int(raw)


def _triple(text: str, raw: str, key: str) -> tuple[int, int, int]:
    parts = raw.split("x")
    if len(parts) != 3:
        raise InputError(f"--sparse-attention {text!r}: {key}={raw!r} is not three sizes AxBxC.")
    return tuple(_integer(text, part, key) for part in parts)
