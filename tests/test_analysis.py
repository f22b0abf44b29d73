"""saft_hf.analysis: every quantity on a case whose answer is known in closed form or by hand."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from recipe_loader import import_recipe
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from saft_hf.analysis import (
    NOISE_SCALE_LOG_KEY,
    AnalysisTask,
    EffectiveNoiseScaleCallback,
    GridResult,
    add_noise_scale_logging,
    block_names,
    classification_task,
    coefficient_grid,
    combine,
    cross_task_linearity,
    disentanglement_error,
    effective_noise_scale,
    hessian_eigenvalues_along_line,
    joint_loss_landscape,
    linear_interpolation,
    logged_noise_scale,
    loss_barrier,
    mean_loss,
    optimizer_momentum,
    plot_grid,
    plot_hessian_eigenvalues,
    plot_linearity,
    plot_loss_barrier,
    plot_merge_gain_vs_noise,
    plots,
    predictions,
    task_arithmetic_gain,
    text_to_text_task,
)
from saft_hf.analysis.suite import ANALYSES, AnalysisArguments
from saft_hf.analysis.weights import align_to_model
from saft_hf.parser import SaftParser

GRID = coefficient_grid()


def batches_of(*batches: dict) -> callable:
    return lambda: iter(batches)


def scalar(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


# ---- small models with known answers ---------------------------------------------------------------------------


class ThresholdClassifier(nn.Module):
    """Class 1 iff ``w * x > 2.5``: a one-parameter classifier whose predictions are easy to work out by hand."""

    def __init__(self, w: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        score = self.w * x - 2.5
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(score), score], dim=-1))


def threshold_task(name: str, model: nn.Module, labels=(0, 0, 1, 1)) -> AnalysisTask:
    batch = {"x": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), "labels": torch.tensor(labels)}
    return classification_task(name, model, batches_of(batch))


class LinearClassifier(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.linear(x))


class QuadraticModel(nn.Module):
    """Per-example loss ``0.5 sum_k a_k (w_k - c_k)^2`` for a target ``c`` given by the batch."""

    def __init__(self, w: torch.Tensor, curvature: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.register_buffer("curvature", curvature)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.w - c) ** 2 * self.curvature).sum(dim=-1)


def loss_task(name: str, model: nn.Module, *batches: dict) -> AnalysisTask:
    return AnalysisTask(
        name=name,
        model=model,
        batches=batches_of(*batches),
        forward=lambda m, b: m(**b),
        loss=lambda m, b: m(**b),
        predict=lambda m, b: m(**b),
    )


# ---- weight-space primitives -----------------------------------------------------------------------------------


def test_combine_is_origin_plus_weighted_directions_and_names_offending_tensors():
    origin = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    directions = [{"a": torch.tensor([1.0, 1.0])}, {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([1.0])}]
    result = combine(origin, directions, [2.0, -0.5])
    assert torch.equal(result["a"], torch.tensor([3.0, 3.0])) and torch.equal(result["b"], torch.tensor([2.5]))
    with pytest.raises(ValueError, match="'c'"):
        combine(origin, [{"c": torch.tensor([1.0])}], [1.0])
    with pytest.raises(ValueError, match=r"'a' has shape \[3\]"):
        combine(origin, [{"a": torch.zeros(3)}], [1.0])


def test_align_to_model_infers_the_checkpoint_prefix_and_rejects_unknown_tensors():
    model = nn.Sequential(nn.Linear(2, 2))
    prefixed = {"model.0.weight": torch.ones(2, 2), "model.0.bias": torch.zeros(2)}
    aligned = align_to_model(prefixed, model, label="vector.safetensors")
    assert set(aligned) == {"0.weight", "0.bias"} and aligned["0.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="vector.safetensors: tensor 'head.weight'"):
        align_to_model({"0.weight": torch.ones(2, 2), "head.weight": torch.ones(1)}, model, label="vector.safetensors")


def test_analyses_name_a_task_vector_tensor_the_model_lacks():
    model = ThresholdClassifier()
    tasks = [threshold_task("a", model), threshold_task("b", model)]
    with pytest.raises(ValueError, match="Task 'a': its model has no tensor 'v'"):
        disentanglement_error(tasks, [{"v": torch.tensor(1.0)}] * 2, alphas=(0.0, 1.0))


# ---- weight disentanglement -------------------------------------------------------------------------------------


def _threshold_predictions(w: float) -> np.ndarray:
    return np.array([w * x > 2.5 for x in (1.0, 2.0, 3.0, 4.0)])


def _reference_xi(a1: float, a2: float, tau: float, others: float = 0.0) -> float:
    """Eq. 9 worked out directly for the threshold classifier with identical task vectors ``tau``."""
    merged = _threshold_predictions(1.0 + (a1 + a2) * tau + others)
    return sum(float(np.mean(merged != _threshold_predictions(1.0 + a * tau))) for a in (a1, a2))


@pytest.mark.parametrize(
    ("a1", "a2", "expected"),
    [
        (0.0, 0.0, 0.0),  # merged = both single models = theta_0
        (-0.5, -0.5, 0.0),  # w 2.0 vs 1.5: the same three digits above threshold
        (-0.5, 0.0, 0.25),  # task 2's single model (w 1) misses x = 2, which the merge (w 1.5) predicts
        (0.0, 0.5, 0.5),  # merge w 0.5 predicts nothing; task 1's single model (w 1) predicts x = 3, 4
        (0.5, -0.5, 0.75),  # merge w 1: task 1 (w 0.5) differs on x = 3, 4; task 2 (w 1.5) on x = 2
    ],
)
def test_xi_for_identical_task_vectors_matches_hand_computation(a1, a2, expected):
    model = ThresholdClassifier()
    tau = {"w": torch.tensor(-1.0, dtype=torch.float64)}
    result = disentanglement_error([threshold_task("t1", model), threshold_task("t2", model)], [tau, tau])
    assert result.quantity == "xi" and result.alphas == GRID
    assert result.value_at(a1, a2) == pytest.approx(expected, abs=1e-12)


def test_xi_over_the_whole_grid_equals_the_direct_evaluation_and_xi_all_adds_the_other_vectors():
    model = ThresholdClassifier()
    tau = {"w": torch.tensor(-1.0, dtype=torch.float64)}
    tasks = [threshold_task("t1", model), threshold_task("t2", model)]
    xi = disentanglement_error(tasks, [tau, tau])
    expected = np.array([[_reference_xi(a1, a2, -1.0) for a2 in GRID] for a1 in GRID])
    np.testing.assert_allclose(xi.values, expected, atol=1e-12)
    np.testing.assert_allclose(xi.components["t1"] + xi.components["t2"], xi.values)

    xi_all = disentanglement_error(tasks, [tau, tau, tau])  # the third vector enters the merge at 0.3
    assert xi_all.quantity == "xi_all" and xi_all.metadata["other_alpha"] == 0.3
    # At (0, 0): merge w 0.7 predicts only x = 4, theta_0 (w 1) predicts x = 3, 4: 1/4 per task.
    assert xi_all.value_at(0.0, 0.0) == pytest.approx(0.5)
    expected_all = np.array([[_reference_xi(a1, a2, -1.0, others=-0.3) for a2 in GRID] for a1 in GRID])
    np.testing.assert_allclose(xi_all.values, expected_all, atol=1e-12)


def test_task_vectors_acting_on_disjoint_inputs_of_a_linear_model_are_perfectly_disentangled():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    model = LinearClassifier(weight)
    # Task 1 lives on input features 0-1, task 2 on 2-3; feature 4 is used by neither.
    x1 = torch.zeros(16, 5, dtype=torch.float64)
    x1[:, :2] = torch.randn(16, 2, generator=generator, dtype=torch.float64)
    x2 = torch.zeros(16, 5, dtype=torch.float64)
    x2[:, 2:4] = torch.randn(16, 2, generator=generator, dtype=torch.float64)

    def vector_on(columns: slice) -> dict:
        tau = torch.zeros(3, 5, dtype=torch.float64)
        tau[:, columns] = 3 * torch.randn(3, tau[:, columns].shape[1], generator=generator, dtype=torch.float64)
        return {"linear.weight": tau}

    tau1, tau2, tau3 = vector_on(slice(0, 2)), vector_on(slice(2, 4)), vector_on(slice(4, 5))
    tasks = [
        classification_task("t1", model, batches_of({"x": x1, "labels": torch.zeros(16, dtype=torch.long)})),
        classification_task("t2", model, batches_of({"x": x2, "labels": torch.zeros(16, dtype=torch.long)})),
    ]
    assert np.all(disentanglement_error(tasks, [tau1, tau2]).values == 0)
    assert np.all(disentanglement_error(tasks, [tau1, tau2, tau3]).values == 0)
    # The same vectors on shared inputs interfere: the error is not zero everywhere (the test can fail).
    shared = [vector_on(slice(0, 2)), vector_on(slice(0, 2))]
    assert disentanglement_error(tasks, shared).values.max() > 0


# ---- cross-task linearity ---------------------------------------------------------------------------------------


class AffineInWeights(nn.Module):
    """Two stacked linear layers; the task vectors move the first layer and the second bias only, so every layer
    output is affine in the moved weights."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4, dtype=torch.float64)
        self.second = nn.Linear(4, 2, dtype=torch.float64)

    def forward(self, x):
        return self.second(self.first(x))


