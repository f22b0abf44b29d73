"""The ``saft-hf`` command: merge models from a YAML recipe, compute a task vector, or score a model on tasks.

    saft-hf merge CONFIG.yaml [--output_dir DIR] [--push_to_hub ORG/NAME [--private]]
    saft-hf task-vector --base REF --finetuned REF -o OUT [--task NAME ...]
    saft-hf task-vector --base REF --lora ADAPTER -o OUT
    saft-hf evaluate MODEL --task NAME [--task NAME ...] [--split test] [--max_samples N] [--output FILE.json]

References are local folders or Hub ids with an optional ``@revision``. Hub access uses the usual token sources
(``HF_TOKEN``, ``hf auth login``); no token is accepted on the command line, so none ends up in shell history.

An error the user can act on prints one line, ``saft-hf: error: ...``, and exits with status 1; Ctrl-C exits with
130 (``saft_hf.entrypoint``). ``--debug`` anywhere on the command line, or ``SAFT_HF_DEBUG=1``, shows the traceback.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .entrypoint import DEBUG_ENVIRONMENT_VARIABLE, DEBUG_FLAG, exit_process, run_main
from .errors import UnsafeOutputError
from .layout import is_task_vector_folder

PROG = "saft-hf"
EVALUATION_FORMAT = "saft_hf.evaluation"  # marks a `saft-hf evaluate --output` file, which a later run may replace


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    epilog = f"{DEBUG_FLAG} (anywhere on the command line) or {DEBUG_ENVIRONMENT_VARIABLE}=1: show errors' tracebacks."
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=epilog)
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="Merge models as a YAML recipe describes.")
    merge.add_argument("config", type=Path, help="Merge recipe (YAML).")
    merge.add_argument("--output_dir", help="Overrides the recipe's output_dir.")
    merge.add_argument("--push_to_hub", metavar="REPO", help="Also upload the merged folder to this Hub repo.")
    merge.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    merge.add_argument("--no_progress", action="store_true", help="No progress bar.")

    vector = commands.add_parser("task-vector", help="Save fine-tuned minus base (or a LoRA adapter's delta).")
    vector.add_argument("--base", required=True, help="Base model folder or Hub id[@revision].")
    source = vector.add_mutually_exclusive_group(required=True)
    source.add_argument("--finetuned", help="Fine-tuned model folder or Hub id[@revision].")
    source.add_argument("--lora", help="PEFT LoRA adapter folder or Hub id[@revision].")
    vector.add_argument("-o", "--output_dir", required=True, help="Folder to write the task vector to.")
    vector.add_argument("--task", help="Task name recorded in the metadata.")
    vector.add_argument("--finetune_mode", help="Fine-tuning mode recorded in the metadata (full, ftlo, ftts, lora).")
    vector.add_argument("--sam_mode", help="SAM variant used for fine-tuning (recorded).")
    vector.add_argument("--sam_rho", type=float, help="SAM rho used for fine-tuning (recorded).")
    vector.add_argument("--sam_eta", type=float, help="ASAM eta used for fine-tuning (recorded).")
    vector.add_argument(
        "--dtype",
        choices=("float32", "float64", "float16", "bfloat16"),
        help="Storage dtype (default: the base's; float64 makes apply_to exact).",
    )
    vector.add_argument("--max_shard_size", default="2GB", help="Largest safetensors shard.")
    vector.add_argument("--allow_pickle", action="store_true", help="Accept pickle .bin weights (can run code).")
    vector.add_argument(
        "--allow_nonfinite",
        action="store_true",
        help="Let NaN/Inf values in the models (or the difference) through instead of refusing.",
    )
    vector.add_argument(
        "--allow_other_base",
        action="store_true",
        help="With --lora: accept an adapter whose recorded base_model_name_or_path is another model than --base.",
    )
    vector.add_argument("--push_to_hub", metavar="REPO", help="Also upload the task vector to this Hub repo.")
    vector.add_argument("--private", action="store_true", help="Create the Hub repo as private.")

    evaluate = commands.add_parser("evaluate", help="Score a model on tasks; print the accuracy table row.")
    evaluate.add_argument("model", help="Model folder or Hub id (a merge output, a fine-tune, a base model).")
    evaluate.add_argument("--task", action="append", required=True, help="Task name (repeat for several tasks).")
    evaluate.add_argument("--split", default="test", help="train, validation or test (default: test).")
    evaluate.add_argument("--max_samples", type=positive_int, help="Score only the first N examples of each split.")
    evaluate.add_argument(
        "--dataset_path",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="Read TASK's data from this local folder or Hub dataset (repeatable).",
    )
    evaluate.add_argument("--base", help="Pre-trained model for folders without a zero-shot head or processor.")
    evaluate.add_argument("--batch_size", type=positive_int, default=32, help="Examples per forward pass.")
    evaluate.add_argument("--output", type=Path, metavar="FILE.json", help="Also write the scores as JSON.")
    evaluate.add_argument("--no_progress", action="store_true", help="No progress bars.")
    return parser


def run_merge(
    config: str | Path,
    *,
    output_dir: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: bool = True,
) -> Path:
    """Merge as the YAML recipe ``config`` says, with the command line's overrides of its output."""
    from .merging import MergeConfig, merge

    changes = {}
    if output_dir:
        changes["output_dir"] = output_dir
    if push_to_hub:
        changes["push_to_hub"] = {"repo_id": push_to_hub, "private": private}
    return merge(MergeConfig.from_yaml(config).replace(**changes), progress=progress)


