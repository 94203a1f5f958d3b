"""One writer per output folder, and files that are either complete or absent.

`exclusive_output` holds an OS lock (`filelock`, flock on POSIX) on `<folder>/.medsynapse.lock` for as long as a
command writes into the folder. The OS drops it when the process ends, even on kill -9, so a crash never leaves a
stale lock behind; a second command pointed at the same folder is refused at once with a message saying why, instead
of interleaving its writes with the first one's (two evaluations into one predictions file, two trainings pruning
each other's checkpoints). Evaluation and the training recipes (`recipes/trainer.one_run_per_folder`) take it; a
training folder is also guarded across time by the checkpoints' recorded settings (`recipes/trainer.resume_point`).
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".medsynapse.lock"


class FolderInUseError(RuntimeError):
    """Another medsynapse process is writing into this output folder."""


class OutputNotWritable(RuntimeError):
    """An output folder cannot be written: its disk is full, or it is read-only or not ours to write. The message
    names the folder (the CLI prints it as one line)."""


# errno -> what the one line says
DISK_ERRORS = {errno.ENOSPC: "no space left on its device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EFBIG: "a file grew past the file system's limit"}
# the same failures as libraries that are not OSErrors report them (torch.save, safetensors): text -> errno
_DISK_TEXT = ((re.compile(r"no space left|os error 28|storagefull", re.I), errno.ENOSPC),
              (re.compile(r"quota", re.I), errno.EDQUOT),
              (re.compile(r"read-only file system|os error 30|readonlyfilesystem", re.I), errno.EROFS),
              (re.compile(r"permission denied|os error 13", re.I), errno.EACCES))


def disk_errno(err: BaseException, folder: str | Path) -> int | None:
    """The errno of a write failure that is the disk's or the folder's (full, read-only, not writable), else None.
    An OSError carries it; torch.save and safetensors raise other errors, read by their text, and a bare "write
    failed" is put down to the folder when its file system has no free block left or refuses writes."""
    if isinstance(err, OSError):
        return err.errno if err.errno in DISK_ERRORS else None
    if not isinstance(err, RuntimeError) and type(err).__name__ != "SafetensorError":
        return None
    text = str(err)
    for pattern, code in _DISK_TEXT:
        if pattern.search(text):
            return code
    if re.search(r"write|serializ", text, re.I):
        folder = Path(folder)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            if os.statvfs(folder).f_bavail == 0:
                return errno.ENOSPC
        except OSError:
            return None
        if not os.access(folder, os.W_OK):
            return errno.EROFS
    return None


def not_writable(folder: str | Path, code: int, what: str = "") -> OutputNotWritable:
    """The one-line error for a folder that cannot be written (disk full, read-only, no permission)."""
    hint = ("free some space (or give the command another output folder) and rerun it" if code in
            (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "give the command an output folder it can write to")
    return OutputNotWritable(f"{folder}: cannot write{f' {what}' if what else ''}: {DISK_ERRORS[code]} "
                             f"({os.strerror(code)}); {hint}. Nothing half-written is kept: a training run "
                             "continues from its last complete checkpoint with --resume, an eval from its last "
                             "answered question")


@contextmanager
def writes_into(folder: str | Path, what: str = "") -> Iterator[None]:
    """Turn a write failure that is the disk's or the folder's (disk_errno) into OutputNotWritable naming `folder`;
    any other error passes unchanged."""
    try:
        yield
    except OutputNotWritable:
        raise
    except Exception as err:
        code = disk_errno(err, folder)
        if code is None:
            raise
        raise not_writable(folder, code, what) from err


@contextmanager
def exclusive_output(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold the folder's lock for the duration of the block; FolderInUseError at once if another process holds it."""
    folder = Path(folder)
    lock = FileLock(str(folder / LOCK_NAME), is_singleton=False)
    try:
        with writes_into(folder, f"its lock {LOCK_NAME}"):
            folder.mkdir(parents=True, exist_ok=True)
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
    refusal: list[str | None] = [None]
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


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status (read without changing it); elsewhere it is set and
    restored at once (os.umask is the only portable reader)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a plainly created file: 0666 less the umask (0644 under umask 022, 0640 under 027)."""
    return 0o666 & ~current_umask()


def make_readable(path: str | Path) -> None:
    """Give a file written through a private temporary (mkstemp, safetensors: 0600) the mode a plainly created file
    gets, so other users of a shared machine read a released model as the umask allows."""
    os.chmod(path, file_mode())


def make_tree_readable(folder: str | Path) -> None:
    """`make_readable` for every file under `folder`, and the usual 0777-less-umask mode for the folder and its
    subfolders (a mkdtemp folder is 0700)."""
    folder = Path(folder)
    directory_mode = 0o777 & ~current_umask()
    for path in [folder, *sorted(folder.rglob("*"))]:
        if path.is_symlink():
            continue
        os.chmod(path, directory_mode if path.is_dir() else file_mode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a unique temporary file in the same folder, fsync, then rename over `path`.

    A crash leaves either the old file or the new one, never half of one; two writers never share a temporary name.
    The file gets the mode a plainly created one would (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    with writes_into(path.parent, path.name):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            make_readable(tmp)
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


def link_folder(link: Path, target: Path) -> bool:
    """`link` -> `target`, relative (so the folder holding both can move); a link already there is replaced. A real
    folder of that name (an earlier layout's) is left alone, with a line saying where the model is: returns False."""
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        print(f"{link} is a folder of an earlier layout, left as it is (the model: {target})")
        return False
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    return True
