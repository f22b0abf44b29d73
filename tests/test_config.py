import pytest

from saft_hf import SAFTConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sam_mode": "adam"}, "sam_mode"),
        ({"sam_rho": -0.1}, "sam_rho"),
        ({"sam_rho": float("nan")}, "sam_rho"),
        ({"sam_rho": float("inf")}, "sam_rho"),
        ({"sam_eta": -1e-3}, "sam_eta"),
        ({"sam_eta": float("nan")}, "sam_eta"),
        ({"sam_interval": 0}, "sam_interval"),
        ({"sam_interval": 2.5}, "sam_interval"),
        ({"sam_interval": True}, "sam_interval"),
        ({"sam_adaptive_scope": "biases"}, "sam_adaptive_scope"),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        SAFTConfig(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize(("mode", "rho"), [("asam", 0.5), ("sam", 0.05), ("none", 0.0)])
def test_rho_defaults_per_mode(tmp_path, mode, rho):
    assert SAFTConfig(output_dir=str(tmp_path), sam_mode=mode).sam_rho == rho


def test_explicit_rho_is_kept(tmp_path):
    assert SAFTConfig(output_dir=str(tmp_path), sam_mode="sam", sam_rho=0.2).sam_rho == 0.2