class SquaredWeight(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x):
        return self.w**2 * x


class Block(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _features_task(name, model, x):
    return loss_task(name, model, {"x": x})


def test_linearity_is_zero_at_every_layer_when_features_are_affine_in_the_weights():
    torch.manual_seed(0)
    model = AffineInWeights()
    generator = torch.Generator().manual_seed(1)

    def vector():
        return {
            "first.weight": torch.randn(4, 3, generator=generator, dtype=torch.float64),
            "first.bias": torch.randn(4, generator=generator, dtype=torch.float64),
            "second.bias": torch.randn(2, generator=generator, dtype=torch.float64),
        }

    xs = [torch.randn(8, 3, generator=generator, dtype=torch.float64) for _ in range(2)]
    tasks = [_features_task("s", model, xs[0]), _features_task("t", model, xs[1])]
    result = cross_task_linearity(tasks, [vector(), vector()], layers=["first", "second"])
    assert result.x == ("first", "second")
    assert np.abs(result.series["ctl"]).max() < 1e-12
    assert result.metadata["examples"] == {"s": 8, "t": 8}


def test_linearity_of_a_squared_weight_matches_the_hand_computation():
    # f(x; w) = w^2 * x with w0 = (1, 0), tau_s = (1, 0), tau_t = (0, 1), lam = 0.5, x = (1, 1):
    # merged w (1.5, 0.5) -> (2.25, 0.25); single s w (2, 0) -> (4, 0); single t w (1, 1) -> (1, 1); mean (2.5, 0.5).
    model = Block(SquaredWeight([1.0, 0.0]))
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    tau_s = {"inner.w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    tau_t = {"inner.w": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    result = cross_task_linearity([_features_task("s", model, x)], [tau_s, tau_t], layers=["inner"], lam=0.5)
    expected = 1 - (2.25 * 2.5 + 0.25 * 0.5) / math.sqrt((2.25**2 + 0.25**2) * (2.5**2 + 0.5**2))
    assert result.series["ctl"][0] == pytest.approx(expected, rel=1e-12)
    assert result.series["ctl[s]"][0] == pytest.approx(expected, rel=1e-12)


def test_linearity_of_a_tanh_mlp_equals_a_computation_with_loaded_copies():
    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(3, 5, dtype=torch.float64), nn.Linear(5, 2, dtype=torch.float64)])

        def forward(self, x):
            return self.layers[1](torch.tanh(self.layers[0](x)))

    model = MLP()
    generator = torch.Generator().manual_seed(2)
    taus = [
        {name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in model.named_parameters()}
        for _ in range(2)
    ]
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    assert block_names(model) == ["layers.0", "layers.1"]
    result = cross_task_linearity([_features_task("s", model, x)], taus)  # default layers: the blocks, lam 0.3

    def layer_outputs(offsets: list[tuple[dict, float]]):
        copy = MLP()
        state = {name: p.detach().clone() for name, p in model.named_parameters()}
        for tau, scale in offsets:
            state = {name: value + scale * tau[name] for name, value in state.items()}
        copy.load_state_dict(state)
        first = copy.layers[0](x)
        return [first, copy.layers[1](torch.tanh(first))]

    merged = layer_outputs([(taus[0], 0.3), (taus[1], 0.3)])
    single_s, single_t = layer_outputs([(taus[0], 0.6)]), layer_outputs([(taus[1], 0.6)])
    for k in range(2):
        cosine = F.cosine_similarity(merged[k], 0.5 * single_s[k] + 0.5 * single_t[k], dim=1)
        assert result.series["ctl"][k] == pytest.approx((1 - cosine).mean().item(), rel=1e-9)
    assert result.series["ctl"][1] > 1e-6  # the tanh block is not linear in its weights


