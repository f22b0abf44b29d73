"""Numbers that are not numbers, and task-vector metadata that does not hold: NaN/Inf inputs and overflowing results
are refused (merge and task vectors) unless allowed, base fingerprints are required, ``tied_weights`` is validated,
and one dtype rule (float64 compute, the base's dtype) holds for merges and task vectors alike."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from merge_fixtures import clip_vision_family, finetune_like, save, tiny_clip_vision, tiny_t5
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saft_hf.checkpoints import CheckpointReader
from saft_hf.cli import main as cli_main
from saft_hf.errors import NonFiniteError
from saft_hf.merging import MERGE_METHODS, MergeConfig, get_method, merge
from saft_hf.task_vectors import TaskVector

NAME = "post_layernorm.weight"  # the tensor the tests poison (shape [32])
NAN, INF = math.nan, math.inf
# values written at the start of NAME, and the counts the refusal reports
POISONS = {
    "nan": ([NAN], "1 NaN and 0 Inf values"),
    "+inf": ([INF, INF], "0 NaN and 2 Inf values"),
    "-inf": ([-INF, NAN], "1 NaN and 1 Inf values"),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return clip_vision_family(tmp_path_factory.mktemp("family"), count=2)


def weights_file(folder: Path) -> Path:
    (file,) = folder.glob("*.safetensors")
    return file


def rewrite(folder: Path, edit_tensors=None, edit_metadata=None) -> Path:
    """Rewrite the single weight file of ``folder`` with its tensors and header metadata edited in place."""
    file = weights_file(folder)
    with safe_open(file, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = {name: tensor.clone() for name, tensor in load_file(file).items()}
    (edit_tensors or (lambda t: None))(tensors)
    (edit_metadata or (lambda m: None))(metadata)
    save_file(tensors, file, metadata=metadata)
    return folder


def poisoned(source: Path, target: Path, values) -> Path:
    """A copy of the folder ``source`` whose tensor NAME starts with ``values``."""
    shutil.copytree(source, target)

    def poison(tensors):
        tensors[NAME][: len(values)] = torch.tensor(values, dtype=tensors[NAME].dtype)

    return rewrite(target, poison)


def recipe(base, models, output_dir, method="task_arithmetic", parameters=None, **extra):
    return {
        "base_model": str(base),
        "models": [str(m) for m in models],
        "method": method,
        "parameters": parameters or {},
        "output_dir": str(output_dir),
        **extra,
    }


def nothing_written(tmp_path: Path, output: Path) -> bool:
    return not output.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def first_float_name(folder: Path) -> str:
    reader = CheckpointReader(folder)
    return next(name for name in reader if reader.dtype(name).is_floating_point)


# ---- merge inputs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("where", ["model", "task_vector", "base"])
def test_nonfinite_merge_input_is_refused_naming_input_tensor_and_counts(family, tmp_path, where, method, poison):
    values, counts = POISONS[poison]
    base_dir, (first, second) = family
    if where == "model":
        base, models = base_dir, [first, poisoned(second, tmp_path / "bad", values)]
        label = f"models[1] ({tmp_path / 'bad'})"
    elif where == "task_vector":
        vector = TaskVector.from_models(base_dir, second).save(tmp_path / "tv")
        base, models = base_dir, [first, poisoned(vector, tmp_path / "bad", values)]
        label = f"models[1] ({tmp_path / 'bad'})"
    else:
        base, models = poisoned(base_dir, tmp_path / "bad", values), [first, second]
        label = f"base_model ({tmp_path / 'bad'})"
    output = tmp_path / "out"
    with pytest.raises(NonFiniteError) as caught:
        merge(recipe(base, models, output, method), progress=False)
    message = str(caught.value)
    assert message.startswith(f"{label}: tensor '{NAME}' has {counts}; ")
    assert "allow_nonfinite: true" in message and "\n" not in message
    assert nothing_written(tmp_path, output)


def test_opt_in_merges_nonfinite_inputs_as_documented(family, tmp_path):
    base_dir, (first, second) = family
    bad = poisoned(second, tmp_path / "bad", [NAN, INF, -INF])
    base, a, b = (load_file(weights_file(folder))[NAME].double() for folder in (base_dir, first, bad))
    d_a, d_b = a - base, b - base

    out = merge(
        recipe(base_dir, [first, bad], tmp_path / "ta", parameters={"alpha": 0.5}, allow_nonfinite=True), progress=False
    )
    merged = load_file(out / "model.safetensors")[NAME]
    assert merged.dtype == torch.float32
    assert math.isnan(merged[0]) and merged[1] == INF and merged[2] == -INF  # task arithmetic propagates them
    assert merged[3] == (base[3] + 0.5 * (d_a[3] + d_b[3])).float()
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["allow_nonfinite"] is True

    # TIES (density 1: nothing trimmed by rank): the NaN entry is dropped, so only the first model's delta counts
    # there; an infinite entry wins the sign election and the disjoint mean.
    out = merge(
        recipe(base_dir, [first, bad], tmp_path / "ties", "ties", {"density": 1.0}, allow_nonfinite=True),
        progress=False,
    )
    merged = load_file(out / "model.safetensors")[NAME]
    assert merged[0] == (base[0] + d_a[0]).float()
    assert merged[1] == INF and merged[2] == -INF
    agree = [d for d in (d_a[3], d_b[3]) if (d > 0) == (d_a[3] + d_b[3] >= 0)]
    assert merged[3] == (base[3] + sum(agree) / len(agree)).float()


def test_allow_nonfinite_is_a_validated_bool(family, tmp_path):
    base_dir, tuned = family
    with pytest.raises(ValueError, match=r"^allow_nonfinite: expected true or false, got 'yes'$"):
        MergeConfig.coerce(recipe(base_dir, tuned, tmp_path / "out", allow_nonfinite="yes"))
    assert MergeConfig.coerce(recipe(base_dir, tuned, tmp_path / "out")).allow_nonfinite is False


# ---- merge outputs ----------------------------------------------------------------------------------------------


def test_huge_alpha_is_refused_naming_the_tensor_and_nothing_is_written(family, tmp_path):
    base_dir, tuned = family
    output = tmp_path / "out"
    first = first_float_name(base_dir)
    numel = CheckpointReader(base_dir)[first].numel()
    with pytest.raises(NonFiniteError) as caught:
        merge(recipe(base_dir, tuned, output, parameters={"alpha": -1e300}), progress=False)
    message = str(caught.value)
    assert message.startswith(
        f"output tensor '{first}' in torch.float32 has 0 NaN and {numel} Inf values; "
        "likely cause: method 'task_arithmetic' with parameters {'alpha': -1e+300}"
    )
    assert "narrower" not in message and "\n" not in message
    assert nothing_written(tmp_path, output)
    # the opt-in writes them
    out = merge(recipe(base_dir, tuned, output, parameters={"alpha": -1e300}, allow_nonfinite=True), progress=False)
    assert torch.isinf(load_file(out / "model.safetensors")[first]).all()


def test_float16_output_overflow_is_refused(family, tmp_path):
    base_dir, tuned = family
    big_base = poisoned(base_dir, tmp_path / "big", [1e6])  # merged: about 1e6 - 0.3 * 2e6, beyond float16's 65504
    output = tmp_path / "out"
    with pytest.raises(
        NonFiniteError,
        match=re.escape(
            f"output tensor '{NAME}' in torch.float16 has 0 NaN and 1 Inf values; likely cause: method "
            "'task_arithmetic' with parameters {'alpha': 0.3} and model weights [1.0, 1.0] (e.g. a huge alpha) or the "
            "output dtype torch.float16 (recipe field dtype), narrower than the base's torch.float32;"
        ),
    ):
        merge(recipe(big_base, tuned, output, dtype="float16"), progress=False)
    assert nothing_written(tmp_path, output)


# ---- task vectors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_from_models_refuses_a_nonfinite_finetune_unless_allowed(family, tmp_path, poison):
    values, counts = POISONS[poison]
    base_dir, (tuned_dir, _) = family
    bad = poisoned(tuned_dir, tmp_path / "bad", values)
    vector = TaskVector.from_models(base_dir, bad)
    expected = f"fine-tuned model {bad}: tensor '{NAME}' has {counts}; pass allow_nonfinite=True"
    with pytest.raises(NonFiniteError, match=re.escape(expected)):
        vector[NAME]
    with pytest.raises(NonFiniteError, match=re.escape(expected)):
        vector.save(tmp_path / "tv")
    assert not (tmp_path / "tv").exists()
    allowed = TaskVector.from_models(base_dir, bad, allow_nonfinite=True)[NAME]
    assert torch.equal(torch.isnan(allowed[: len(values)]), torch.tensor([math.isnan(v) for v in values]))


def test_from_models_refuses_a_nonfinite_base(family, tmp_path):
    base_dir, (tuned_dir, _) = family
    bad = poisoned(base_dir, tmp_path / "bad", [INF])
    with pytest.raises(NonFiniteError, match=re.escape(f"base {bad}: tensor '{NAME}' has 0 NaN and 1 Inf values")):
        TaskVector.from_models(bad, tuned_dir)[NAME]


def test_apply_to_refuses_nonfinite_vector_values_and_results(family, tmp_path):
    base_dir, (tuned_dir, _) = family
    good = TaskVector.from_models(base_dir, tuned_dir).save(tmp_path / "tv")
    bad = poisoned(good, tmp_path / "bad", [NAN, -INF])
    with pytest.raises(
        NonFiniteError,
        match=re.escape(
            f"{bad / 'task_vector.safetensors'}: tensor '{NAME}' has 1 NaN and 1 Inf values; pass allow_nonfinite=True"
        ),
    ):
        TaskVector.load(bad).apply_to(base_dir)
    applied = TaskVector.load(bad).apply_to(base_dir, allow_nonfinite=True)[NAME]
    assert math.isnan(applied[0]) and applied[1] == -INF

    first = first_float_name(base_dir)
    expected = rf"^base {re.escape(str(base_dir))}: tensor '{re.escape(first)}' plus 1e\+300 times the task vector "
    with pytest.raises(NonFiniteError, match=expected + r"has 0 NaN and \d+ Inf values; alpha is out of range"):
        TaskVector.load(good).apply_to(base_dir, alpha=1e300)
    assert torch.isinf(TaskVector.load(good).apply_to(base_dir, alpha=1e300, allow_nonfinite=True)[first]).all()


# ---- task-vector metadata ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fingerprint", [None, ""])
def test_a_vector_without_base_fingerprint_needs_allow_other_base(family, tmp_path, fingerprint):
    base_dir, (tuned_dir, other_dir) = family
    folder = TaskVector.from_models(base_dir, tuned_dir, dtype=torch.float64).save(tmp_path / "tv")

    def drop(metadata):
        if fingerprint is None:
            del metadata["base_fingerprint"]
        else:
            metadata["base_fingerprint"] = fingerprint

    rewrite(folder, edit_metadata=drop)
    message = (
        f"{folder / 'task_vector.safetensors'}: metadata field base_fingerprint is missing or empty, so the "
        "base it is applied to"
    )
    vector = TaskVector.load(folder)
    with pytest.raises(ValueError, match=re.escape(message) + r".*allow_other_base=True"):
        vector.apply_to(base_dir)
    config = recipe(base_dir, [folder, other_dir], tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape(message) + r".*allow_other_base: true"):
        merge(config, progress=False)
    assert nothing_written(tmp_path, tmp_path / "out")
    applied = vector.apply_to(base_dir, allow_other_base=True)
    assert torch.equal(applied[NAME], load_file(weights_file(tuned_dir))[NAME])
    merge({**config, "allow_other_base": True}, progress=False)
    # a sum with a vector that records no fingerprint records none either
    with pytest.raises(ValueError, match="base_fingerprint is missing or empty"):
        (vector + TaskVector.from_models(base_dir, other_dir)).apply_to(base_dir)


TIED_CASES = {
    "malformed JSON": ("{not json", "not valid JSON (Expecting property name"),
    "not an object": ("[1, 2]", "expected a JSON object of tensor name -> tensor name, got '[1, 2]'"),
    "value not a string": ('{"a.weight": 3}', "expected a JSON object of tensor name -> tensor name"),
    "value not stored": (
        '{"a.weight": "nope.weight"}',
        "'a.weight' is a tied copy of 'nope.weight', which the vector does not store",
    ),
    "key stored itself": (
        json.dumps({NAME: "post_layernorm.bias"}),
        f"'{NAME}' is listed as a tied copy of 'post_layernorm.bias' but is stored itself",
    ),
}


@pytest.mark.parametrize("case", sorted(TIED_CASES))
def test_malformed_tied_weights_are_refused_on_load(family, tmp_path, case):
    text, message = TIED_CASES[case]
    base_dir, (tuned_dir, _) = family
    folder = rewrite(
        TaskVector.from_models(base_dir, tuned_dir).save(tmp_path / "tv"),
        edit_metadata=lambda metadata: metadata.__setitem__("tied_weights", text),
    )
    with pytest.raises(ValueError) as caught:
        TaskVector.load(folder)
    assert str(caught.value).startswith(f"{folder / 'task_vector.safetensors'}: metadata field tied_weights: {message}")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("ties", "message"),
    [
        (
            {"post_layernorm.wieght": "post_layernorm.bias"},
            "'post_layernorm.wieght' (a tied copy of 'post_layernorm.bias') is not a tensor of the base",
        ),
        (
            {NAME: "embeddings.patch_embedding.weight"},
            f"'{NAME}' is a tied copy of 'embeddings.patch_embedding.weight' of shape [32, 3, 8, 8], but the base",
        ),
    ],
)
def test_tied_weights_must_name_base_tensors_of_the_same_shape(family, tmp_path, ties, message):
    base_dir, (tuned_dir, _) = family

    def untie(tensors):  # the vector stores NAME only as a tie, as a deduplicated checkpoint would
        tensors.pop(NAME)

    folder = rewrite(
        TaskVector.from_models(base_dir, tuned_dir).save(tmp_path / "tv"),
        untie,
        lambda metadata: metadata.__setitem__("tied_weights", json.dumps(ties)),
    )
    expected = f"{folder / 'task_vector.safetensors'}: metadata field tied_weights: {message}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        TaskVector.load(folder).apply_to(base_dir, allow_other_base=True)
    with pytest.raises(ValueError, match=re.escape(expected)):
        merge(recipe(base_dir, [folder], tmp_path / "out", allow_other_base=True), progress=False)


def test_tied_names_a_saved_base_stores_once_are_accepted(tmp_path):
    """A vector of in-memory T5 models records every tied name of their state dicts; a saved T5 stores the shared
    embedding once and re-ties the rest on load, so those names are accepted, and a misspelt one is not."""
    base = tiny_t5(seed=0)
    tuned = finetune_like(base, seed=2)
    base_dir = save(base, tmp_path / "base")
    folder = TaskVector.from_models(base, tuned, dtype=torch.float64).save(tmp_path / "tv")
    assert "lm_head.weight" in TaskVector.load(folder).tied_weights
    applied = TaskVector.load(folder).apply_to(base_dir)
    assert torch.equal(applied["shared.weight"], tuned.state_dict()["shared.weight"])
    rewrite(folder, edit_metadata=lambda m: m.__setitem__("tied_weights", '{"lm_haed.weight": "shared.weight"}'))
    with pytest.raises(
        ValueError,
        match=r"tied_weights: 'lm_haed\.weight' \(a tied copy of 'shared\.weight'\) is "
        "not a tensor of the base",
    ):
        TaskVector.load(folder).apply_to(base_dir)


# ---- one dtype rule ---------------------------------------------------------------------------------------------


def test_bf16_finetune_of_fp32_base_gives_the_same_numbers_in_merge_and_task_vector(tmp_path):
    base_model = tiny_clip_vision(seed=0)
    base_dir = save(base_model, tmp_path / "base")
    tuned_dir = save(finetune_like(base_model, seed=1).to(torch.bfloat16), tmp_path / "bf16")
    base, tuned = load_file(base_dir / "model.safetensors"), load_file(tuned_dir / "model.safetensors")
    assert tuned[NAME].dtype == torch.bfloat16 and base[NAME].dtype == torch.float32
    alpha = 0.5  # a power of two: alpha * x is exact, so the hand formula does not depend on fused multiply-adds

    def by_hand(name):
        return (base[name].double() + alpha * (tuned[name].double() - base[name].double())).float()

    out = merge(recipe(base_dir, [tuned_dir], tmp_path / "out", parameters={"alpha": alpha}), progress=False)
    merged = load_file(out / "model.safetensors")
    vector = TaskVector.from_models(base_dir, tuned_dir)
    assert {vector.dtype(name) for name in vector} == {torch.float32}  # stored in the base's dtype
    applied = vector.apply_to(base_dir, alpha=alpha)
    exact = TaskVector.from_models(base_dir, tuned_dir, dtype=torch.float64).apply_to(base_dir, alpha=alpha)
    for name in base:
        expected = by_hand(name)
        assert merged[name].dtype == applied[name].dtype == torch.float32, name
        # bfloat16 and float32 inputs with a float32 output are merged in float32 (see test_merge_float32)
        assert torch.equal(merged[name], base[name] + alpha * (tuned[name].float() - base[name])), name
        assert (merged[name] - expected).abs().max() <= 1e-6, name
        assert torch.equal(exact[name], expected), name
        # the default vector stores each difference rounded to float32 (the base's dtype), then applies it in float64
        difference = (tuned[name].double() - base[name].double()).float()
        assert torch.equal(applied[name], (base[name].double() + alpha * difference.double()).float()), name


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_computes_float8_inputs_in_float64(method):
    """torch promotes no float8 type: the methods convert each input to float64 themselves."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator)
    finetuned = [(base + torch.randn(6, 5, generator=generator)).to(torch.float8_e5m2) for _ in range(2)]
    merged = get_method(method)(base, finetuned)
    assert merged.dtype == torch.float64
    assert torch.equal(merged, get_method(method)(base, [tensor.double() for tensor in finetuned]))


def test_cli_task_vector_refuses_nonfinite_unless_allow_nonfinite(family, tmp_path, capsys):
    base_dir, (tuned_dir, _) = family
    bad = poisoned(tuned_dir, tmp_path / "bad", [float("nan")])
    arguments = ["task-vector", "--base", str(base_dir), "--finetuned", str(bad)]
    assert cli_main([*arguments, "-o", str(tmp_path / "refused")]) == 1
    assert f"tensor '{NAME}' has 1 NaN and 0 Inf values" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert cli_main([*arguments, "-o", str(tmp_path / "allowed"), "--allow_nonfinite"]) == 0
    assert torch.isnan(TaskVector.load(tmp_path / "allowed")[NAME][0])
