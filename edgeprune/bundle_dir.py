"""Where `edgeprune export` writes: the destination guard, the staging directories, the final rename, and
cleanup on every signal that ends an export.

    check_destination(out, force)   before any work: refuse what must not be replaced
    staging = Staging(out, force)   .NAME.partial-* beside `out` + a trace scratch dir; SIGTERM, SIGHUP and
                                    the other signals that would end the process now raise like Ctrl-C,
                                    so one except clause cleans up after all of them
    staging.commit()                rename into place (checks the destination again first)
    staging.abort(); staging.close()

Export never destroys what it did not make: an existing directory is replaced only when it is an edgeprune
bundle (a manifest.json that parses, of a schema this edgeprune reads) holding nothing but the files that
manifest lists, plus engines/. Anything else is refused; with `force` it is moved aside to NAME.old-<time>
beside it, never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from edgeprune.errors import ExportError

log = logging.getLogger("edgeprune")

ENGINES_DIR = "engines"  # `edgeprune build` output; a replaceable bundle may hold it
# Every asynchronous signal whose default action ends the process (SIGKILL cannot be caught; faults such as
# SIGSEGV are not the export's to clean up after).
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                                                   "SIGALRM", "SIGXCPU", "SIGVTALRM", "SIGPROF") if hasattr(signal, name))
# A failed write the user can fix (space, quota, file-size limit, permissions, read-only or broken disk).
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class ExportInterrupted(KeyboardInterrupt):
    """A signal that ends an export (SIGTERM, SIGHUP, ...), raised like Ctrl-C's KeyboardInterrupt so the same
    cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def replaceable(path: Path) -> str | None:
    """None when `path` is an edgeprune bundle that export may replace (or an empty directory), else why not."""
    from edgeprune_runtime.checks import printable
    from edgeprune_runtime.errors import RuntimeStatusError
    from edgeprune_runtime.manifest import MANIFEST_NAME, bundle_inventory, listed_files, read_manifest_data

    try:
        present = bundle_inventory(path)
    except RuntimeStatusError as e:  # a symlink, FIFO or device inside: not something export wrote
        return e.message.split(";")[0]
    if not present:
        return None
    if MANIFEST_NAME not in present:
        return f"it has no {MANIFEST_NAME}"
    try:
        listed = set(listed_files(read_manifest_data(path)))
    except RuntimeStatusError as e:
        return f"its {MANIFEST_NAME} is not one edgeprune wrote: {e.message.split(';')[0]}"
    unlisted = [rel for rel in present
                if rel not in listed and rel != MANIFEST_NAME and not rel.startswith(ENGINES_DIR + "/")]
    if unlisted:
        return f"it holds {printable(unlisted[0])}, which its manifest does not list"
    return None


def _aside_name(dst: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        aside = dst.with_name(f"{dst.name}.old-{stamp}" + (f"-{n}" if n else ""))
        if not os.path.lexists(aside):
            return aside
    raise ExportError(f"too many {dst.name}.old-{stamp}* directories beside {dst}; remove some")


def _refusal(out: Path, why: str) -> ExportError:
    return ExportError(f"{out} exists and is not an edgeprune bundle ({why}); nothing was changed: choose another "
                       f"--out, or pass --force to move it aside to {out.name}.old-<time> (nothing is deleted)")


def check_destination(out: Path, force: bool = False) -> None:
    """Refuses, before any work, an `out` that export could not or must not replace.

    Raises ExportError for a file or symlink, the current directory or one above it, a directory that is
    not a replaceable bundle (unless `force`), or a place where nothing can be created."""
    dest = Path(os.path.abspath(out))
    if os.path.islink(dest):
        raise ExportError(f"{out} is a symlink; pass the directory itself, or another --out directory")
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{out} is a file; choose another --out directory")
    cwd = Path.cwd().resolve()
    if dest.resolve() == cwd or dest.resolve() in cwd.parents:
        raise ExportError(f"--out {out} is the current directory or one above it; export into a new directory, "
                          f"such as --out {Path(out) / 'bundle'}")
    if dest.is_dir():
        why = replaceable(dest)
        if why is not None and not force:
            raise _refusal(out, why)
    ancestor = dest.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:  # can anything be created there? (a probe that leaves nothing behind)
        if not ancestor.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(ancestor))
        os.rmdir(tempfile.mkdtemp(prefix=f".{dest.name}.probe-", dir=ancestor))
    except OSError as e:
        raise ExportError(f"cannot create the bundle {out}: {e.strerror} ({ancestor}); choose another --out") from None


