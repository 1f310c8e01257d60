"""File input and output shared by every stage (specs, graphs, checkpoints, reports).

Outputs are written to a temporary sibling and renamed over the target, so an interrupted run never leaves a
half-written output behind. Inputs are checked to be regular files before anything opens them
(:func:`input_problem`): opening a FIFO blocks, reading a device may never end.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the temporary file over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    write_atomic(path, _write)


def write_bytes(path: str, data: bytes) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    write_atomic(path, _write)


def input_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as an input file (one phrase: "file not found: …", "… is a folder", "… is not a
    regular file"), or None when it is a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"file not found: {path}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return f"{path} is a folder, not a file"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    return None


def output_problem(path: str, *, folder: bool = False) -> str | None:
    """Why ``path`` cannot be written as an output file (``folder=False``) or used as an output folder (one phrase:
    "… is a folder, expected a file path", "… is a file, not a folder", "cannot write in …"), or None. Checked before
    any work starts, so a long run never fails at its last step on a path it could have refused at once."""
    path = os.path.abspath(path)
    if os.path.isdir(path) and not folder:
        return f"{path} is a folder; expected a file path"
    if os.path.exists(path) and folder and not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    if os.path.exists(path) and not folder and not os.path.isfile(path):
        return f"{path} is not a regular file"
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):  # the nearest ancestor that exists must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write in {parent} (permission denied)"
    return None


def checkpoint_kind(path: str) -> str | None:
    """``"safetensors"`` (an 8-byte header length, then a JSON header), ``"torch"`` (a zip archive or a pickle, as
    ``torch.save`` writes) or None, from the first bytes of the file at ``path``."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 2**30:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    return None
