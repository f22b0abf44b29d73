"""benchmarks/gpu_check.py on CPU: the checks that apply there run, pass, and fail loudly when the step is wrong."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

import saft_hf.trainer  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones (the suite shares 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_checks_pass_and_print_one_summary(capsys):
    assert gpu_check.main(["--device", "cpu", "--models"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("summary (cpu):") :]
    assert "fp32 step = hand-computed  PASS" in summary
    assert "bf16 autocast step         PASS" in summary
    assert "fp16 GradScaler step       n/a" in summary
    assert summary.rstrip().endswith("all checks passed")


def test_weights_left_perturbed_fail_the_run(capsys, monkeypatch):
    monkeypatch.setattr(saft_hf.trainer, "restore_weights_", lambda weights, saved: None)
    assert gpu_check.main(["--device", "cpu", "--models"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: fp32 step = hand-computed, bf16 autocast step" in out
    assert "weights before each optimizer step equal those at its start: [False, True]" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_requested_without_a_gpu_fails():
    with pytest.raises(SystemExit, match="torch.cuda.is_available"):
        gpu_check.main([])
