"""What a backend reports of the nodes it ran, for `dync bench --profile`."""

from __future__ import annotations

from typing import NamedTuple

EXIT_RULE = "exit rule"
"""`KernelTime.stage` of the nodes that decide exits and compact the batch inside a one-graph executor."""


class KernelTime(NamedTuple):
    """One node's run inside a backend: its stage index (or `EXIT_RULE`), op type, node name and seconds."""

    stage: int | str
    op_type: str
    node: str
    seconds: float
