"""Writing outputs so that nothing is lost and nothing is left half-written.

Every command writes its outputs to temporary paths beside them and moves them into place at the
end with a rename that refuses to replace anything (renameat2's RENAME_NOREPLACE on Linux,
renamex_np's RENAME_EXCL on macOS): a file or folder that appeared at the output path during the run
(another process, the user) is never replaced, and of two runs writing the same output one succeeds
and the other gets an error. `--force` replaces an existing output only after the new one is
complete, and never an output that is or holds what the run reads (its inputs, the current folder).
A killed run (kill -9) leaves only `.NAME.openelm-partial-PID-XXXX[.suffix]` beside the output: recognizable,
never read, and removed by the next run that writes NAME once PID is gone. An output is never
placed after Ctrl-C or SIGTERM, even when a library swallowed the interrupt in a bare `except:`.
"""

import ctypes
import errno
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

from .errors import OpenELMError, Terminated

PARTIAL = ".openelm-partial-"  # marks temporary outputs
REPLACED = ".openelm-replaced-"  # an output moved aside by --force, deleted once the new one is in place
# The signals (SIGINT, SIGTERM) received, appended by apps/cli.py's handler: coremltools runs some
# passes inside a bare `except:`, which swallows the KeyboardInterrupt and goes on as if nothing
# happened; the record outlives the exception, so the run still stops before it places an output.
SIGNALS: List[int] = []


def raise_if_signalled():
    """Raise the interrupt (Ctrl-C) or Terminated (SIGTERM) that a library may have swallowed."""
    if SIGNALS:
        raise Terminated() if SIGNALS[-1] == signal.SIGTERM else KeyboardInterrupt()


def _libc_rename(src: Path, dst: Path) -> bool:
    """Rename src to dst unless dst exists, atomically. False where the OS or filesystem has no
    such call (the caller falls back); raises FileExistsError when dst exists."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform == "linux" and hasattr(libc, "renameat2"):
        at_fdcwd, rename_noreplace = -100, 1
        result = libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_excl = 0x4
        result = libc.renamex_np(os.fsencode(src), os.fsencode(dst), rename_excl)
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # e.g. a filesystem without the flag
        return False
    raise OSError(code, os.strerror(code), str(dst))


def rename_no_replace(src: Path, dst: Path):
    """Move src to dst; FileExistsError if anything is at dst, even an empty folder."""
    if _libc_rename(src, dst):
        return
    if src.is_dir():  # no atomic way left for folders: the check and the move are a moment apart
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)
    else:  # a hard link fails atomically if dst exists
        os.link(src, dst)
        os.unlink(src)


def remove(path: Path):
    """Delete a file, a symlink (not what it points to) or a folder tree; nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(output: Path, force: bool, reads: Iterable = ()):
    """Refuse before any work is done: an existing output without --force, an output that is or
    holds what the run reads or the current folder, and a parent that is not a folder."""
    output = Path(output)
    if os.path.lexists(output) and not force:
        raise OpenELMError(f"{output} already exists: choose another output or pass --force to replace it")
    lexical = Path(os.path.normpath(os.path.abspath(output)))
    try:
        target = lexical.parent.resolve(strict=False) / lexical.name  # a symlink output: the link itself
        for path in [Path.cwd(), *(Path(p) for p in reads if p is not None and os.path.exists(p))]:
            if _is_within(path.resolve(), target) or _is_within(Path(os.path.abspath(path)), lexical):
                raise OpenELMError(f"{output} is or holds {path}, which this run reads: choose another output")
    except (RuntimeError, OSError) as e:  # a symlink loop: RuntimeError before Python 3.13, OSError after
        raise OpenELMError(f"cannot write {output}: {getattr(e, 'strerror', None) or 'a symlink loop'}") from None
    parent = output.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OpenELMError(f"cannot write {output}: {parent} is not a folder")
    longest = len(os.fsencode(_temp_name(output, 4 * 10**6)))  # pids stay below 2**22
    name_max = _name_max(parent)
    if longest > name_max:
        raise OpenELMError(
            f"cannot write {output}: its name is {len(os.fsencode(output.name))} bytes, too long for a name of at "
            f"most {name_max} bytes with the {longest - len(os.fsencode(output.name))} that its temporary name "
            "adds: choose a shorter name"
        )