def test_block_names_finds_transformer_blocks_of_t5():
    from transformers import T5ForConditionalGeneration

    from saft_hf.testing import tiny_t5_config

    model = T5ForConditionalGeneration(tiny_t5_config(vocab_size=64))
    assert block_names(model) == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    with pytest.raises(ValueError, match="pass the layer names"):
        block_names(nn.Linear(2, 2))


# ---- loss landscape, barrier, interpolation --------------------------------------------------------------------

CURVATURE = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)


def _quadratic_setup():
    generator = torch.Generator().manual_seed(3)
    model = QuadraticModel(torch.randn(3, generator=generator, dtype=torch.float64), CURVATURE)
    targets = [torch.randn(5, 3, generator=generator, dtype=torch.float64) + shift for shift in (1.0, -1.0)]
    taus = [{"w": torch.randn(3, generator=generator, dtype=torch.float64)} for _ in range(3)]
    tasks = [loss_task(f"t{k}", model, {"c": targets[k][:2]}, {"c": targets[k][2:]}) for k in range(2)]
    return model, targets, taus, tasks


def _closed_form_loss(w: np.ndarray, targets: torch.Tensor) -> np.ndarray:
    """Mean of 0.5 sum_k a_k (w_k - c_k)^2 over the targets = 0.5 sum_k a_k ((w_k - mean_k)^2 + var_k)."""
    c = targets.numpy()
    return 0.5 * (((w - c.mean(0)) ** 2 + c.var(0)) * CURVATURE.numpy()).sum(-1)


