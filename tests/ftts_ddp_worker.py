"""Run by `torchrun --nproc_per_node 2` from test_modes.py: two SAFT steps of an FTTS tiny T5 under DDP (gloo).

Each rank trains on its own, distinct rows and writes its final linearised weights `w`, its first loss and whether
`w0` is intact to `<output_dir>/rank<r>.pt`.
"""

import os
import sys

import torch
from datasets import Dataset

from saft_hf import SAFTConfig, SAFTTrainer
from saft_hf.modes import apply_finetune_mode
from saft_hf.testing import build_tiny_t5


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    model, _ = build_tiny_t5(seed=0)
    pretrained = {name: p.detach().clone() for name, p in model.named_parameters()}
    linearized = apply_finetune_mode(model, "ftts")
    generator = torch.Generator().manual_seed(0)
    rows = 16
    input_ids = torch.randint(3, model.config.vocab_size, (rows, 5), generator=generator)
    labels = torch.randint(3, model.config.vocab_size, (rows, 2), generator=generator)
    labels[:, -1] = model.config.eos_token_id
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()}).with_format("torch")
    args = SAFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        sam_mode="asam",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SAFTTrainer(model=linearized, args=args, train_dataset=dataset)
    first_loss = {}

    def record_first_loss(module, inputs, output):
        first_loss.setdefault("loss", output.loss.item())

    handle = linearized.register_forward_hook(record_first_loss)
    trainer.train()
    handle.remove()
    torch.save(
        {
            "distributed_type": trainer.accelerator.distributed_type.value,
            "weights": {name: p.detach().clone() for name, p in linearized.model.named_parameters()},
            "base_weights_intact": all(torch.equal(linearized.base_weights[name], p) for name, p in pretrained.items()),
            "first_loss": first_loss["loss"],
            "ignored_by_ddp": sorted(getattr(trainer.model_wrapped, "parameters_to_ignore", [])),
        },
        os.path.join(output_dir, f"rank{os.environ['RANK']}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
