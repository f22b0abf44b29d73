"""The file names saft_hf reads and writes, and what a folder (or Hub repo) holds judged by its file names alone.

A leaf: it imports nothing from saft_hf, so Hub access, checkpoint reading and task vectors can all ask whether a
folder is a task vector without importing each other.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

CONFIG_NAME = "config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # a PEFT adapter folder's config
# Written into every output folder saft_hf owns (saft_hf.io.atomic_output_dir); never pushed.
OUTPUT_MANIFEST_NAME = ".saft_hf_output.json"
# Written beside every merged model: the resolved recipe that produced it.
RECIPE_NAME = "merge_config.yaml"
# What the demo's pre-training writes beside the model it pre-trains (its settings and metrics).
PRETRAINING_RECORD_NAME = "pretraining.json"
TASK_VECTOR_WEIGHTS_NAME = "task_vector"
# The index first: a sharded vector's metadata is read from it.
TASK_VECTOR_WEIGHT_FILES = (
    f"{TASK_VECTOR_WEIGHTS_NAME}.safetensors.index.json",
    f"{TASK_VECTOR_WEIGHTS_NAME}.safetensors",
)
# A CLIP classifier's zero-shot head (saft_hf.models.clip.ZeroShotHead), saved beside its vision tower.
HEAD_FILE = "zero_shot_head.safetensors"
# The fine-tuning mode a linearised (FTTS) fine-tune, and a merge of such, records in config.json (saft_hf.modes.ftts).
FTTS_MODE = "ftts"
# Model-card tags: every card saft_hf writes carries SAFT_HF_TAG; a pushed output's card also carries its kind's tag.
# A push replaces what the repo holds only when its card carries both (saft_hf.hub.check_push_target).
SAFT_HF_TAG = "saft_hf"
OUTPUT_KIND_TAGS = {"merge": "merged model", "task-vector": "task vector"}


def is_task_vector_listing(files: Collection[str]) -> bool:
    """Whether a folder (or Hub repo) with these files holds a saved task vector: its weights, and no model config."""
    return CONFIG_NAME not in files and any(name in files for name in TASK_VECTOR_WEIGHT_FILES)


def is_task_vector_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved task vector (and no model config)."""
    folder = Path(folder)
    return folder.is_dir() and is_task_vector_listing({path.name for path in folder.iterdir() if path.is_file()})


def is_adapter_listing(files: Collection[str]) -> bool:
    """Whether a folder (or Hub repo) with these files holds a PEFT adapter: its config, and no model config."""
    return CONFIG_NAME not in files and ADAPTER_CONFIG_NAME in files


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a PEFT adapter (and no model config)."""
    folder = Path(folder)
    return folder.is_dir() and is_adapter_listing({path.name for path in folder.iterdir() if path.is_file()})


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "CONFIG_NAME",
    "FTTS_MODE",
    "HEAD_FILE",
    "OUTPUT_KIND_TAGS",
    "OUTPUT_MANIFEST_NAME",
    "PRETRAINING_RECORD_NAME",
    "RECIPE_NAME",
    "SAFT_HF_TAG",
    "TASK_VECTOR_WEIGHTS_NAME",
    "TASK_VECTOR_WEIGHT_FILES",
    "is_adapter_folder",
    "is_adapter_listing",
    "is_task_vector_folder",
    "is_task_vector_listing",
]
