"""Deployments: which version each adapter name serves across the whole fleet, recorded once.

One JSON file in the shared adapter store, `<store>/.deployments.json` (a dot name: the store's
listings match NAME_RE and skip it):

    {"generation": 7,
     "adapters": {"extract": {"version": "v2", "pinned": false, "generation": 7,
                              "updated_unix": 1765000000.0, "source": "trainingJobs/abc"}}}

`generation` grows by one with every write; each entry keeps the generation that last changed
it. Every serving replica follows the file (serving_service/deployment_sync.py) and reports the
generation it has applied; the trainer's handoff and serving's LoadAdapter write it.

Writes are read-modify-write under `fcntl.flock` on `<store>/.deployments.lock`, to a temporary
file that is fsynced and renamed over the record (`os.replace`, then the directory is fsynced):
a reader sees the old record or the new one, never half of one, and concurrent writers (several
processes, several hosts on a volume with working POSIX locks) never lose a write. A missing file
is "nothing deployed yet" (generation 0); a file that cannot be parsed is an error, never read as
empty, since that would silently roll every name back to "the newest in the store".

    from tunewire import deployments
    d = deployments.record(store, "extract", "v2", source="trainingJobs/abc")   # d.generation
    deployments.read(store).adapters["extract"].version                        # "v2"
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunewire import reasons as R
from tunewire.adapters import NAME_RE, VERSION_RE
from tunewire.errors import TunewireError

RECORD = ".deployments.json"   # the record, beside the adapters it names
LOCK = ".deployments.lock"     # flock'ed by writers; never renamed, so every writer locks the same inode


@dataclass(frozen=True)
class Deployment:
    version: str              # "v2": what the bare name serves
    pinned: bool = False      # keep this version resident on every replica
    generation: int = 0       # the record's generation when this entry last changed
    updated_unix: float = 0.0
    source: str = ""          # who deployed it: "trainingJobs/<id>" | "LoadAdapter on <replica_id>"


@dataclass(frozen=True)
class Deployments:
    generation: int = 0                                   # 0: nothing recorded yet
    adapters: dict[str, Deployment] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"generation": self.generation,
                           "adapters": {n: asdict(d) for n, d in sorted(self.adapters.items())}},
                          indent=2, sort_keys=True)


def record_path(store_root: str | Path) -> Path:
    return Path(store_root) / RECORD


def _bad(path: Path, why: str) -> TunewireError:
    return TunewireError(R.DEPLOYMENTS_UNREADABLE, f"{path} is unreadable: {why}",
                         metadata={"file": str(path)})


def parse(text: str | bytes, path: Path) -> Deployments:
    """The record's content → Deployments; anything malformed is a TunewireError naming `path`."""
    try:
        body = json.loads(text)
        generation = body["generation"]
        entries = body["adapters"]
        if not isinstance(generation, int) or generation < 0 or not isinstance(entries, dict):
            raise ValueError("generation must be an int >= 0 and adapters an object")
        out = {}
        for name, e in entries.items():
            d = Deployment(version=e["version"], pinned=bool(e.get("pinned", False)),
                           generation=int(e.get("generation", 0)),
                           updated_unix=float(e.get("updated_unix", 0.0)), source=str(e.get("source", "")))
            if not NAME_RE.match(name) or not VERSION_RE.match(d.version):
                raise ValueError(f"bad entry {name!r}: {d.version!r}")
            out[name] = d
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _bad(path, f"{type(e).__name__}: {e}") from e
    return Deployments(generation=generation, adapters=out)


def read(store_root: str | Path) -> Deployments:
    """The current record; generation 0 and no entries when nothing was ever deployed."""
    path = record_path(store_root)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Deployments()
    except OSError as e:
        raise _bad(path, str(e)) from e
    return parse(raw, path)


def stamp(store_root: str | Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime_ns) of the record, None when absent: cheap to poll. Every write renames
    a new file into place, so the inode changes even when size and mtime happen to repeat."""
    try:
        st = os.stat(record_path(store_root))
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write(root: Path, d: Deployments) -> None:
    tmp = root / f".deployments.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(d.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / RECORD)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def record(store_root: str | Path, name: str, version: str, *, pinned: bool | None = None,
           source: str = "") -> Deployments:
    """Records `name` → `version` (and its pin; None keeps the current pin when the version stays
    the same, else False) as the next generation; returns the record as written."""
    if not NAME_RE.match(name):
        raise TunewireError(R.ADAPTER_NAME_INVALID, f"bad adapter name {name!r}")
    if not VERSION_RE.match(version):
        raise TunewireError(R.INVALID_FIELD, f"bad adapter version {version!r}",
                            field_violations={"version": "must look like v<N>"})
    root = Path(store_root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        current = read(root)
        old = current.adapters.get(name)
        if pinned is None:
            pinned = bool(old and old.version == version and old.pinned)
        generation = current.generation + 1
        entry = Deployment(version=version, pinned=pinned, generation=generation,
                           updated_unix=time.time(), source=source)
        new = Deployments(generation=generation, adapters={**current.adapters, name: entry})
        _write(root, new)
    return new
