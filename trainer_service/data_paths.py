"""Where training data may be read from: a path named in a request, confined to the data root.

Every data path a client names (CreateTrainingJob, ValidateDataset) goes through
`resolve_data_path` before anything reads it, and uploads (uploads.py) accept the same
EXTENSIONS, the files trainer_service.data_readers can read.

    path = resolve_data_path(request.path, data_root, "training_job.training_data.path")
"""

from __future__ import annotations

from pathlib import Path

from tunewire import reasons as R
from tunewire.errors import invalid

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


def resolve_data_path(path: str, data_root: str | Path, field: str) -> Path:
    """The real path of a data file named in a request, confined to `data_root`.

    `path` is absolute or relative to data_root. It must resolve (symlinks included) inside the
    root, else INVALID_ARGUMENT DATASET_PATH_INVALID; it must be an existing file (else
    DATASET_NOT_FOUND) with a supported extension (else DATASET_PATH_INVALID). Returning the
    resolved path means a symlink swapped afterwards cannot redirect the read.
    """
    root = Path(data_root).resolve()
    if not path:
        raise invalid(field, "is required", R.DATASET_PATH_INVALID)
    try:
        real = (root / path).resolve()  # an absolute `path` replaces the root here
    except (OSError, ValueError, RuntimeError) as e:  # NUL byte, symlink loop
        raise invalid(field, f"{path!r} is not a usable path ({e})",
                      R.DATASET_PATH_INVALID) from None
    if not real.is_relative_to(root):
        # Do not say where it leads: that would map files outside the root.
        raise invalid(field, f"{path!r} is outside the data directory (paths are relative to it)",
                      R.DATASET_PATH_INVALID)
    if not real.exists():
        raise invalid(field, f"no file at {path!r}", R.DATASET_NOT_FOUND)
    if not real.is_file():
        raise invalid(field, f"{path!r} is not a file", R.DATASET_NOT_FOUND)
    if real.suffix.lower() not in EXTENSIONS:
        raise invalid(field, f"{path!r} is not a supported data file; use one of "
                             f"{', '.join(EXTENSIONS)}", R.DATASET_PATH_INVALID)
    return real
