"""Model merging: a registry of methods, a streaming engine, recipes and coefficient search."""

from .config import MergeConfig, ModelSpec, PushToHub, TensorParameters
from .engine import MergePlan, merge
from .methods import MERGE_METHODS, MergeMethod, MethodParameter, get_method, register_merge_method
from .search import SearchResult, search_coefficients, task_accuracy_evaluator

__all__ = [
    "MERGE_METHODS",
    "MergeConfig",
    "MergeMethod",
    "MergePlan",
    "MethodParameter",
    "ModelSpec",
    "PushToHub",
    "SearchResult",
    "TensorParameters",
    "get_method",
    "merge",
    "register_merge_method",
    "search_coefficients",
    "task_accuracy_evaluator",
]
