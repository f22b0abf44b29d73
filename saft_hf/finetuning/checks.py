"""What a fine-tune checks before it loads or writes anything: the task, the mode, the checkpoint to resume from,
and that `output_dir` holds no other run."""

from __future__ import annotations

from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from ..data import Task, get_task
from ..errors import UnsafeOutputError
from ..io import CheckpointReader
from .arguments import RESOLVED_CONFIG_FILE

# The weight files the Trainer resumes a checkpoint from (Trainer._load_from_checkpoint), and that a saved run holds.
WEIGHTS_FILES = (
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
)


def find_task(name: str) -> Task:
    """The registered task `name`; an unknown name is a user error about the `task` field."""
    try:
        return get_task(name)
    except KeyError as error:
        raise ValueError(f"task: {error.args[0]}") from None


def check_resume_checkpoint(checkpoint: str | None) -> None:
    """Refuse a `resume_from_checkpoint` the Trainer could not resume from, before anything is loaded or written: it
    must be a folder holding `trainer_state.json` (the step, the schedule) and weights that read back (a truncated
    file is named)."""
    if checkpoint is None:
        return
    folder = Path(checkpoint)
    advice = "pass a checkpoint-<step> folder of an earlier run."
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"resume_from_checkpoint {checkpoint} is not a folder; {advice}")
    if not folder.exists():
        raise FileNotFoundError(f"resume_from_checkpoint {checkpoint} does not exist; {advice}")
    if not (folder / TRAINER_STATE_NAME).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint {checkpoint} holds no {TRAINER_STATE_NAME}, so it is not a Trainer checkpoint; "
            f"{advice}"
        )
    weights = [folder / name for name in WEIGHTS_FILES if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(
            f"resume_from_checkpoint {checkpoint} holds no model weights (one of {', '.join(WEIGHTS_FILES)})."
        )
    for file in weights:
        try:
            # An index is read with its shards; a checkpoint the run wrote itself may hold pickle weights.
            CheckpointReader(folder if file.name.endswith(".index.json") else file, allow_pickle=True)
        except (ValueError, FileNotFoundError) as error:
            message = f"resume_from_checkpoint {checkpoint}: {error}; resume from another checkpoint."
            raise ValueError(message) from error


def holds_a_run(folder: Path) -> bool:
    """True if `folder` holds (part of) a fine-tune: its resolved configuration, checkpoints or saved weights."""
    if not folder.is_dir():
        return False
    markers = (RESOLVED_CONFIG_FILE, *WEIGHTS_FILES)
    return any((folder / name).exists() for name in markers) or get_last_checkpoint(folder) is not None


def check_output_dir(output_dir: Path, resume_from_checkpoint: str | None) -> None:
    """Refuse to write into a folder that holds another run (transformers 5 would overwrite it without asking),
    unless this run resumes from one of that folder's checkpoints."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} exists and is not a folder; choose another output_dir.")
    resuming_here = resume_from_checkpoint is not None and (
        Path(resume_from_checkpoint).resolve().parent == output_dir.resolve()
    )
    if holds_a_run(output_dir) and not resuming_here:
        raise UnsafeOutputError(
            f"output_dir {output_dir} already holds a fine-tuning run; choose another output_dir, or pass "
            f"--resume_from_checkpoint {output_dir}/checkpoint-<step> to continue that run."
        )
