"""The engine cache inside a package: `engines/<key>/engine.plan` and its `build.json`, one directory per key.

A directory is complete once its record exists: the plan is written first (to a temporary name, then renamed),
the record last, so a build killed half way leaves no entry that looks usable. The record holds the key's
inputs and the plan's SHA-256, checked when the engine is loaded, so a damaged plan is rebuilt, never run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from dync.build.keys import EngineKey
from dync.errors import PackageError
from dync.package import write_atomically
from dync.records import RecordError, from_json, to_json

ENGINES_DIR = "engines"
ENGINE_FILE = "engine.plan"
RECORD_FILE = "build.json"
TIMING_CACHE = "timing.cache"
"""The timing cache every build of the package shares by default (`engines/timing.cache`)."""


@dataclass(frozen=True)
class BuildRecord:
    """One engine in the cache: what it was built from (`key`), by what, how long it took, and its bytes' hash."""

    digest: str
    key: EngineKey
    builder: str
    seconds: float
    engine_bytes: int
    engine_sha256: str
    created: str


class EngineCache:
    """The `engines/` directory of one package (or bundle)."""

    def __init__(self, package_dir: Path) -> None:
        self.root = Path(package_dir) / ENGINES_DIR

    def directory(self, key: EngineKey) -> Path:
        return self.root / key.digest

    @property
    def timing_cache(self) -> Path:
        return self.root / TIMING_CACHE

    def records(self) -> list[BuildRecord]:
        """Every complete entry, by stage and creation time (for `dync inspect`); unreadable ones are left out."""
        found = []
        for path in sorted(self.root.glob(f"*/{RECORD_FILE}")):
            try:
                found.append(from_json(BuildRecord, json.loads(path.read_text()), str(path)))
            except (json.JSONDecodeError, RecordError, OSError):
                continue
        return sorted(found, key=lambda r: (r.key.stage, r.created))

    def record(self, key: EngineKey) -> BuildRecord | None:
        """The record of `key`'s engine, None when it was never built (or its build did not finish)."""
        path = self.directory(key) / RECORD_FILE
        if not path.exists():
            return None
        try:
            record = from_json(BuildRecord, json.loads(path.read_text()), str(path))
        except (json.JSONDecodeError, RecordError, OSError):
            return None
        return record if record.key == key and record.digest == key.digest else None

    def load(self, key: EngineKey) -> bytes | None:
        """The engine built for `key`, None when there is none or its plan does not match its record."""
        record = self.record(key)
        if record is None:
            return None
        try:
            plan = (self.directory(key) / ENGINE_FILE).read_bytes()
        except OSError:
            return None
        return plan if hashlib.sha256(plan).hexdigest() == record.engine_sha256 else None

    def store(self, key: EngineKey, plan: bytes, builder: str, seconds: float) -> BuildRecord:
        directory = self.directory(key)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomically(directory / ENGINE_FILE, plan)
            record = BuildRecord(key.digest, key, builder, round(seconds, 3), len(plan),
                                 hashlib.sha256(plan).hexdigest(), datetime.now(timezone.utc).isoformat())
            write_atomically(directory / RECORD_FILE, json.dumps(to_json(record), indent=2) + "\n")
        except OSError as exc:
            raise PackageError(f"could not write the engine cache entry {directory} ({exc.strerror or exc}); "
                               "make the package's engines/ directory writable and build again.") from exc
        return record
