"""Merge fine-tuned models into one, as a YAML recipe describes (method, coefficients, inputs, output).

Run:

    python recipes/merge.py --config recipes/configs/merge_clip_vit_b32_ties.yaml
    python recipes/merge.py --config my_recipe.yaml --output_dir merged/my-model --push_to_hub my-org/my-model

The recipe format is documented in `saft_hf/merging/config.py`; the merged folder holds the weights, the base's
config and processor files, the recipe as run (`merge_config.yaml`, Hub revisions pinned) and a model card.
"""

import sys
from dataclasses import dataclass, field

from saft_hf.cli import run_merge
from saft_hf.entrypoint import run_main
from saft_hf.parser import SaftParser


@dataclass
class MergeArguments:
    config: str = field(metadata={"help": "Path to the merge recipe (YAML)."})
    output_dir: str | None = field(default=None, metadata={"help": "Overrides the recipe's output_dir."})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Upload the result to this Hub repo.", "metavar": "REPO"}
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})


def main(argv=None):
    # The merge recipe is this command's --config: its fields are the merge's, not this parser's.
    args, _ = SaftParser(MergeArguments, config_option=False, description=__doc__).parse_args_and_config(argv)
    output_dir = run_merge(args.config, output_dir=args.output_dir, push_to_hub=args.push_to_hub, private=args.private)
    print(f"Merged model written to {output_dir}")


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="merge.py"))
