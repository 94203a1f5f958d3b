"""One writer per output folder, and files that are either complete or absent.

`exclusive_output` holds an OS lock (`filelock`, flock on POSIX) on `<folder>/.medsynapse.lock` for as long as a
command writes into the folder. The OS drops it when the process ends, even on kill -9, so a crash never leaves a
stale lock behind; a second command pointed at the same folder is refused at once with a message saying why, instead
of interleaving its writes with the first one's (two evaluations into one predictions file, two trainings pruning
each other's checkpoints). Evaluation and the training recipes (`recipes/trainer.one_run_per_folder`) take it; a
training folder is also guarded across time by the checkpoints' recorded settings (`recipes/trainer.resume_point`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".medsynapse.lock"


class FolderInUseError(RuntimeError):
    """Another medsynapse process is writing into this output folder."""


@contextmanager
def exclusive_output(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold the folder's lock for the duration of the block; FolderInUseError at once if another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderInUseError(
            f"{folder}: another medsynapse process is writing into this folder (it holds {folder / LOCK_NAME}); "
            f"wait for it to finish or give this {command} another output folder") from None
    try:
        yield folder
    finally:
        lock.release()


def hold_for_launch(stack: ExitStack, folder: str | Path, command: str, is_main_process: bool,
                    num_processes: int) -> None:
    """One lock per launch: rank 0 takes the folder's lock onto `stack` (released when the stack closes); when it is
    refused, every rank raises FolderInUseError (the refusal is broadcast, so no rank waits in a collective)."""
    refusal = [None]
    if is_main_process:
        try:
            stack.enter_context(exclusive_output(folder, command))
        except FolderInUseError as err:
            refusal = [str(err)]
    if num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(refusal)
    if refusal[0]:
        raise FolderInUseError(refusal[0])


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a unique temporary file in the same folder, fsync, then rename over `path`.

    A crash leaves either the old file or the new one, never half of one; two writers never share a temporary name.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder` and the folder itself (before it is renamed into place)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
