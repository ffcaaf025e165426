"""Atomic, verified checkpoints: everything a run needs to continue bit for bit.

A checkpoint folder holds

* ``last.pt``: one ``torch.save`` file;
* ``last.pt.sha256``: the SHA-256 digests ``last.pt`` may have, one ``<hex>  last.pt`` line each,
  the format of ``sha256sum`` (``sha256sum -c last.pt.sha256`` checks it by hand).

``torch.load`` checks no CRC and nothing else of a tensor's bytes, so a checkpoint changed on
disk or in a copy would resume, silently, into another result: :func:`load_checkpoint` refuses a
``last.pt`` whose digest the digest file does not list, naming it.

:func:`save_checkpoint` takes four steps, and a kill may come between any two:

1. the new checkpoint is written to a temporary sibling ``.last.pt.<random>.tmp``, flushed to
   disk, and its digest computed;
2. the digest file is replaced, atomically (through its own temporary sibling), by one listing
   the digest of the ``last.pt`` in place *and* the new one;
3. the temporary is renamed to ``last.pt`` (atomic: the old file or the new one, never half);
4. the digest file is replaced by one listing the new digest only.

So at every moment ``last.pt`` is a whole file (the old one before step 3, the new one from it
on) and the digest file on disk lists its digest (the old one up to step 4, the new one from
step 2): whatever a kill leaves verifies, and nothing needs repairing. A kill can leave
temporary files besides (step 1's, or a digest file's from step 2 or 4), which
:func:`load_checkpoint`, what a resume calls, removes. A digest file without ``last.pt`` (a
first checkpoint killed before step 3) is no checkpoint yet.

No kill leaves a ``last.pt`` without a digest file: one comes from before cfd3d recorded digests,
or from a copy that left the digest file out. It is refused, saying how to record its digest if
it is trusted. A write that fails (a full disk) leaves the previous checkpoint and its digest as
they were and stops the run with a :class:`CheckpointError` saying so, and how to resume.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from core.errors import UserError
from core.runtime import atomic_write, file_sha256, fsync_dir, stale_temporaries, write_temporary

LATEST = "last.pt"
DIGEST = f"{LATEST}.sha256"
# sha256sum's line: the digest, a space, " " (text) or "*" (binary mode), the file name
_DIGEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted, or cannot be written; the message names the file
    and what to do: a user error, which the command line prints as one ``error:`` line."""


def _restart_hint(ckpt_dir: Path) -> str:
    return f"delete {ckpt_dir} to restart that run folder from step 0, or start a new run"


def _record_hint(ckpt_dir: Path) -> str:
    return (f"if you trust {ckpt_dir / LATEST}, record its digest with `cd {ckpt_dir} && "
            f"sha256sum {LATEST} > {DIGEST}` and resume again; otherwise "
            + _restart_hint(ckpt_dir))


def _read_digests(ckpt_dir: Path) -> Optional[List[str]]:
    """The digests the digest file lists, None when there is no digest file."""
    path = ckpt_dir / DIGEST
    try:
        text = path.read_bytes().decode("ascii")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        text = None
    digests = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        found = _DIGEST_LINE.fullmatch(line.strip())
        if not found or found[2] != LATEST:
            text = None
            break
        digests.append(found[1].lower())
    if not text or not digests:
        raise CheckpointError(f"checkpoint digest file {path} is damaged (it should hold lines "
                              f"'<sha256 digest>  {LATEST}'): " + _record_hint(ckpt_dir))
    return digests


def _write_digests(ckpt_dir: Path, digests: List[str]) -> None:
    data = "".join(f"{d}  {LATEST}\n" for d in dict.fromkeys(digests)).encode()
    atomic_write(ckpt_dir / DIGEST, lambda f: f.write(data))


def _live_digests(ckpt_dir: Path) -> List[str]:
    """The digest of the ``last.pt`` in place ([] when there is none), for step 2 of a save:
    the digest file's when it lists exactly one, else computed (after a kill between steps 2
    and 4 it lists two; a checkpoint from before digests has none)."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return []
    try:
        listed = _read_digests(ckpt_dir)
    except CheckpointError:
        listed = None
    return listed if listed is not None and len(listed) == 1 else [file_sha256(path)]


def _disk_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write: ``err`` itself, or, for the RuntimeError torch's zip
    writer raises when its file's write fails, the OSError it was raised while handling."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        if not isinstance(err, RuntimeError):
            return None
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _saved_step(path: Path) -> Optional[int]:
    """The step of the checkpoint at ``path``, its tensors left on disk (mmap); None if unread."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(state["step"])
    except Exception:  # only for a message: the checkpoint is judged when it is loaded
        return None