def run_task_vector(args: argparse.Namespace) -> Path:
    # Deferred to the command that needs them (like every command's imports here): `saft-hf --help` starts fast.
    import torch

    from . import hub
    from .task_vectors import TaskVector

    if args.lora and args.dtype:  # from_lora stores the deltas in the base's dtype
        raise ValueError("--dtype: not supported with --lora; leave it out")
    if args.push_to_hub:  # checked before anything is computed or written
        hub.check_repo_id(args.push_to_hub, "--push_to_hub")
        inputs = [("--base", args.base), ("--lora", args.lora) if args.lora else ("--finetuned", args.finetuned)]
        hub.check_push_target(args.push_to_hub, "task-vector", inputs=inputs)
    recorded = dict(task=args.task, sam_mode=args.sam_mode, sam_rho=args.sam_rho, sam_eta=args.sam_eta)
    if args.lora:
        vector = TaskVector.from_lora(
            args.base,
            args.lora,
            finetune_mode=args.finetune_mode or "lora",
            allow_pickle=args.allow_pickle,
            allow_other_base=args.allow_other_base,
            allow_nonfinite=args.allow_nonfinite,
            **recorded,
        )
    else:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        vector = TaskVector.from_models(
            args.base,
            args.finetuned,
            finetune_mode=args.finetune_mode,
            dtype=dtype,
            allow_pickle=args.allow_pickle,
            allow_nonfinite=args.allow_nonfinite,
            **recorded,
        )
    folder = vector.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size, progress=True)
    if args.push_to_hub:
        vector.push_to_hub(args.push_to_hub, private=args.private, max_shard_size=args.max_shard_size)
    return folder


def dataset_paths(pairs: Sequence[str], tasks: Sequence[str]) -> dict[str, str]:
    """``{task: path}`` from ``--dataset_path TASK=PATH`` options; each TASK must be one of ``tasks``, once."""
    paths = {}
    for pair in pairs:
        task, equals, path = pair.partition("=")
        if not equals or not task or not path:
            raise ValueError(f"--dataset_path {pair!r}: expected TASK=PATH (e.g. digits=/data/digits)")
        if task not in tasks:
            raise ValueError(f"--dataset_path {pair!r}: task {task!r} is not one of the --task options {list(tasks)}")
        if task in paths:
            raise ValueError(f"--dataset_path: task {task!r} is given twice; give one path per task")
        paths[task] = path
    return paths


