"""Dataset uploads: bytes streamed by a client land under `<data root>/uploads/`, named by their
sha256 so identical uploads are stored once. Size-limited; the file appears only when complete
(written to a temp file, then renamed), so a broken upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

from trainer_service.data_paths import EXTENSIONS
from tunewire import reasons as R
from tunewire.errors import TunewireError, invalid

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class Upload:
    """One upload in progress: `write` chunks, then `finish` (or `abort`)."""

    def __init__(self, data_root: Path, filename: str, max_bytes: int):
        ext = Path(filename).suffix.lower()
        if not NAME_RE.match(filename or "") or ext not in EXTENSIONS:
            raise invalid("header.filename", f"a plain file name ending in one of {', '.join(EXTENSIONS)}",
                          R.DATASET_PATH_INVALID)
        self.dir = Path(data_root) / "uploads"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ext, self.max_bytes, self.size = ext, max_bytes, 0
        self.tmp = self.dir / f".tmp-{uuid.uuid4().hex}{ext}"
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise TunewireError(R.UPLOAD_TOO_LARGE, f"uploads are limited to {self.max_bytes} bytes",
                                metadata={"max_bytes": str(self.max_bytes)})
        self.hash.update(chunk)
        self.file.write(chunk)

    def finish(self) -> tuple[str, str, int, bool]:
        """(path relative to the data root, sha256, size, deduplicated)."""
        self.file.close()
        if self.size == 0:
            self.abort()
            raise invalid("chunk", "the upload is empty", R.DATASET_EMPTY)
        digest = self.hash.hexdigest()
        final = self.dir / f"{digest[:32]}{self.ext}"
        dedup = final.exists()
        if dedup:
            self.tmp.unlink()
        else:
            os.replace(self.tmp, final)
        return f"uploads/{final.name}", digest, self.size, dedup

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
