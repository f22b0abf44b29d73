"""Memory and time of merging T = 2, 4, 8 ViT-B/32-sized vision towers: saft_hf vs mergekit vs a naive merge.

    python benchmarks/merge_scaling.py [--workdir DIR] [--counts 2 4 8] [--methods ties task_arithmetic]
                                       [--mergekit-python PATH] [--repeats 3]

Writes a random `CLIPVisionModel` with `CLIPVisionConfig()` defaults (ViT-B/32: 88M parameters, 350 MB in float32)
and 8 perturbed copies (fine-tunes: base + 1e-3 N(0, 1), float32) to disk, then runs every (method, T, approach) in
a fresh process so that peaks do not leak between measurements:

- streaming: `saft_hf.merging.merge` in a worker, timed after its imports and a tiny warm-up merge;
- naive: every state dict fully loaded into allocated memory first (as `torch.load` or `model.state_dict()` of
  loaded models would), the method function applied name by name in float64, the whole output saved at the end:
  the float64 reference the other outputs are compared with;
- saft-hf: the command `saft-hf merge recipe.yaml`, start to end (imports included), on a mergekit recipe;
- mergekit: `mergekit-yaml recipe.yaml OUT --no-copy-tokenizer` on the same recipe, start to end, with the
  interpreter `--mergekit-python` (default: this one when it can import mergekit; otherwise the column is skipped
  with a note). mergekit runs with its defaults (torch's intra-op threads included).

Every input file is read once before a method's runs, so that every run (the first one too) reads its inputs from
the page cache, and the disk's write-back is flushed before each command, so that no run is throttled writing its
output while an earlier run's is still written back. The two commands run ``--repeats`` times, alternating, so that
a change in the machine's load touches both; their wall time is the median of the repeats (each repeat is printed),
the ratio is of the medians.
Per run it reports wall time, peak RSS (kernel `VmHWM`, which counts memory-mapped checkpoint pages: reclaimable
file cache) and peak anonymous memory (`RssAnon` sampled every 2 ms in a thread: what the merge allocates), both
absolute and above the baseline of a worker that already ran a tiny warm-up merge (so imports and lazily loaded
modules are not counted). Workers run with `MALLOC_MMAP_THRESHOLD_=1048576`: glibc then returns freed tensors to
the OS instead of keeping them in its heap, so `RssAnon` follows live allocations rather than allocator history.
Memory targets refer to anonymous memory. The command runs (saft-hf, mergekit) report the child's peak `RssAnon`,
sampled the same way from outside, absolute (imports included), and its peak RSS from `wait4`. Each output's
largest difference from the float64 reference is printed (target for saft-hf: <= 1e-6), and so is the load average:
the wall times depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import AnonSampler, status_kb

MB = 1024**2


# ---- inputs ----------------------------------------------------------------------------------------------------


def write_inputs(workdir: Path, count: int) -> dict:
    """Base + ``count`` fine-tunes of a ViT-B/32 vision tower with random weights; returns sizes."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    base_dir = workdir / "base"
    if not (base_dir / "model.safetensors").is_file():
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig()).save_pretrained(base_dir)
    base = load_file(base_dir / "model.safetensors")
    for index in range(count):
        folder = workdir / f"ft{index}"
        if (folder / "model.safetensors").is_file():
            continue
        folder.mkdir(exist_ok=True)
        shutil.copy(base_dir / "config.json", folder / "config.json")
        generator = torch.Generator().manual_seed(index + 1)
        tuned = {name: tensor + 1e-3 * torch.randn(tensor.shape, generator=generator) for name, tensor in base.items()}
        save_file(tuned, folder / "model.safetensors", metadata={"format": "pt"})
        del tuned
    tiny = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    for index in range(3):
        if not (workdir / f"tiny{index}" / "model.safetensors").is_file():
            torch.manual_seed(index)
            CLIPVisionModel(tiny).save_pretrained(workdir / f"tiny{index}")
    largest = max(tensor.numel() * tensor.element_size() for tensor in base.values())
    total = sum(tensor.numel() * tensor.element_size() for tensor in base.values())
    return {"checkpoint_bytes": total, "largest_tensor_bytes": largest, "tensors": len(base)}


