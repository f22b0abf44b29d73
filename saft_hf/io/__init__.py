"""Checkpoint I/O, separate from the merge methods and from the Hub: reading (lazy, memory-mapped, confined to the
folder), writing (sharded safetensors, atomic files), output folders saft_hf may replace, key alignment, and value
checks. Nothing here knows of the Hub; saft_hf.model_weights opens Hub references through saft_hf.hub."""

from .alignment import (
    KeyAlignment,
    NameMap,
    align_keys,
    check_shapes,
    covered_by,
    find_name_map,
    float_names,
    instantiate_on_meta,
    is_submodel,
    read_config,
    shared_storage_aliases,
    tied_aliases,
)
from .checks import base_fingerprint, check_finite, nonfinite_counts
from .outputs import (
    atomic_output_dir,
    check_outside_inputs,
    check_replaceable,
    file_in_the_way,
    remove_abandoned_staging,
    replace_dir,
    write_manifest,
)
from .reading import (
    MODEL_WEIGHTS_NAME,
    SAFE_INDEX_SUFFIX,
    SAFETENSORS_DTYPE_CODES,
    CheckpointReader,
    ComputedStateDict,
    LazyStateDict,
    tensor_dtype,
    tensor_shape,
)
from .writing import ShardedSafetensorsWriter, TensorSpec, parse_size, write_atomically

__all__ = [
    "CheckpointReader",
    "ComputedStateDict",
    "KeyAlignment",
    "LazyStateDict",
    "MODEL_WEIGHTS_NAME",
    "NameMap",
    "SAFETENSORS_DTYPE_CODES",
    "SAFE_INDEX_SUFFIX",
    "ShardedSafetensorsWriter",
    "TensorSpec",
    "align_keys",
    "atomic_output_dir",
    "base_fingerprint",
    "check_finite",
    "check_outside_inputs",
    "check_replaceable",
    "file_in_the_way",
    "check_shapes",
    "covered_by",
    "find_name_map",
    "float_names",
    "instantiate_on_meta",
    "is_submodel",
    "nonfinite_counts",
    "parse_size",
    "read_config",
    "remove_abandoned_staging",
    "replace_dir",
    "shared_storage_aliases",
    "tensor_dtype",
    "tensor_shape",
    "tied_aliases",
    "write_atomically",
    "write_manifest",
]