def test_joint_loss_landscape_of_quadratic_losses_equals_the_closed_form_on_the_grid():
    model, targets, taus, tasks = _quadratic_setup()
    w0 = model.w.detach().numpy()
    a1, a2 = np.meshgrid(np.array(GRID), np.array(GRID), indexing="ij")
    t1, t2 = (tau["w"].numpy() for tau in taus[:2])
    w = w0 + a1[..., None] * t1 + a2[..., None] * t2
    expected = _closed_form_loss(w, targets[0]) + _closed_form_loss(w, targets[1])
    result = joint_loss_landscape(tasks, taus[:2])
    assert result.values.shape == (21, 21) and result.quantity == "joint_loss"
    np.testing.assert_allclose(result.values, expected, rtol=1e-12)
    # With a third task vector fixed at 0.3 (the eight-task setting of Fig. 5).
    with_other = joint_loss_landscape(tasks, taus)
    w_all = w + 0.3 * taus[2]["w"].numpy()
    expected_all = _closed_form_loss(w_all, targets[0]) + _closed_form_loss(w_all, targets[1])
    np.testing.assert_allclose(with_other.values, expected_all, rtol=1e-12)


def test_loss_barrier_of_a_convex_quadratic_is_zero_and_the_excess_is_the_closed_form():
    model, targets, taus, tasks = _quadratic_setup()
    start = {"w": model.w.detach() + taus[0]["w"]}
    end = {"w": model.w.detach() + taus[1]["w"]}
    result = loss_barrier(tasks[0], start, end)
    gammas = np.array(result.x)
    d = (end["w"] - start["w"]).numpy()
    # Along a line a quadratic loss lies below its chord by 0.5 g (1 - g) d^T A d.
    expected = -0.5 * gammas * (1 - gammas) * (d**2 * CURVATURE.numpy()).sum()
    np.testing.assert_allclose(result.series["excess"], expected, atol=1e-12)
    assert result.summary["barrier"] == pytest.approx(0.0, abs=1e-12)
    assert np.all(result.series["excess"] <= 1e-12)


