"""Crash-safe training checkpoints: `checkpoint-<step>` folders written by `accelerator.save_state`.

A save goes into a temporary folder; once every process has written its part, the main process writes
the completion marker (`checkpoint_complete.json`, holding the training position), flushes everything to
disk and renames the folder to `checkpoint-<step>` in one atomic step. A kill at any moment leaves either
no `checkpoint-<step>` or a complete one, so `find_latest_checkpoint` never picks a broken save, and
`remove_incomplete_checkpoints` cleans up what interrupted saves left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete.json"
_TEMPORARY_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
_TRASH_PREFIX = ".old-" + CHECKPOINT_PREFIX


def _fsync(path: Path) -> None:
    """Flushes a file, or a folder's entries, to disk. (Folders cannot be opened on Windows: skipped there.)"""
    if os.name == "nt" and path.is_dir():
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """Flushes every file and folder under `folder`, then `folder` itself."""
    for path in sorted(folder.rglob("*")) + [folder]:
        _fsync(path)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `checkpoint-<step>` folder name (None for other names)."""
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True for a `checkpoint-<step>` folder whose save finished (it holds the completion marker)."""
    path = Path(path)
    return path.is_dir() and checkpoint_step(path) is not None and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if is_complete_checkpoint(path)]
    return sorted(found, key=checkpoint_step)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir` (None when there is none). Folders of saves
    that were interrupted are never returned: they lack the marker or keep their temporary name."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(value: str, output_dir: str | os.PathLike) -> Path | None:
    """`--resume_from_checkpoint`: `"latest"` -> the newest complete checkpoint of `output_dir` (None
    when there is none yet: the run starts from scratch), or a path that must be a complete checkpoint."""
    if value == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such folder")
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {value}: {COMPLETE_MARKER} is missing, so this checkpoint's save never "
            f"finished; use --resume_from_checkpoint latest to pick the newest complete one"
        )
    return path


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    """The training position saved with a checkpoint (`completed_steps`, `epoch`, `batches_in_epoch`, ...).

    Refuses a checkpoint holding Accelerate's `custom_checkpoint_*.pkl` (older versions saved the scheduler
    so): `accelerator.load_state` would unpickle it with `weights_only=False`, running any code in it."""
    checkpoint = Path(checkpoint)
    unsafe = sorted(path.name for path in checkpoint.glob("custom_checkpoint_*.pkl"))
    if unsafe:
        raise ValueError(
            f"{checkpoint} holds {', '.join(unsafe)}: a pickle that Accelerate would load with weights_only=False, "
            f"which runs any code in it. metaseg-hf keeps the scheduler in {COMPLETE_MARKER} instead; if this "
            f"checkpoint is your own (written by an older version), delete {unsafe[0]} and resume again "
            "(the schedule is rebuilt from the recorded step)."
        )
    return json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))


def scheduler_state(scheduler) -> dict:
    """The learning-rate scheduler's state as plain JSON data, for the checkpoint's marker.

    The scheduler is not registered with `accelerator.register_for_checkpointing`: Accelerate would pickle it
    to `custom_checkpoint_0.pkl` and read it back with `torch.load(weights_only=False)`, so a file planted in
    a checkpoint folder would run its code on resume. Its state (step count, base and last learning rates)
    is plain data; the learning-rate functions themselves come from the code, not the checkpoint."""
    state = scheduler.state_dict()
    try:
        json.dumps(state)
    except TypeError as error:
        raise TypeError(f"{type(scheduler).__name__}'s state is not plain data ({error}); it cannot be kept in "
                        f"{COMPLETE_MARKER}. Use a LambdaLR-based schedule (`metaseg_hf.training.create_scheduler`).") from None
    return state


def restore_scheduler(scheduler, training_state: dict) -> None:
    """Puts `scheduler` where `training_state` (a checkpoint's marker) left it: its saved state
    (`scheduler_state`), or, for checkpoints written before that was kept, the state after
    `completed_steps` steps (exact unless mixed precision skipped optimizer steps)."""
    state = training_state.get("scheduler")
    if state is not None:
        scheduler.load_state_dict(state)
        return
    with warnings.catch_warnings():  # "step() before optimizer.step()": the optimizer state is already loaded
        warnings.simplefilter("ignore", UserWarning)
        scheduler.last_epoch = training_state["completed_steps"] - 1
        scheduler.step()


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Deletes the temporary folders of interrupted saves; returns what it removed (main process only)."""
    output_dir = Path(output_dir)
    removed = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.is_dir() and (path.name.startswith(_TEMPORARY_PREFIX) or path.name.startswith(_TRASH_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, training_state: dict,
                    total_limit: int | None = None) -> Path:
    """`accelerator.save_state` into `output_dir/checkpoint-<step>`, crash-safely. Call it on every process.

    The state is written into a temporary folder; once every process has finished, the main process
    writes the completion marker (with `training_state`), flushes everything to disk and renames the
    folder to `checkpoint-<step>` in one atomic step. A kill at any moment leaves either no
    `checkpoint-<step>` or a complete one, so `find_latest_checkpoint` never picks a broken save.
    `total_limit` keeps only that many newest checkpoints.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f"{_TEMPORARY_PREFIX}{step}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = temporary / COMPLETE_MARKER
        marker.write_text(json.dumps({"step": step, **training_state}, indent=2), encoding="utf-8")
        _fsync_tree(temporary)
        if final.exists():  # re-saving a step (a resumed run repeating a save): swap the folders
            trash = output_dir / f"{_TRASH_PREFIX}{step}"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(final, trash)
            os.replace(temporary, final)
            shutil.rmtree(trash)
        else:
            os.replace(temporary, final)
        _fsync(output_dir)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPLETE_MARKER",
    "checkpoint_step",
    "find_latest_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "read_training_state",
    "remove_incomplete_checkpoints",
    "resolve_checkpoint",
    "restore_scheduler",
    "save_checkpoint",
    "scheduler_state",
]