METHOD_PARAMETERS = {"ties": {"alpha": 1.0, "density": 0.2}, "task_arithmetic": {"alpha": 0.3}}
# The same merges as mergekit recipes (which saft-hf reads as they are): every model weight 1.
MERGEKIT_PARAMETERS = {"ties": {"lambda": 1.0, "density": 0.2, "normalize": True}, "task_arithmetic": {"lambda": 0.3}}
ROOT = Path(__file__).resolve().parents[1]


def write_recipe(workdir: Path, method: str, count: int) -> Path:
    import yaml

    recipe = {
        "merge_method": method,
        "base_model": str(workdir / "base"),
        "dtype": "float32",
        "models": [{"model": str(workdir / f"ft{i}"), "parameters": {"weight": 1.0}} for i in range(count)],
        "parameters": MERGEKIT_PARAMETERS[method],
    }
    path = workdir / f"recipe-{method}-{count}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---- one measurement (runs in its own process) -----------------------------------------------------------------


def measure(workdir: Path, approach: str, method: str, count: int) -> dict:
    import torch  # noqa: F401  (imported before the baseline so it is not attributed to the merge)

    from saft_hf.merging import merge
    from saft_hf.merging.methods import get_method

    output_dir = workdir / f"out-{approach}-{method}-{count}"
    shutil.rmtree(output_dir, ignore_errors=True)
    warm_up = {
        "base_model": str(workdir / "tiny0"),
        "models": [str(workdir / "tiny1"), str(workdir / "tiny2")],
        "method": method,
        "output_dir": str(workdir / f"warm-up-{approach}-{method}-{count}"),
    }
    merge(warm_up, progress=False)
    naive_merge(warm_up | {"output_dir": warm_up["output_dir"] + "-naive", "parameters": {}}, get_method(method))
    config = {
        "base_model": str(workdir / "base"),
        "models": [str(workdir / f"ft{i}") for i in range(count)],
        "method": method,
        "parameters": METHOD_PARAMETERS[method],
        "output_dir": str(output_dir),
    }
    baseline_kb = status_kb("RssAnon")
    start = time.perf_counter()
    with AnonSampler() as sampler:
        if approach == "streaming":
            merge(config, progress=False)
        else:
            naive_merge(config, get_method(method))
    seconds = time.perf_counter() - start
    kept = [output_dir] if approach == "naive" else []  # the float64 reference for the command runs
    for folder in {output_dir, Path(warm_up["output_dir"]), Path(warm_up["output_dir"] + "-naive")} - set(kept):
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "approach": approach,
        "method": method,
        "T": count,
        "seconds": seconds,
        "peak_rss_mb": status_kb("VmHWM") / 1024,
        "peak_anon_mb": sampler.peak_kb / 1024,
        "baseline_anon_mb": baseline_kb / 1024,
        "anon_above_baseline_mb": (sampler.peak_kb - baseline_kb) / 1024,
    }


def naive_merge(config: dict, method) -> None:
    """Everything in memory at once: T + 1 materialised state dicts and the full merged state dict."""
    from safetensors.torch import load_file, save_file

    def load(folder: str) -> dict:
        return {name: tensor.clone() for name, tensor in load_file(Path(folder) / "model.safetensors").items()}

    base = load(config["base_model"])
    states = [load(folder) for folder in config["models"]]
    weights = [1.0] * len(states)
    merged = {
        name: method.function(
            tensor, [state[name] for state in states], weights, **method.resolve_parameters(config["parameters"])
        ).to(tensor.dtype)
        for name, tensor in base.items()
    }
    Path(config["output_dir"]).mkdir(parents=True)
    save_file(merged, Path(config["output_dir"]) / "model.safetensors", metadata={"format": "pt"})


# ---- driver ----------------------------------------------------------------------------------------------------


