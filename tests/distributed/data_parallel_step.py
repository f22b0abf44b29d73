"""Run with `torchrun --nproc_per_node 2` (gloo, CPU): a SAFTTrainer step under DDP and FSDP2 equals its
single-process reference.

One optimizer step of a tiny T5 with gradient accumulation 2 (so the ascent pass's `no_sync` meets both the
Trainer's `no_sync` micro-batch and its synchronising one) in three set-ups:

- DDP, `sam_sync_perturbation=False` (per-device, m-sharpness): rank r's perturbation for micro-batch k comes from
  the gradient of its own micro-batch `B[r][k]` alone;
- DDP, `sam_sync_perturbation=True`: it comes from the mean over ranks of the gradients of `B[0][k], B[1][k]`;
- FSDP2 over both processes, loaded with `from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))`
  (Accelerate 1.15 only selects its own FSDP on GPU-like devices, never for MULTI_CPU): the reduce-scattered
  gradient is the mean over ranks, so the perturbation is the synced one;

then the descent gradients at `w + e` are summed over k, averaged over ranks, clipped, and AdamW steps. The
reference is computed by hand in every process from the micro-batches all ranks actually saw, and the step must be
far from the other perturbation's reference.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sam_reference import reference_data_parallel_step  # noqa: E402
from test_trainer import ADAM, LR, reference_adam, t5_samples, tiny_t5  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

from saft_hf import SAFTConfig, SAFTTrainer  # noqa: E402

RHO = 0.5
ACCUMULATION = 2


class BatchRecordingTrainer(SAFTTrainer):
    """Keeps every micro-batch this process trained on."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches = getattr(self, "micro_batches", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


def gather_micro_batches(trainer) -> list[list[dict]]:
    """`batches[r][k]`: micro-batch k of rank r, on every rank."""
    batches: list = [None] * dist.get_world_size()
    dist.all_gather_object(batches, trainer.micro_batches)
    assert not torch.equal(batches[0][0]["input_ids"], batches[1][0]["input_ids"]), "ranks must see different data"
    return batches


def full_parameters(model) -> list[torch.Tensor]:
    return [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]


def max_difference(model, reference) -> float:
    pairs = zip(full_parameters(model), reference.parameters(), strict=True)
    return max((p - q).abs().max().item() for p, q in pairs)


def sharded_at_load_time(model):
    """`model` saved and loaded back with FSDP2 over both processes by `from_pretrained(distributed_config=...)`:
    Accelerate does not wrap it again and the Trainer leaves the gradient reduction to FSDP."""
    folder = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder)
    if dist.get_rank() == 0:
        model.save_pretrained(folder[0])
    dist.barrier()
    return type(model).from_pretrained(folder[0], distributed_config=DistributedConfig(fsdp_size=2))


# name: (sam_sync_perturbation, FSDP2, which reference the step must equal: synced or per-device perturbation)
CONFIGURATIONS = {
    "DDP per-device": (False, False, False),
    "DDP synced": (True, False, True),
    "FSDP2": (False, True, True),
}


def config(synced: bool, sync_each_batch: bool) -> SAFTConfig:
    return SAFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=ACCUMULATION,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        sam_rho=RHO,
        sam_sync_perturbation=synced,
        logging_steps=1,
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": sync_each_batch}},
        **ADAM,
    )


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    for name, (synced, fsdp, expected_synced) in CONFIGURATIONS.items():
        initial = tiny_t5()
        model = sharded_at_load_time(initial) if fsdp else copy.deepcopy(initial)
        if fsdp:
            try:
                SAFTTrainer(model=model, args=config(synced, sync_each_batch=False))
                raise AssertionError("FSDP2 with accumulation and no sync_each_batch must be refused")
            except ValueError as error:
                assert "sync_each_batch" in str(error), error
        # FSDP gradients must be reduce-scattered after every micro-batch, so the accumulated one sits in `.grad`.
        args = config(synced, sync_each_batch=fsdp)
        trainer = BatchRecordingTrainer(model=model, args=args, train_dataset=t5_samples(16))
        assert trainer.accelerator.distributed_type == DistributedType.MULTI_CPU, trainer.accelerator.distributed_type
        assert trainer.accelerator.num_processes == 2
        trainer.train()
        wrapper = FSDPModule if fsdp else torch.nn.parallel.DistributedDataParallel
        assert isinstance(trainer.model_wrapped, wrapper), type(trainer.model_wrapped)

        batches = gather_micro_batches(trainer)
        references = {}
        for reference_synced in (False, True):
            references[reference_synced] = copy.deepcopy(initial)
            reference_data_parallel_step(
                references[reference_synced], batches, reference_adam(trainer), synced=reference_synced, rho=RHO
            )
        matching = max_difference(model, references[expected_synced])
        other = max_difference(model, references[not expected_synced])
        assert matching < 1e-6, f"{name}: {matching} from its reference"
        assert other > 1e-5, f"{name} is indistinguishable from the other perturbation ({other})"
        assert max_difference(model, initial) > 1e-4
        skipped = [entry["sam/skipped"] for entry in trainer.state.log_history if "loss" in entry]
        assert skipped == [0.0], skipped
        results[name] = f"{matching:.1e} from its reference, {other:.1e} from the other"
    if dist.get_rank() == 0:
        print(f"DATA PARALLEL OK {results}")
    dist.barrier()  # no rank tears the gloo connections down while another still has a collective in flight
    dist.destroy_process_group()
    # Interpreter finalization can still abort in gloo's worker threads (pytorch/pytorch#179291: SIGABRT, "terminate
    # called without an active exception", about 1 run in 8 on a loaded 2-core machine) after every check passed.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
