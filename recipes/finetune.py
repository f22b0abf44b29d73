"""Fine-tune one model on one task with SAFT (sharpness-aware fine-tuning) or plain fine-tuning, in any fine-tuning
mode: `full`, `ftlo` (attention projections only), `ftts` (linearised model) or `lora` (PEFT).

Launch (GPU machine with Hub access):

    accelerate launch recipes/finetune.py --config recipes/configs/clip_vit_b32.yaml --task eurosat \\
        --finetune_mode ftlo --sam_mode asam
    accelerate launch --config_file recipes/accelerate/multi_gpu_ddp.yaml recipes/finetune.py \\
        --config recipes/configs/flan_t5_base.yaml --task sst2 --sam_mode none
    accelerate launch recipes/finetune.py --config recipes/configs/clip_vit_b16.yaml \\
        --config recipes/configs/lora.yaml --task dtd

Several `--config` files apply in order (later files override earlier ones); `lora.yaml` holds the LoRA settings.

Offline demo (tiny CLIP built from a config, real handwritten digits, CPU, about a minute):

    python recipes/finetune.py --config recipes/configs/demo.yaml

Every field of `ModelArguments`, `DataArguments` (saft_hf.finetuning) and `SAFTConfig` (which includes all of
`TrainingArguments`) is a command-line flag. `--config FILE.yaml` supplies values for any of them; flags given on the
command line override the file (saft_hf.parser.SaftParser). What the run writes to `output_dir` is described in
saft_hf.finetuning.training: the fine-tuned model, `finetune_config.yaml` (the resolved configuration), the
Trainer's state and the validation and test results. `ftts` Flan-T5 fine-tunes generate with their linearised
forward, so they are scored and checkpoint-selected like the others.

Everything is checked before anything is written: the fields, the task and the mode, `output_dir`'s placeholders,
`resume_from_checkpoint` (a folder holding `trainer_state.json` and readable weights), and `output_dir` itself: a
folder that already holds a run (`finetune_config.yaml`, `checkpoint-*` folders or model weights) is refused unless
the run resumes from one of its checkpoints, so a new run cannot overwrite a finished one. A user error prints one
line, `finetune.py: error: ...`, and exits with status 1; `SAFT_HF_DEBUG=1` shows its traceback (`--debug` is the
Trainer's own option here).

With `load_best_model_at_end`, the checkpoint kept is the best on the validation split by `metric_for_best_model`;
`accuracy` is the generation accuracy for text tasks (`saft_hf.evaluation.GenerativeEvaluationMixin`).
"""

import sys

from saft_hf.entrypoint import run_main
from saft_hf.finetuning import run

if __name__ == "__main__":
    # --debug is the Trainer's option (TrainingArguments.debug): only SAFT_HF_DEBUG=1 shows a user error's traceback.
    sys.exit(run_main(run, sys.argv[1:], prog="finetune.py", debug_flag=None))