@contextlib.contextmanager
def _signals_blocked():
    """Defers SIGINT/SIGTERM/SIGHUP (delivered on exit) so a rename pair is never cut in half."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Staging:
    """The scratch places of one export and the signal handlers that let an except clause clean them up."""

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.dest = Path(os.path.abspath(out))
        self.force = force
        self.stage_dir: Path | None = None
        self.scratch: Path | None = None
        self._handlers: dict[int, object] = {}
        self._install_handlers()
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self.stage_dir = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.partial-", dir=self.dest.parent))
            self.stage_dir.chmod(0o755)  # mkdtemp makes it private; a bundle is shared like any output dir
            self.scratch = Path(tempfile.mkdtemp(prefix="edgeprune-trace-"))
        except OSError as e:
            self.abort()
            self.close()
            raise ExportError(f"cannot create the bundle {out}: {e.strerror} ({e.filename}); choose another --out") from None
        except BaseException:
            self.abort()
            self.close()
            raise

    def _install_handlers(self) -> None:
        """Each of SIGNALS that nobody else handles (SIG_DFL, or Python's SIGINT handler) raises ExportInterrupted,
        once: a second signal must not cut the cleanup short."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; they are delivered there too

        def interrupt(signum, frame):
            for s in self._handlers:  # a second signal must not cut the cleanup short
                signal.signal(s, signal.SIG_IGN)
            raise ExportInterrupted(signum)

        for s in SIGNALS:
            current = signal.getsignal(s)
            if current in (signal.SIG_DFL, signal.default_int_handler):
                self._handlers[s] = current
                signal.signal(s, interrupt)

    def commit(self) -> None:
        """Renames the stage directory to `out`. An old bundle (or empty directory) there is removed; anything
        else is moved aside with `force`, else ExportError (it may have appeared while the export ran)."""
        dest, old = self.dest, None
        with _signals_blocked():
            if os.path.lexists(dest):
                why = "it is not a directory" if os.path.islink(dest) or not dest.is_dir() else replaceable(dest)
                if why is not None and not self.force:
                    raise _refusal(self.out, why)
                old = _aside_name(dest) if why is not None else dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.replace(dest, old)
                if why is None:
                    os.replace(self.stage_dir, dest)
                    shutil.rmtree(old, ignore_errors=True)
                    return
                log.warning("moved %s (%s) aside to %s", self.out, why, old)
            os.replace(self.stage_dir, dest)

    def abort(self) -> None:
        """Removes the stage directory (a no-op after commit)."""
        if self.stage_dir is not None:
            shutil.rmtree(self.stage_dir, ignore_errors=True)

    def close(self) -> None:
        """Removes the trace scratch directory and restores the signal handlers."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        for s, handler in self._handlers.items():
            signal.signal(s, handler)
        self._handlers.clear()


def raise_write_error(e: BaseException, out: Path) -> None:
    """Raises ExportError when `e`, or an exception it was raised from, is a failed write the user can fix
    (full disk, quota, `ulimit -f`, permissions, read-only disk); returns otherwise."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in WRITE_ERRNOS:
            where = f" ({x.filename})" if x.filename else ""
            raise ExportError(f"cannot write the bundle {out}: {x.strerror or os.strerror(x.errno)}{where}; free disk "
                              "space, raise the file-size limit (ulimit -f) or choose another --out") from None
        todo += [x.__cause__, x.__context__]