def _write_failed(ckpt_dir: Path, state: Dict[str, Any], err: OSError,
                  replaced: bool) -> CheckpointError:
    path = ckpt_dir / LATEST
    step = state.get("step") if isinstance(state, dict) else None
    what = ("the disk is full" if err.errno in _DISK_FULL
            else "writing failed") + f" ({err.strerror or err})"
    run_dir = ckpt_dir.parent
    resume = (f"continue with: python run.py --resume {run_dir}"
              if (run_dir / "config.yaml").is_file() else f"resume the run in {run_dir}")
    if replaced:  # only the digest file's last rewrite failed: the new checkpoint verifies
        kept = f"the checkpoint {path} of step {step} was written whole and is intact"
    elif path.is_file():
        old = _saved_step(path)
        kept = (f"the previous checkpoint {path}" + (f", of step {old}," if old is not None
                                                     else "") + " is intact")
    else:
        kept = "there is no earlier checkpoint, so a resumed run starts again at step 0"
    return CheckpointError(
        f"cannot save the checkpoint{'' if step is None else f' of step {step}'} in {ckpt_dir}: "
        f"{what}. Nothing was lost: {kept}; free some space on that disk (or move the run "
        f"folder to one with room), then {resume}")


def save_checkpoint(ckpt_dir: Path, state: Dict[str, Any]) -> Path:
    """Save ``state`` as ``ckpt_dir/last.pt`` with its digest (the module's four steps);
    :class:`CheckpointError` when the disk is full or the write fails otherwise."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / LATEST
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp, replaced = None, False
    try:
        live = _live_digests(ckpt_dir)
        tmp = write_temporary(path, lambda f: torch.save(state, f))
        digest = file_sha256(tmp)
        _write_digests(ckpt_dir, [*live, digest])
        os.replace(tmp, path)
        replaced = True
        fsync_dir(ckpt_dir)  # the rename reaches the disk before the old digest is dropped
        _write_digests(ckpt_dir, [digest])
    except BaseException as err:
        if tmp is not None and not replaced and tmp.exists():
            tmp.unlink()
        cause = _disk_error(err)
        if cause is None:
            raise
        raise _write_failed(ckpt_dir, state, cause, replaced) from err
    return path


def _torch_load(path: Path) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    # what torch.load raises for an empty file, a cut-short zip archive and bytes that are no
    # pickle; a file that cannot be opened at all keeps its own error
    except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is damaged and cannot be read ({problem}): "
                              + _restart_hint(path.parent)) from None


def load_checkpoint(ckpt_dir: Path) -> Optional[Dict[str, Any]]:
    """The state saved in ``ckpt_dir``, None when there is none yet; a :class:`CheckpointError`
    naming the file when it is damaged or cannot be verified. Removes the temporary files a
    killed save left (only those: ``.last.pt.*.tmp``)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / LATEST
    for tmp in stale_temporaries(path):
        tmp.unlink(missing_ok=True)
        log.info("removed %s, left by a checkpoint write that was killed", tmp)
    if not path.is_file():
        return None
    digests = _read_digests(ckpt_dir)
    if digests is None:
        _torch_load(path)  # a file that does not even load is damaged, whatever its digest
        raise CheckpointError(
            f"checkpoint {path} has no digest file {ckpt_dir / DIGEST}, so it cannot be checked "
            "for damage (it was written before cfd3d recorded digests, or copied without its "
            "digest file): " + _record_hint(ckpt_dir))
    if file_sha256(path) not in digests:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its SHA-256 digest is not the one recorded in "
            f"{ckpt_dir / DIGEST} when it was written, so its bytes changed since (on disk or in "
            f"a copy): if the run folder is a copy, copy {LATEST} again from the original; "
            "otherwise " + _restart_hint(ckpt_dir))
    return _torch_load(path)