def check_outputs(outputs: Sequence, force: bool, reads: Iterable = (), room: int = 0):
    """check_output for each of `outputs`. With `room`, that many bytes are also written beside
    the first and removed again, with the folders made for them: a read-only or full filesystem,
    or a folder name too long, then fails now rather than after a long run (`openelm bench`)."""
    outputs, reads = [Path(o) for o in outputs], list(reads)
    for output in outputs:
        check_output(output, force, reads)
    if room:
        try:
            with staged_output(outputs[0], force=True) as tmp:
                tmp.write_bytes(b" " * room)
                raise _Probed()  # leaves the block without placing anything
        except _Probed:
            pass


class _Probed(Exception):
    """Ends check_outputs' probe: its file and the folders made for it are removed."""


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _temp_name(output: Path, pid: int) -> str:
    """The name of a temporary output beside `output`; the output's suffix last again: some writers
    insist on it (coremltools: .mlpackage)."""
    return f".{output.name}{PARTIAL}{pid}-{os.urandom(3).hex()}{output.suffix}"


def _clean_stale(output: Path):
    """Remove what killed runs left beside `output`: partial outputs whose process is gone."""
    for path in output.parent.glob(f".{output.name}{PARTIAL}*"):
        pid = path.name[len(f".{output.name}{PARTIAL}") :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _place_all(temps: List[Path], outputs: List[Path], force: bool):
    """Move each finished temporary path to its output. With force, what is there is first moved
    aside, and deleted only once every new output is in place; if any output cannot be placed, the
    ones this run placed are removed and what was moved aside is put back."""
    placed, aside = [], []
    try:
        for tmp, output in zip(temps, outputs):
            if force and os.path.lexists(output):
                old = output.with_name(f".{output.name}{REPLACED}{os.getpid()}")
                rename_no_replace(output, old)
                aside.append((old, output))
            try:
                rename_no_replace(tmp, output)
            except FileExistsError:
                raise OpenELMError(
                    f"{output} appeared while this run was writing it: nothing was replaced; "
                    "remove it or choose another output"
                ) from None
            placed.append(output)
    except BaseException:
        for output in placed:
            remove(output)
        for old, output in aside:
            try:
                rename_no_replace(old, output)
            except OSError:  # its place was taken meanwhile: leave it beside, under its marked name
                pass
        raise
    for old, _ in aside:
        remove(old)


@contextmanager
def staged_outputs(outputs: Sequence, force: bool = False, reads: Iterable = ()) -> Iterator[List[Path]]:
    """Temporary paths for `outputs`; on success they are moved into place together (if one cannot
    be placed, those already placed by this run are removed again). On any error or interrupt the
    temporary paths are removed and nothing is placed.

        with staged_outputs([out], force) as (tmp,):
            write(tmp)            # a file or a folder, created by the caller
    """
    outputs = [Path(o) for o in outputs]
    check_outputs(outputs, force, reads)
    temps, created = [], []
    try:
        for output in outputs:
            try:
                created += _make_parents(output)
            except OSError as e:
                raise OpenELMError(f"cannot write {output}: {e.strerror}") from None
            _clean_stale(output)
            temps.append(output.with_name(_temp_name(output, os.getpid())))
        try:
            yield temps
        except OSError as e:  # a read-only or full filesystem: name the output, not its temporary path
            tmp = next((t for t in temps if e.filename and str(t) in str(e.filename)), None)
            if tmp is None and e.filename is not None:
                raise
            output = outputs[temps.index(tmp)] if tmp else outputs[0]  # a write names no file
            raise OpenELMError(f"cannot write {output}: {e.strerror or e}") from None
        for tmp, output in zip(temps, outputs):
            if not os.path.lexists(tmp):
                raise OpenELMError(f"internal error: {output} was not written")
        raise_if_signalled()
        _place_all(temps, outputs, force)
    except BaseException:
        for tmp in temps:
            remove(tmp)
        for folder in reversed(created):  # folders made for outputs that were never placed
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    for tmp in temps:  # placed ones are gone already; this removes nothing else
        remove(tmp)


def _make_parents(output: Path) -> List[Path]:
    """Create the missing folders above `output`; returns them, outermost first."""
    missing = [p for p in output.parents if not p.exists()][::-1]
    for folder in missing:
        folder.mkdir()
    return missing


@contextmanager
def staged_output(output, force: bool = False, reads: Iterable = ()) -> Iterator[Path]:
    """staged_outputs for one output."""
    with staged_outputs([output], force, reads) as (tmp,):
        yield tmp
