"""Orbax checkpoints of the whole training state, atomic and verified.

A checkpoint holds everything needed to continue bit-exactly: params, optimizer state, step,
RNG, the carried memory (the data position is a pure function of the step). Orbax writes each
step to a temporary directory and renames it when complete, so a process killed mid-write
leaves no half checkpoint under a step name. After the write a sha256 manifest of every file is
added; at restore the manifest is checked first, and a checkpoint that fails (bytes flipped,
files removed, unreadable) is reported by name and the previous good one is used. Older steps
are deleted only after the new step's manifest is written, so a process killed at any point of
a save leaves at least one checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from lamemo_jax.fileio import write_text_atomic

MANIFEST = "lamemo_manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit this config."""


def _files(step_dir: str):
    for root, _, names in os.walk(step_dir):
        for n in sorted(names):
            if n == MANIFEST:
                continue
            p = os.path.join(root, n)
            yield os.path.relpath(p, step_dir), p


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(step_dir: str) -> None:
    manifest = {rel: _sha256(p) for rel, p in _files(step_dir)}
    write_text_atomic(os.path.join(step_dir, MANIFEST), json.dumps(manifest, indent=0, sort_keys=True))


def verify_manifest(step_dir: str) -> Optional[str]:
    """None if every file matches its recorded sha256, else what is wrong."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return f"{MANIFEST} is missing (the write did not complete)"
    try:
        manifest = json.load(open(path))
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    present = dict(_files(step_dir))
    for rel, digest in manifest.items():
        if rel not in present:
            return f"file {rel} is missing"
        if _sha256(present[rel]) != digest:
            return f"file {rel} does not match its sha256 (corrupted)"
    return None


class Checkpointer:
    """Saves / restores ``(state pytree, json metadata)`` per step under ``directory``.

    ``read_only=True`` is for readers beside a live run (``eval.py``, ``load_run``): it never
    creates, deletes or moves anything, so it cannot take a checkpoint from under the trainer
    that owns the directory. A checkpoint that does not verify (e.g. one whose manifest the
    trainer is still writing) is skipped with a warning and left where it is.
    """

    def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self.keep = keep
        # max_to_keep=None: orbax would delete the old steps inside save(), before the new
        # step's manifest exists; with keep=1 a kill in between left no checkpoint that verifies.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only,
                                               read_only=read_only,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> str:
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; not saving step {step}")
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            write_manifest(self.step_dir(step))
        for old in self.all_steps()[:-self.keep]:  # collective: every process calls it
            self.manager.delete(old)
        return self.step_dir(step)

    def delete(self, step: int) -> None:
        """Removes one step (collective: every process calls it)."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; not deleting step {step}")
        self.manager.delete(step)

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
        """(state, meta) of one named step; a clear error if it is missing or corrupted."""
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(available: {self.all_steps()})")
        why = verify_manifest(self.step_dir(step))
        if why is not None:
            raise CheckpointError(f"checkpoint {self.step_dir(step)} is unusable: {why}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, abstract_state: Any) -> Optional[Tuple[Any, dict, int]]:
        """(state, meta, step) of the newest good checkpoint; None when there is none at all.

        A bad newest checkpoint is skipped with a warning naming it (and, unless read-only,
        moved out of the way, see ``_quarantine``); if checkpoints exist but none is good, raises
        ``CheckpointError``.
        """
        steps = self.all_steps()
        if not steps:
            return None
        problems = []
        for step in reversed(steps):
            where = self.step_dir(step)
            why = verify_manifest(where)
            if why is None:
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                    if problems:
                        logging.warning("using checkpoint %s instead", where)
                        self._quarantine([s for s in steps if s > step])
                    return restored["state"], dict(restored["meta"]), step
                except Exception as e:  # noqa: BLE001 - any failure makes this checkpoint unusable
                    why = f"restore failed: {type(e).__name__}: {str(e)[:300]}"
            logging.warning("checkpoint %s is unusable: %s", where, why)
            problems.append(f"{where}: {why}")
        raise CheckpointError("no usable checkpoint in " + self.directory + ":\n  " + "\n  ".join(problems))

    def _quarantine(self, bad_steps) -> None:
        """Moves unusable checkpoints out of the step namespace (kept for inspection in
        ``<directory>_corrupt/``) so that they never block or shadow a new save."""
        if jax.process_index() != 0 or not bad_steps or self.read_only:
            return
        dest_root = self.directory.rstrip("/") + "_corrupt"
        os.makedirs(dest_root, exist_ok=True)
        for step in bad_steps:
            dest = os.path.join(dest_root, f"{step}-{int(time.time() * 1000)}")
            os.replace(self.step_dir(step), dest)
            logging.warning("moved unusable checkpoint %s to %s", self.step_dir(step), dest)
        self.manager.reload()

    def latest_meta(self) -> Optional[dict]:
        """The JSON metadata of the newest checkpoint (None when there is none or it is unreadable)."""
        for step in reversed(self.all_steps()):
            path = os.path.join(self.step_dir(step), "meta", "metadata")
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, ValueError):
                continue
        return None

    def close(self):
        self.manager.close()
