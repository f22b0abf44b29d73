"""Merge fine-tuned models into one, as a YAML recipe describes (method, coefficients, inputs, output).

Run:

    python recipes/merge.py --config recipes/configs/merge_clip_vit_b32_ties.yaml
    python recipes/merge.py --config my_recipe.yaml --output_dir merged/my-model --push_to_hub my-org/my-model

The recipe format is documented in `saft_hf/merging/config.py`; the merged folder holds the weights, the base's
config and processor files, the recipe as run (`merge_config.yaml`, Hub revisions pinned) and a model card.
"""

import argparse
import sys

from saft_hf.cli import run_merge
from saft_hf.entrypoint import run_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Merge fine-tuned models with a YAML recipe.")
    parser.add_argument("--config", required=True, help="Path to the merge recipe (YAML).")
    parser.add_argument("--output_dir", default=None, help="Overrides the recipe's output_dir.")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO", help="Upload the result to this Hub repo.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    output_dir = run_merge(args.config, output_dir=args.output_dir, push_to_hub=args.push_to_hub, private=args.private)
    print(f"Merged model written to {output_dir}")


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="merge.py"))