def test_loss_barrier_of_a_double_well_is_the_bump_between_the_minima():
    class DoubleWell(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

        def forward(self, c):
            return (self.w**2 - 1) ** 2 + 0 * c

    task = loss_task("well", DoubleWell(), {"c": torch.zeros(3, dtype=torch.float64)})
    result = loss_barrier(task, {"w": scalar(-1.0)}, {"w": scalar(1.0)})
    # L(g) = ((2g - 1)^2 - 1)^2: 0 at both ends, 1 at g = 0.5.
    assert result.summary["barrier"] == pytest.approx(1.0)
    np.testing.assert_allclose(result.series["loss"], [((2 * g - 1) ** 2 - 1) ** 2 for g in result.x], atol=1e-12)


def test_linear_interpolation_gain_matches_hand_computation():
    # Targets: x = 3, 4 are class 1 (w = 1 is right). Model A (w 0.5) predicts no 1s: accuracy 0.5; model B (w 2)
    # predicts x = 2, 3, 4: 0.75; their midpoint w 1.25 predicts x = 3, 4: 1.0. Gain = 1.0 - (0.5 + 0.75) / 2.
    task = threshold_task("t", ThresholdClassifier())
    result = linear_interpolation(task, {"w": scalar(0.5)}, {"w": scalar(2.0)})
    assert result.summary["accuracy_single_a"] == 0.5 and result.summary["accuracy_single_b"] == 0.75
    assert result.summary["accuracy_merged"] == 1.0
    assert result.summary["accuracy_gain"] == pytest.approx(0.375)
    assert 0.5 in result.x and result.series["loss"].shape == (len(result.x),)


def test_task_arithmetic_gain_matches_hand_computation():
    # Task 1 wants x >= 2 (w 1.5 = theta_0 + 0.5), task 2 wants x = 4 only (w 0.7 = theta_0 - 0.3). Each own
    # model is exact; the merge w 1.2 predicts x = 3, 4: accuracy 0.75 on both, a gain of -0.25 each.
    model = ThresholdClassifier()
    tasks = [threshold_task("t1", model, labels=(0, 1, 1, 1)), threshold_task("t2", model, labels=(0, 0, 0, 1))]
    taus = [{"w": scalar(0.5)}, {"w": scalar(-0.3)}]
    result = task_arithmetic_gain(tasks, taus, alpha=1.0)
    np.testing.assert_allclose(result.series["accuracy_single"], [1.0, 1.0])
    np.testing.assert_allclose(result.series["accuracy_merged"], [0.75, 0.75])
    assert result.summary["mean_gain"] == pytest.approx(-0.25)


# ---- effective noise scale ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lr", "batch", "momentum", "trace", "expected"),
    [
        (0.1, 8, 0.9, None, 1.25),  # 0.1 / (8 * 0.1^2)
        (1e-3, 128, 0.0, None, 7.8125e-6),  # plain SGD: lr / B
        (0.1, 10, 0.5, 2.0, 0.08),  # 0.1 / (10 * 0.25) * tr Sigma
        (0.0, 4, 0.9, None, 0.0),
    ],
)
def test_effective_noise_scale_formula(lr, batch, momentum, trace, expected):
    assert effective_noise_scale(lr, batch, momentum, trace) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": 0.1, "batch_size": 0}, "batch_size"),
        ({"learning_rate": 0.1, "batch_size": 4, "momentum": 1.0}, "momentum"),
        ({"learning_rate": -1.0, "batch_size": 4}, "learning_rate"),
    ],
)
def test_effective_noise_scale_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        effective_noise_scale(**kwargs)


class _Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x, labels):
        return {"loss": F.mse_loss(self.linear(x).squeeze(-1), labels)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, count: int):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(count, 2, generator=generator)
        self.y = self.x.sum(-1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.y[index]}


class _SeenLogs(TrainerCallback):
    def __init__(self):
        self.values = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.values.append(logs.get(NOISE_SCALE_LOG_KEY))


def _trainer(tmp_path, **overrides) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **overrides,
    )
    return Trainer(model=_Regressor(), args=args, train_dataset=_Rows(64))


def test_callback_logs_the_noise_scale_of_an_adamw_trainer_run(tmp_path):
    # lr 0.2 decays linearly to 0 over 4 steps; B = 4 per device x 2 accumulation x 1 process; beta1 = 0.8.
    trainer = _trainer(
        tmp_path,
        learning_rate=0.2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        adam_beta1=0.8,
        lr_scheduler_type="linear",
    )
    seen = _SeenLogs()
    trainer.add_callback(seen)
    add_noise_scale_logging(trainer)
    assert isinstance(trainer.callback_handler.callbacks[0], EffectiveNoiseScaleCallback)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    # Each log reports the learning rate of the step just taken: 0.2, 0.15, 0.1, 0.05.
    assert [entry["learning_rate"] for entry in logged] == pytest.approx([0.2, 0.15, 0.1, 0.05])
    # 0.2 / (8 * (1 - 0.8)^2) = 0.625, and so on.
    expected = [0.625, 0.46875, 0.3125, 0.15625]
    assert [entry[NOISE_SCALE_LOG_KEY] for entry in logged] == pytest.approx(expected)
    assert seen.values == pytest.approx(expected)  # callbacks after it see the value in the logs
    trainer.save_state()
    assert logged_noise_scale(tmp_path) == pytest.approx(0.390625)


