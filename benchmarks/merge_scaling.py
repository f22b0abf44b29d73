"""Memory and time of merging T = 2, 4, 8 ViT-B/32-sized vision towers: streaming engine vs naive in-memory merge.

    python benchmarks/merge_scaling.py [--workdir DIR] [--counts 2 4 8] [--methods ties task_arithmetic]

Writes a random `CLIPVisionModel` with `CLIPVisionConfig()` defaults (ViT-B/32: 88M parameters, 350 MB in float32)
and 8 perturbed copies to disk, then runs every (method, T, approach) in a fresh subprocess so that peaks do not
leak between measurements:

- streaming: `saft_hf.merging.merge` (memory-mapped inputs, one tensor name at a time, sharded atomic output);
- naive: every state dict fully loaded into allocated memory first (as `torch.load` or `model.state_dict()` of
  loaded models would), the same method function applied name by name, the whole output saved at the end.

Per run it reports wall time, peak RSS (kernel `VmHWM`, which counts memory-mapped checkpoint pages: reclaimable
file cache) and peak anonymous memory (`RssAnon` sampled every 2 ms in a thread: what the merge allocates), both
absolute and above the baseline of a worker that already ran a tiny warm-up merge (so imports and lazily loaded
modules are not counted). Workers run with `MALLOC_MMAP_THRESHOLD_=1048576`: glibc then returns freed tensors to
the OS instead of keeping them in its heap, so `RssAnon` follows live allocations rather than allocator history.
Memory targets refer to anonymous memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


# ---- one measurement (runs in its own process) -----------------------------------------------------------------


def measure(workdir: Path, approach: str, method: str, count: int) -> dict:
    import torch  # noqa: F401  (imported before the baseline so it is not attributed to the merge)

    from saft_hf.merging import merge
    from saft_hf.merging.methods import get_method

    output_dir = workdir / f"out-{approach}-{method}-{count}"
    shutil.rmtree(output_dir, ignore_errors=True)
    warm_up = {"base_model": str(workdir / "tiny0"), "models": [str(workdir / "tiny1"), str(workdir / "tiny2")],
               "method": method, "output_dir": str(workdir / f"warm-up-{approach}-{method}-{count}")}  # fmt: skip
    merge(warm_up, progress=False)
    naive_merge(warm_up | {"output_dir": warm_up["output_dir"] + "-naive", "parameters": {}}, get_method(method))
    config = {"base_model": str(workdir / "base"), "models": [str(workdir / f"ft{i}") for i in range(count)],
              "method": method, "parameters": METHOD_PARAMETERS[method], "output_dir": str(output_dir)}  # fmt: skip
    baseline_kb = status_kb("RssAnon")
    start = time.perf_counter()
    with AnonSampler() as sampler:
        if approach == "streaming":
            merge(config, progress=False)
        else:
            naive_merge(config, get_method(method))
    seconds = time.perf_counter() - start
    for folder in (output_dir, Path(warm_up["output_dir"]), Path(warm_up["output_dir"] + "-naive")):
        shutil.rmtree(folder, ignore_errors=True)
    return {"approach": approach, "method": method, "T": count, "seconds": seconds,
            "peak_rss_mb": status_kb("VmHWM") / 1024, "peak_anon_mb": sampler.peak_kb / 1024,
            "baseline_anon_mb": baseline_kb / 1024, "anon_above_baseline_mb": (sampler.peak_kb - baseline_kb) / 1024}  # fmt: skip


def naive_merge(config: dict, method) -> None:
    """Everything in memory at once: T + 1 materialised state dicts and the full merged state dict."""
    from safetensors.torch import load_file, save_file

    def load(folder: str) -> dict:
        return {name: tensor.clone() for name, tensor in load_file(Path(folder) / "model.safetensors").items()}

    base = load(config["base_model"])
    states = [load(folder) for folder in config["models"]]
    weights = [1.0] * len(states)
    merged = {name: method.function(tensor, [state[name] for state in states], weights, **method.resolve_parameters(
        config["parameters"])).to(tensor.dtype) for name, tensor in base.items()}  # fmt: skip
    Path(config["output_dir"]).mkdir(parents=True)
    save_file(merged, Path(config["output_dir"]) / "model.safetensors", metadata={"format": "pt"})


# ---- driver ----------------------------------------------------------------------------------------------------


def run_worker(workdir: Path, approach: str, method: str, count: int) -> dict:
    command = [sys.executable, __file__, "--worker", approach, method, str(count), "--workdir", str(workdir)]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(sizes: dict, rows: list[dict], counts: list[int], methods: list[str]) -> None:
    checkpoint_mb, largest_mb = sizes["checkpoint_bytes"] / MB, sizes["largest_tensor_bytes"] / MB
    print(f"\nViT-B/32 vision tower: {sizes['tensors']} tensors, checkpoint {checkpoint_mb:.0f} MB, "
          f"largest tensor {largest_mb:.1f} MB\n")  # fmt: skip
    header = (f"{'method':<16}{'T':>3}  {'approach':<10}{'wall s':>8}{'peak RSS MB':>13}{'peak anon MB':>14}"
              f"{'anon>base MB':>14}")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    by_key = {(row["method"], row["T"], row["approach"]): row for row in rows}
    for method in methods:
        for count in counts:
            for approach in ("streaming", "naive"):
                row = by_key[(method, count, approach)]
                print(f"{method:<16}{count:>3}  {approach:<10}{row['seconds']:>8.1f}{row['peak_rss_mb']:>13.0f}"
                      f"{row['peak_anon_mb']:>14.0f}{row['anon_above_baseline_mb']:>14.0f}")  # fmt: skip
    print("\nratios naive / streaming (anon above baseline, peak RSS, wall time):")
    for method in methods:
        for count in counts:
            stream, naive = by_key[(method, count, "streaming")], by_key[(method, count, "naive")]
            print(f"  {method:<16} T={count}: anon x{naive['anon_above_baseline_mb'] / stream['anon_above_baseline_mb']:.1f}"
                  f", RSS x{naive['peak_rss_mb'] / stream['peak_rss_mb']:.2f}, time x{naive['seconds'] / stream['seconds']:.2f}")  # fmt: skip
    print("\ntargets (streaming, allocated memory above the interpreter's baseline):")
    for method in methods:
        first, last = by_key[(method, counts[0], "streaming")], by_key[(method, counts[-1], "streaming")]
        ratio = last["anon_above_baseline_mb"] / checkpoint_mb
        line = f"  {method:<16} T={counts[-1]} peak {ratio:.2f}x checkpoint (target < 2x): {'OK' if ratio < 2 else 'MISSED'}"
        if counts[-1] > counts[0]:
            growth = (last["anon_above_baseline_mb"] - first["anon_above_baseline_mb"]) / (counts[-1] - counts[0])
            line += (f"; growth per added input {growth:+.1f} MB (target <= largest tensor, {largest_mb:.1f} MB): "
                     f"{'OK' if growth <= largest_mb else 'MISSED'}")  # fmt: skip
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Where to write checkpoints (default: a temp dir).")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"], choices=sorted(METHOD_PARAMETERS))
    parser.add_argument("--keep", action="store_true", help="Keep the generated checkpoints.")
    parser.add_argument("--worker", nargs=3, metavar=("APPROACH", "METHOD", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        approach, method, count = args.worker
        print(json.dumps(measure(args.workdir, approach, method, int(count))))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="saft_hf-merge-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"writing a ViT-B/32 base and {max(args.counts)} fine-tunes to {workdir} ...", flush=True)
        sizes = write_inputs(workdir, max(args.counts))
        rows = []
        for method in args.methods:
            for count in args.counts:
                for approach in ("streaming", "naive"):
                    rows.append(run_worker(workdir, approach, method, count))
                    row = rows[-1]
                    print(f"  {method} T={count} {approach}: {row['seconds']:.1f} s, "
                          f"anon +{row['anon_above_baseline_mb']:.0f} MB", flush=True)  # fmt: skip
        report(sizes, rows, args.counts, args.methods)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
