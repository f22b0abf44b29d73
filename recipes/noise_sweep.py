"""Merge gain against the effective noise scale (the optimizer-implicit-bias paper, Fig. 1c, 6 and 8).

For every setting of a grid over learning rate x batch size x weight decay, fine-tune from one common pre-trained
model (as `recipes/finetune.py` does, logging `noise/effective_scale = lr / (B (1 - beta1)^2)`), then measure the
gains of linear interpolation between two data orders of `interpolation_task` and of task arithmetic over
`arithmetic_tasks` (saft_hf.experiments.noise_sweep describes both and the outputs). Weight decay does not enter the
proxy: the paper's point is that it raises the effective learning rate of scale-invariant networks, so the figures
draw one line per batch size and weight decay, along which the learning rate varies.

Offline demo (tiny CLIP built from a config, real handwritten digits, CPU, a few minutes):

    python recipes/noise_sweep.py --config recipes/configs/noise_sweep_demo.yaml

GPU machine with Hub access (CLIP ViT-B/32 on RESISC45 and EuroSAT):

    python recipes/noise_sweep.py --config recipes/configs/noise_sweep_clip_vit_b32.yaml

`--config FILE.yaml` supplies any field of `NoiseSweepArguments`; flags override it. Its `finetune_configs` are
`recipes/finetune.py` config files (relative paths are relative to the sweep config file), layered in order; the
sweep adds `--task`, `--seed`, `--learning_rate`, `--per_device_train_batch_size`, `--weight_decay`, `--data_seed`
and `--output_dir` for each run (and `--tiny_model_seed` when the configs build a tiny model). The batch size of
the grid is the number of samples per optimizer step (what the noise scale counts), split over gradient accumulation
and processes.

`seeds` repeats the sweep; each setting's gains are reported over them as the multi-seed study reports its merges
(mean, 95% Student t interval, seeds won). Outputs in `output_dir`: `runs/<setting>/seed<s>/<task>_data<d>/` (the
fine-tunes), the table `merge_gain_vs_noise.{csv,json}`, its figures, `interpolation_curves.png` and
`noise_sweep_config.yaml` (the resolved arguments; `--config` it to run the sweep again). Resumable: finished runs of
the same configuration are reused.
"""

import logging
import sys
from typing import Any

from saft_hf.entrypoint import run_main
from saft_hf.experiments.noise_sweep import format_table, parse_noise_sweep_args, run_noise_sweep


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_noise_sweep_args(argv, description=__doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    result = run_noise_sweep(args)
    if result["rows"]:  # the main process
        print(format_table(result["rows"]))
        print(
            f"[noise_sweep] trained {len(result['trained'])} run(s), "
            f"reused {len(result['runs']) - len(result['trained'])}."
        )
        for path in result["files"]:
            print(f"[noise_sweep] wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="noise_sweep.py"))