def test_callback_uses_sgd_momentum(tmp_path):
    trainer = _trainer(
        tmp_path,
        learning_rate=0.1,
        per_device_train_batch_size=4,
        optim="sgd",
        optim_args="momentum=0.5",
        lr_scheduler_type="constant",
    )
    trainer.add_callback(EffectiveNoiseScaleCallback())
    trainer.train()
    values = [entry[NOISE_SCALE_LOG_KEY] for entry in trainer.state.log_history if "loss" in entry]
    assert values == pytest.approx([0.1 / (4 * 0.25)] * 4)  # 0.1 / (4 (1 - 0.5)^2) = 0.1


def test_adam_momentum_none_drops_beta1_but_not_sgd_momentum():
    parameters = [nn.Parameter(torch.zeros(2))]
    adamw = torch.optim.AdamW(parameters, betas=(0.8, 0.999))
    sgd = torch.optim.SGD(parameters, lr=0.1, momentum=0.5)
    assert optimizer_momentum(adamw) == pytest.approx(0.8)  # "beta1", saft_hf's default
    assert optimizer_momentum(adamw, "none") == 0.0
    assert optimizer_momentum(sgd, "none") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="adam_momentum must be one of beta1, none, got 'beta2'"):
        EffectiveNoiseScaleCallback(adam_momentum="beta2")


def test_callback_with_adam_momentum_none_logs_lr_over_batch_for_adamw(tmp_path):
    trainer = _trainer(
        tmp_path, learning_rate=0.2, per_device_train_batch_size=4, adam_beta1=0.8, lr_scheduler_type="constant"
    )
    add_noise_scale_logging(trainer, adam_momentum="none")
    trainer.train()
    values = [entry[NOISE_SCALE_LOG_KEY] for entry in trainer.state.log_history if "loss" in entry]
    assert values == pytest.approx([0.2 / 4] * 4)  # beta1 = 0.8 would give 0.2 / (4 * 0.2^2) = 1.25


def test_logged_noise_scale_explains_a_run_without_the_callback(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}]}))
    with pytest.raises(ValueError, match="EffectiveNoiseScaleCallback"):
        logged_noise_scale(tmp_path)
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        logged_noise_scale(tmp_path / "missing")


# ---- results on disk and figures ---------------------------------------------------------------------------------


def _grid(values: np.ndarray, quantity: str = "xi") -> GridResult:
    alphas = coefficient_grid(points=values.shape[0])
    return GridResult(quantity, ("a", "b"), alphas, values, {"a": values / 2, "b": values / 2})


def test_grid_result_saves_csv_and_json_that_reload_to_the_same_numbers(tmp_path):
    values = np.arange(9, dtype=float).reshape(3, 3)
    csv_path, json_path = _grid(values).save(tmp_path, "xi_pair")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 9 and rows[0].keys() == {"alpha_1", "alpha_2", "xi", "xi[a]", "xi[b]"}
    assert [float(row["xi"]) for row in rows] == values.ravel().tolist()
    assert (float(rows[5]["alpha_1"]), float(rows[5]["alpha_2"])) == (0.5, 1.5)
    saved = json.loads(json_path.read_text())
    assert saved["values"] == values.tolist() and saved["alphas"] == [-0.5, 0.5, 1.5]
    assert not list(tmp_path.glob(".*.tmp"))