def run_command(command: list[str], approach: str, method: str, count: int, environment: dict) -> dict:
    """Run ``command`` to its end: wall time, peak anonymous memory (sampled) and peak RSS (``wait4``)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
    with AnonSampler(pid=process.pid) as sampler:
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return {
        "approach": approach,
        "method": method,
        "T": count,
        "seconds": seconds,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "peak_anon_mb": sampler.peak_kb / 1024,
    }


def max_difference(folder: Path, reference: Path) -> float:
    """Largest absolute difference between the tensors of two merged folders (same names)."""
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict:
        return {name: t for file in sorted(path.glob("*.safetensors")) for name, t in load_file(file).items()}

    ours, theirs = tensors(folder), tensors(reference)
    if sorted(ours) != sorted(theirs):
        raise RuntimeError(f"{folder} and {reference} hold different tensor names")
    return max(float((ours[name].double() - theirs[name].double()).abs().max()) for name in theirs)


def warm_page_cache(workdir: Path, count: int) -> None:
    """Read the base's and the first ``count`` fine-tunes' weight files once, so no measured run reads the disk."""
    for folder in ["base", *(f"ft{index}" for index in range(count))]:
        with open(workdir / folder / "model.safetensors", "rb") as weights:
            while weights.read(64 * MB):
                pass


def run_commands(workdir: Path, method: str, count: int, mergekit_python: str | None, repeats: int) -> list[dict]:
    """saft-hf and (when available) mergekit on the same mergekit recipe, ``repeats`` times each, alternating; a row
    per approach with the median wall time (``runs``: every repeat's), the largest peaks, and its first output
    compared with the naive float64 one, which is then removed."""
    recipe = write_recipe(workdir, method, count)
    reference = workdir / f"out-naive-{method}-{count}"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    commands = {"saft-hf": [sys.executable, "-m", "saft_hf.cli", "merge", str(recipe), "--no_progress", "--output_dir"]}
    if mergekit_python:
        commands["mergekit"] = [
            mergekit_python,
            "-m",
            "mergekit.scripts.run_yaml",
            str(recipe),
            "--no-copy-tokenizer",
            "--quiet",
        ]
    # Timed as installed: pip compiles a package's bytecode at install time, which an editable install under
    # PYTHONDONTWRITEBYTECODE=1 never gets (saft_hf's modules would be compiled again at every start: 30 ms).
    compileall.compile_dir(ROOT / "saft_hf", quiet=1)
    runs: dict[str, list[dict]] = {approach: [] for approach in commands}
    difference = {}
    for _ in range(repeats):
        for approach, command in commands.items():
            output_dir = workdir / f"out-{approach}-{method}-{count}"
            shutil.rmtree(output_dir, ignore_errors=True)
            os.sync()  # no run waits on the writeback of an earlier run's output (measured: 0.1 s vs up to 0.9 s)
            runs[approach].append(run_command([*command, str(output_dir)], approach, method, count, environment))
            difference.setdefault(approach, max_difference(output_dir, reference))
            shutil.rmtree(output_dir, ignore_errors=True)
    shutil.rmtree(reference, ignore_errors=True)
    return [
        {
            **repeated[0],
            "seconds": statistics.median(run["seconds"] for run in repeated),
            "runs": [run["seconds"] for run in repeated],
            "peak_rss_mb": max(run["peak_rss_mb"] for run in repeated),
            "peak_anon_mb": max(run["peak_anon_mb"] for run in repeated),
            "max_abs_difference": difference[approach],
        }
        for approach, repeated in runs.items()
    ]


def default_mergekit_python() -> str | None:
    return sys.executable if importlib.util.find_spec("mergekit") is not None else None


def run_worker(workdir: Path, approach: str, method: str, count: int) -> dict:
    command = [sys.executable, __file__, "--worker", approach, method, str(count), "--workdir", str(workdir)]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(sizes: dict, rows: list[dict], counts: list[int], methods: list[str]) -> None:
    checkpoint_mb, largest_mb = sizes["checkpoint_bytes"] / MB, sizes["largest_tensor_bytes"] / MB
    print(
        f"\nViT-B/32 vision tower: {sizes['tensors']} tensors, checkpoint {checkpoint_mb:.0f} MB, "
        f"largest tensor {largest_mb:.1f} MB; load average at the end "
        f"{', '.join(f'{load:.2f}' for load in os.getloadavg())}\n"
    )
    header = (
        f"{'method':<16}{'T':>3}  {'approach':<10}{'wall s':>8}{'peak RSS MB':>13}{'peak anon MB':>14}"
        f"{'anon>base MB':>14}{'max |diff| vs f64':>19}"
    )
    print(header + "\n" + "-" * len(header))
    by_key = {(row["method"], row["T"], row["approach"]): row for row in rows}
    approaches = [a for a in ("streaming", "naive", "saft-hf", "mergekit") if any(r["approach"] == a for r in rows)]
    for method in methods:
        for count in counts:
            for approach in approaches:
                row = by_key[(method, count, approach)]
                above = f"{row['anon_above_baseline_mb']:>14.0f}" if "anon_above_baseline_mb" in row else f"{'':>14}"
                difference = f"{row['max_abs_difference']:>19.1e}" if "max_abs_difference" in row else f"{'':>19}"
                print(
                    f"{method:<16}{count:>3}  {approach:<10}{row['seconds']:>8.2f}{row['peak_rss_mb']:>13.0f}"
                    f"{row['peak_anon_mb']:>14.0f}{above}{difference}"
                )
    print("\nratios naive / streaming (anon above baseline, peak RSS, wall time):")
    for method in methods:
        for count in counts:
            stream, naive = by_key[(method, count, "streaming")], by_key[(method, count, "naive")]
            anon = naive["anon_above_baseline_mb"] / stream["anon_above_baseline_mb"]
            rss, seconds = naive["peak_rss_mb"] / stream["peak_rss_mb"], naive["seconds"] / stream["seconds"]
            print(f"  {method:<16} T={count}: anon x{anon:.1f}, RSS x{rss:.2f}, time x{seconds:.2f}")
    if "mergekit" in approaches:
        print("\nwall time / mergekit's, medians (target for saft-hf, start to end: <= 0.25):")
        for method in methods:
            for count in counts:
                mergekit = by_key[(method, count, "mergekit")]["seconds"]
                command = by_key[(method, count, "saft-hf")]["seconds"]
                stream = by_key[(method, count, "streaming")]["seconds"]
                verdict = "OK" if command <= 0.25 * mergekit else "MISSED"
                print(
                    f"  {method:<16} T={count}: saft-hf x{command / mergekit:.2f} ({verdict}), streaming merge alone "
                    f"x{stream / mergekit:.2f}"
                )
    print("\ntargets (streaming, allocated memory above the interpreter's baseline; saft-hf output vs float64):")
    for method in methods:
        first, last = by_key[(method, counts[0], "streaming")], by_key[(method, counts[-1], "streaming")]
        ratio = last["anon_above_baseline_mb"] / checkpoint_mb
        line = (
            f"  {method:<16} T={counts[-1]} peak {ratio:.2f}x checkpoint (target <= 2x): "
            f"{'OK' if ratio <= 2 else 'MISSED'}"
        )
        if counts[-1] > counts[0]:
            growth = (last["anon_above_baseline_mb"] - first["anon_above_baseline_mb"]) / (counts[-1] - counts[0])
            line += (
                f"; growth per added input {growth:+.1f} MB (target <= largest tensor, {largest_mb:.1f} MB): "
                f"{'OK' if growth <= largest_mb else 'MISSED'}"
            )
        worst = max(by_key[(method, count, "saft-hf")]["max_abs_difference"] for count in counts)
        line += f"; output max |diff| {worst:.1e} (target <= 1e-6): {'OK' if worst <= 1e-6 else 'MISSED'}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Where to write checkpoints (default: a temp dir).")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"], choices=sorted(METHOD_PARAMETERS))
    parser.add_argument(
        "--mergekit-python",
        default=default_mergekit_python(),
        help="Python interpreter that can import mergekit (default: this one, if it can).",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each command (median reported).")
    parser.add_argument("--keep", action="store_true", help="Keep the generated checkpoints.")
    parser.add_argument("--worker", nargs=3, metavar=("APPROACH", "METHOD", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        approach, method, count = args.worker
        print(json.dumps(measure(args.workdir, approach, method, int(count))))
        return
    if not args.mergekit_python:
        print("mergekit is not importable here and --mergekit-python was not given: no mergekit column.")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="saft_hf-merge-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"writing a ViT-B/32 base and {max(args.counts)} fine-tunes to {workdir} ...", flush=True)
        sizes = write_inputs(workdir, max(args.counts))
        rows = []
        for method in args.methods:
            for count in args.counts:
                warm_page_cache(workdir, count)
                runs = [run_worker(workdir, approach, method, count) for approach in ("streaming", "naive")]
                runs += run_commands(workdir, method, count, args.mergekit_python, args.repeats)
                for row in runs:
                    each = f" (runs: {', '.join(f'{s:.2f}' for s in row['runs'])})" if "runs" in row else ""
                    print(
                        f"  {method} T={count} {row['approach']}: {row['seconds']:.2f} s{each}, "
                        f"peak anon {row['peak_anon_mb']:.0f} MB",
                        flush=True,
                    )
                rows += runs
        report(sizes, rows, args.counts, args.methods)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
