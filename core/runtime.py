"""Process-level set-up shared by every layer: seeding, the cache folder, run folders, atomic
writes, allocator tuning, the error a run stops itself with, and the interruption of a run that
can be resumed (and the few writes a Ctrl-C must wait for)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

import numpy as np
import torch


def cache_root() -> Path:
    """Where cfd3d keeps what it computes once (text embeddings, the embedded prior's data):
    ``$CFD3D_CACHE``, else ``$XDG_CACHE_HOME/cfd3d``, else ``~/.cache/cfd3d``."""
    return Path(os.environ.get("CFD3D_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cfd3d"))


class TrainingStopped(RuntimeError):
    """A training loop stopped itself because its state cannot go on (the gradients diverged,
    densification left no splat); the message says why and which settings to change."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run whose folder can be resumed: where it stopped, and from what.

    ``step``: the steps done when it stopped; ``checkpoint_step``: the step its checkpoint
    holds, where ``--resume`` continues (None: no checkpoint yet, it starts again at 0)."""

    def __init__(self, run_dir: Path, step: int, checkpoint_step: Optional[int]):
        super().__init__(str(run_dir))
        self.run_dir, self.step, self.checkpoint_step = Path(run_dir), step, checkpoint_step


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) off while the block runs, then deliver it as it would have been.

    For a write and the bookkeeping that records it, which a KeyboardInterrupt must not cut in
    two: ``torch.save`` interrupted half-way turns the KeyboardInterrupt into a RuntimeError
    ("unexpected pos") when its zip writer closes, and the run would stop with a traceback
    instead of its resume command. A signal that came in the block is raised again once the
    previous handler is back, so that handler decides; if the block raised, its error wins. A
    second Ctrl-C in the block is let through at once (a save that hangs, on a stalled disk,
    can still be stopped). An ignored SIGINT (a background job) stays ignored; outside the main
    thread, where no handler can be set, the block just runs."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield
        return
    came: list[int] = []

    def hold(signum, _frame):
        if came:
            raise KeyboardInterrupt
        came.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        # None: a handler set outside Python, which Python cannot put back; the default is the
        # nearest it can
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    if came:
        signal.raise_signal(signal.SIGINT)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def tune_malloc() -> bool:
    """Keep large CPU tensors out of fresh mmaps (glibc only).

    With glibc's defaults every allocation over 32 MB is a new mmap that is page-faulted on each
    use; big-tensor code measured 3-5x slower here because of it. Equivalent to
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``. Returns whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 36))


def slugify(text: str, max_len: int = 60) -> str:
    """A folder name for ``text``: its letters and digits in any script (``チェア`` stays), ``.``
    and ``-``; every other run of characters (``/``, spaces, controls, emoji) becomes ``_``.
    At most ``max_len`` characters and ``3 * max_len`` bytes of UTF-8 (file systems limit a name to
    255 bytes; the time stamp follows), ``run`` if nothing is left."""
    # composed form: an accent typed as a separate combining mark would otherwise become "_"
    text = unicodedata.normalize("NFC", text.strip())
    slug = re.sub(r"[^\w.-]+", "_", text).strip("_")
    # a cut through a character's bytes drops that character
    return slug[:max_len].encode()[:3 * max_len].decode(errors="ignore") or "run"


def make_run_dir(output_dir: str, config_name: str, tag: str) -> Path:
    """``<output_dir>/<config_name>/<tag>@<YYYYmmdd-HHMMSS>/``, with ``-1``, ``-2``... added when
    that folder exists (also when another run makes it at the same moment)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / config_name / f"{slugify(tag)}@{stamp}"
    path, i = base, 1
    while True:
        try:
            path.mkdir(parents=True)  # creating is the test: a separate exists() check races
            return path
        except FileExistsError:
            path, i = base.with_name(f"{base.name}-{i}"), i + 1


def share_as_created(path: Path) -> None:
    """Give ``path`` the mode a plain ``open`` or ``mkdir`` would have (0666 / 0777 less the
    umask): temporary files and folders start private (0600 / 0700), which would hide results
    and shared caches from other users once renamed into place."""
    mask = os.umask(0)  # the only way to read the umask
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(f)`` into a temporary sibling, then rename it into place, so
    a reader (or a resumed run) sees the old file or the new one, never half of one."""
    tmp = write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(path)


def log_records(path: Path) -> list[dict]:
    """The records of a JSON-lines log (``metrics.jsonl``), none when it does not exist. A
    killed run can leave a torn last line (logs are flushed in blocks); it is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    *complete, _torn = path.read_text().split("\n")
    return [json.loads(line) for line in complete]


def write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def write_temporary(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """The first half of :func:`atomic_write`: write a file through ``write(f)`` into a
    temporary sibling of ``path`` (``.<name>.<random>.tmp``, flushed to disk) and return that
    sibling, for a caller that renames it into place itself (``os.replace``) after other steps.
    The sibling is removed when ``write`` fails; after that, removing it is the caller's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        share_as_created(tmp)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Path(tmp)


@contextmanager
def replacing_folder(folder: Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling (yielded), then put it in ``folder``'s place
    (replacing what is there) in one rename; a failure leaves ``folder`` as it was and the
    sibling removed. A reader sees the old folder or the new one, never half of one (but for
    the instant between removing the old one and the rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield tmp
        share_as_created(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stale_temporaries(path: Path) -> list[Path]:
    """The temporary siblings :func:`atomic_write` and :func:`write_temporary` leave next to
    ``path`` when the process is killed mid-write (``.<name>.*.tmp``; those of a file whose name
    starts with ``<name>.``, such as ``<name>.sha256``, included), oldest first."""
    import glob

    path = Path(path)
    found = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def fsync_dir(path: Path) -> None:
    """Make the renames done in folder ``path`` durable (a no-op where folders cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