def _image(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_heatmaps_are_pngs_that_show_the_data(tmp_path):
    ramp = np.add.outer(np.arange(21.0), np.zeros(21))  # grows with alpha_1 only
    first = _image(plot_grid({"SGD": _grid(ramp), "SAFT": _grid(ramp / 2)}, tmp_path / "xi.png"))
    transposed = _image(plot_grid({"SGD": _grid(ramp.T), "SAFT": _grid(ramp.T / 2)}, tmp_path / "xi_t.png"))
    constant = _image(plot_grid(_grid(np.zeros((21, 21)), "joint_loss"), tmp_path / "loss.png"))
    assert first.shape[0] > 300 and first.shape[1] > 600 and constant.shape[1] < first.shape[1]
    assert first.reshape(-1, first.shape[-1]).std(axis=0).max() > 0.1
    assert first.shape == transposed.shape and np.abs(first - transposed).mean() > 0.01
    colours = lambda image: len(np.unique(image.reshape(-1, image.shape[-1]), axis=0))  # noqa: E731
    assert colours(first) > colours(constant)


def test_line_figures_are_pngs_that_change_with_the_data(tmp_path):
    _, _, taus, tasks = _quadratic_setup()
    model = tasks[0].model
    start, end = {"w": model.w.detach()}, {"w": model.w.detach() + taus[0]["w"]}
    near, far = loss_barrier(tasks[0], start, end), loss_barrier(tasks[0], start, {"w": end["w"] * 3})
    one = _image(plot_loss_barrier({"SGD": near, "SAFT": far}, tmp_path / "barrier.png"))
    other = _image(plot_loss_barrier({"SGD": far, "SAFT": near}, tmp_path / "barrier_swapped.png"))
    assert one.shape == other.shape and np.abs(one - other).mean() > 0.001
    hessian = hessian_eigenvalues_along_line(tasks[0], taus[0], gammas=(0.0, 1.0), max_iterations=3)
    for path in (
        plot_hessian_eigenvalues({"SGD": hessian}, tmp_path / "hessian.png"),
        plot_merge_gain_vs_noise({"lr": [(1e-4, 0.01), (1e-3, 0.03), (1e-2, -0.02)]}, tmp_path / "gain.png"),
    ):
        image = _image(path)
        assert image.shape[0] > 300 and image.reshape(-1, image.shape[-1]).std(axis=0).max() > 0.1


def test_linearity_plot_labels_layers(tmp_path, monkeypatch):
    model = Block(SquaredWeight([1.0, 0.0]))
    task = _features_task("s", model, torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    taus = [{"inner.w": scalar([1.0, 0.0])}, {"inner.w": scalar([0.0, 1.0])}]
    result = cross_task_linearity([task], taus, layers=["", "inner"])
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda figure, path: (figures.append(figure), save(figure, path))[1])
    _image(plot_linearity({"SGD": result}, tmp_path / "ctl.png"))
    (axes,) = figures[0].axes
    # One tick per layer, labelled with its name, and the plotted line is the table's E[1 - cos] per layer.
    assert list(result.x) == ["", "inner"]
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["(model)", "inner"]
    (line,) = axes.get_lines()
    assert line.get_label() == "SGD"
    np.testing.assert_allclose(line.get_ydata(), np.asarray(result.series["ctl"], dtype=float))
    assert result.series["ctl"].min() > 0  # the squared weight is not linear in the task vectors


# ---- real models -------------------------------------------------------------------------------------------------


def test_text_to_text_task_scores_like_the_t5_helpers():
    from saft_hf.models import predict_label_words, text_to_text_collator, tokenize_text_to_text
    from saft_hf.testing import build_tiny_t5

    model, tokenizer = build_tiny_t5(seed=0)
    label_words = ("negative", "positive")
    texts = ["the movie was great", "a terrible film", "boring and far too long"]
    rows = tokenize_text_to_text(tokenizer, texts, [1, 0, 0], label_words, 32)
    collate = text_to_text_collator(tokenizer, model)
    batch = collate([{key: rows[key][i] for key in rows} for i in range(len(texts))])
    task = text_to_text_task("sst2", model, tokenizer, label_words, batches_of(batch))
    weights = {name: p.detach() for name, p in model.named_parameters()}
    expected_predictions = predict_label_words(model, tokenizer, texts, label_words)
    assert predictions(task, weights).tolist() == expected_predictions
    with torch.no_grad():
        per_example = [model(**collate([{key: rows[key][i] for key in rows}])).loss.item() for i in range(3)]
    assert mean_loss(task, weights) == pytest.approx(np.mean(per_example), rel=1e-5)
    assert task.targets(batch).tolist() == [1, 0, 0]


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """A tiny CLIP as the pre-trained model and two "fine-tunes" of its vision tower (random nudges)."""
    from saft_hf.data import get_task
    from saft_hf.models import CLIPVisionClassifier, build_zero_shot_head
    from saft_hf.testing import build_tiny_clip

    root = tmp_path_factory.mktemp("analysis_runs")
    clip, tokenizer, processor = build_tiny_clip(seed=0)
    for part in (clip, tokenizer, processor):
        part.save_pretrained(root / "base")
    folders = []
    for seed, name in enumerate(("digits_0to4", "digits_5to9")):
        task = get_task(name)
        head = build_zero_shot_head(clip, task.class_names, task.templates, tokenizer)
        tuned = CLIPVisionClassifier(clip.config.vision_config, head)
        tuned.vision_model.load_state_dict(clip.vision_model.state_dict())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in tuned.vision_model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        tuned.save_pretrained(root / name)
        folders.append(str(root / name))
    return root, folders


def test_analyze_recipe_writes_tables_and_figures_for_tiny_clip_on_digits(digits_runs, tmp_path):
    analyze = import_recipe("analyze")
    root, folders = digits_runs
    summary = analyze.main(
        [
            "--base",
            str(root / "base"),
            "--tasks",
            "digits_0to4",
            "digits_5to9",
            "--family",
            "sgd",
            *folders,
            "--output_dir",
            str(tmp_path),
            "--max_examples",
            "6",
            "--batch_size",
            "6",
            "--grid_points",
            "3",
            "--grid_range",
            "-0.5",
            "0.5",
            "--barrier_points",
            "3",
            "--hessian_gammas",
            "1",
            "--hessian_iterations",
            "2",
        ]
    )
    assert set(summary) == set(ANALYSES)
    rows = list(csv.DictReader((tmp_path / "disentanglement_pair_sgd.csv").open()))
    assert [(float(row["alpha_1"]), float(row["alpha_2"])) for row in rows[:3]] == [
        (-0.5, -0.5),
        (-0.5, 0.0),
        (-0.5, 0.5),
    ]
    origin = next(row for row in rows if float(row["alpha_1"]) == 0.0 and float(row["alpha_2"]) == 0.0)
    assert float(origin["xi"]) == 0.0  # theta_merge = theta_0 = both single-task models
    assert all(0.0 <= float(row["xi"]) <= 2.0 for row in rows)
    linearity = list(csv.DictReader((tmp_path / "linearity_sgd.csv").open()))
    assert [row["layer"] for row in linearity] == ["vision_model.encoder.layers.0", "vision_model.encoder.layers.1"]
    for figure in (
        "disentanglement_pair.png",
        "landscape_pair.png",
        "linearity.png",
        "barrier_digits_0to4.png",
        "hessian_digits_5to9.png",
    ):
        assert _image(tmp_path / figure).shape[0] > 300
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["barrier"]["numbers"]["sgd/digits_0to4/barrier"] >= 0
    assert "gain_vs_noise.png" not in saved["gain"]["figures"]  # these runs logged no noise scale


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--family", "sgd", "A"], "family 'sgd' has 1 fine-tunes for 2 tasks"),
        (["--family", "sgd", "A", "B", "--family", "sgd", "C", "D"], "family 'sgd' is given twice"),
        ([], "Give the fine-tuned models with --finetuned or --family"),
        (["--finetuned", "A", "B", "--pair", "1", "1"], r"pair \[1, 1\] must be two different task indices below 2"),
        (["--finetuned", "A", "B", "--analyses", "nope"], "argument --analyses: invalid choice: 'nope'"),
    ],
)
def test_analysis_arguments_are_checked_before_any_work(flags, message):
    with pytest.raises(ValueError, match=message):
        SaftParser(AnalysisArguments).parse_args_and_config(
            ["--base", "b", "--tasks", "digits_0to4", "digits_5to9", "--output_dir", "out", *flags]
        )


def test_analysis_families_come_from_a_config_file_in_order(tmp_path):
    config = tmp_path / "analysis.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": "b",
                "tasks": ["t1", "t2"],
                "output_dir": "out",
                "family": [["sgd", "s1", "s2"], ["saft", "a1", "a2"]],
                "grid_points": "5",
            }
        )
    )
    args, resolved = SaftParser(AnalysisArguments).parse_args_and_config(["--config", str(config), "--pair", "1", "0"])
    assert args.families == {"sgd": ["s1", "s2"], "saft": ["a1", "a2"]}
    assert (args.pair, args.grid_points, resolved["grid_points"]) == ([1, 0], 5, 5)
