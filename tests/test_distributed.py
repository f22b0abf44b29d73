"""Two processes under `torchrun --nproc_per_node 2` (gloo, CPU), which Accelerate sees as MULTI_CPU.

`accelerate launch --cpu --num_processes 2` would start a single process, so torchrun it is. Each script checks its
own results in every rank against a single-process reference computed in the same run and prints a line on success.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "distributed"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "success"),
    [
        ("data_parallel_step.py", "DATA PARALLEL OK"),  # DDP per-device, DDP synced, FSDP2 trainer steps
        ("fsdp_sharpness.py", "FSDP2 sharpness OK"),  # sharded global norm and perturbation
    ],
)
def test_two_processes(script, success):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command.append(str(SCRIPTS / script))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and success in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]