def check_evaluation_output(path: Path) -> None:
    """Refuse an ``--output`` that would replace a folder or a file ``saft-hf evaluate`` did not write."""
    from .io import file_in_the_way  # deferred, as every command's imports here

    if path.is_dir():
        raise ValueError(f"--output {path}: is a folder; name a .json file")
    if (blocking := file_in_the_way(path)) is not None:
        raise ValueError(f"--output {path}: {blocking} is a file, not a folder; choose another path")
    if not path.exists():
        return
    try:
        written_here = json.loads(path.read_text()).get("format") == EVALUATION_FORMAT
    except (ValueError, AttributeError, UnicodeDecodeError):
        written_here = False
    if not written_here:
        raise UnsafeOutputError(
            f"--output {path}: exists and was not written by saft-hf evaluate; choose another file or remove it"
        )


def run_evaluate(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Score ``args.model`` on each ``--task``; return the Markdown table (one row: the model, each task's
    accuracy in percent, their average, as in the paper's tables) and the scores as written to ``--output``."""
    # Deferred to the command that needs them: `saft-hf --help` starts fast.
    from . import hub
    from .data import SPLITS, get_task
    from .evaluation import evaluate_model
    from .experiments.tables import to_markdown
    from .io import write_atomically

    # Everything is checked before the first model or dataset is loaded.
    if len(set(args.task)) != len(args.task):
        raise ValueError(f"--task: each task once, got {args.task}")
    tasks = [get_task(name) for name in args.task]
    if args.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {args.split!r}")
    paths = dataset_paths(args.dataset_path, args.task)
    if args.output is not None:
        check_evaluation_output(args.output)
    for option, ref in (("MODEL", args.model), ("--base", args.base)):
        if ref is None:
            continue
        if not hub.is_local(ref):
            hub.list_hub_files(ref)  # a missing repo or revision, or an unreachable Hub, is one line here
        elif not Path(ref).expanduser().is_dir():
            raise FileNotFoundError(f"{option} {ref}: no such model folder (and not a Hub id)")
    if is_task_vector_folder(args.model):
        raise ValueError(
            f"MODEL {args.model}: holds a task vector, not a model; score the model it applies to (saft-hf merge, or "
            "TaskVector.apply_to)"
        )

    options = dict(
        batch_size=args.batch_size, max_samples=args.max_samples, base=args.base, progress=not args.no_progress
    )
    results = {
        task.name: evaluate_model(args.model, task, args.split, dataset_path=paths.get(task.name), **options)
        for task in tasks
    }
    accuracies = {name: 100 * result["accuracy"] for name, result in results.items()}
    row = {"model": args.model, **accuracies, "avg": sum(accuracies.values()) / len(accuracies)}
    table = to_markdown([row], title=f"Accuracy (%) on the {args.split} split")
    scores = {
        "format": EVALUATION_FORMAT,
        "model": args.model,
        "split": args.split,
        "max_samples": args.max_samples,
        "average_accuracy": row["avg"] / 100,
        "tasks": results,
    }
    if args.output is not None:
        write_atomically(args.output, lambda f: f.write(json.dumps(scores, indent=2) + "\n"))
    return table, scores


def run_command(argv: Sequence[str]) -> None:
    """Parse ``argv`` and run the command it names; print the folder written (merge, task-vector) or the table of
    scores (evaluate)."""
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        print(
            run_merge(
                args.config,
                output_dir=args.output_dir,
                push_to_hub=args.push_to_hub,
                private=args.private,
                progress=not args.no_progress,
            )
        )
    elif args.command == "task-vector":
        print(run_task_vector(args))
    else:
        print(run_evaluate(args)[0], end="")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``saft-hf`` command (``argv`` defaults to ``sys.argv[1:]``); returns its exit status: user errors are one
    line on stderr (``saft_hf.entrypoint.run_main``)."""
    return run_main(run_command, argv, prog=PROG)


def console_main() -> NoReturn:
    """The console script: :func:`main` on ``sys.argv``, then :func:`saft_hf.entrypoint.exit_process` (no
    interpreter teardown: 0.3 s of a merge that takes 2)."""
    exit_process(main())


if __name__ == "__main__":
    console_main()
