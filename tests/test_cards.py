"""Model cards: metadata that parses back, bodies with the numbers, no secrets, templates shipped in the wheel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard

from saft_hf.cards import finetune_card, merged_model_card, redact_secrets, task_vector_card
from saft_hf.hub import push_folder
from saft_hf.merging.methods import get_method

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_" + "Ab3" * 11 + "z"  # shaped like a real user access token: hf_ + 34 alphanumerics
SAFT_TITLE = "Mitigating Parameter Interference in Model Merging via Sharpness-Aware Fine-Tuning"


def recipe(**overrides) -> dict:
    return {
        "base_model": "openai/clip-vit-base-patch32",
        "models": [
            {"model": "tanganke/clip-vit-base-patch32_sun397", "revision": None, "weight": 1.0},
            {"model": "tanganke/clip-vit-base-patch32_dtd@" + "d" * 40, "weight": 0.5},
        ],
        "method": "ties",
        "parameters": {"alpha": 0.3, "density": 0.2},
        "tensor_parameters": [{"filter": "re:layers\\.0\\.", "parameters": {"alpha": 0.5}}],
        "dtype": None,
        "max_shard_size": "2GB",
        "allow_pickle": False,
        "output_dir": "merged/clip-ties",
        "push_to_hub": {"repo_id": "me/clip-ties", "private": False},
        **overrides,
    }


SOURCES = [
    {"model": "openai/clip-vit-base-patch32", "revision": "a" * 40, "weight": None, "role": "base"},
    {"model": "tanganke/clip-vit-base-patch32_sun397", "revision": "b" * 40, "weight": 1.0},
    {"model": "tanganke/clip-vit-base-patch32_dtd@" + "d" * 40, "revision": "d" * 40, "weight": 0.5},
]
TIES = get_method("ties")
SEARCH = [
    {"alpha": 0.1, "density": 0.2, "val_accuracy": 0.61234567},
    {"alpha": 0.3, "density": 0.2, "val_accuracy": 0.7},
]


def merged_card(recipe: dict, sources: list[dict], search: list[dict] | None = None) -> ModelCard:
    """The merged model's card as the engine renders it: with the registry's summary and paper of TIES."""
    return merged_model_card(recipe, sources, search, method_summary=TIES.summary, method_reference=TIES.reference)


def body_table(card: ModelCard, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header row is `header`."""
    lines = card.text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def yaml_block(card: ModelCard) -> dict:
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", card.text, flags=re.DOTALL).group(1))


def test_merged_card_metadata_parses_back():
    card = ModelCard(str(merged_card(recipe(), SOURCES, SEARCH)))

    assert card.data.base_model == [
        "openai/clip-vit-base-patch32",
        "tanganke/clip-vit-base-patch32_sun397",
        "tanganke/clip-vit-base-patch32_dtd",
    ]
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "saft_hf", "ties"]


def test_merged_card_body_has_method_sources_coefficients_search_and_recipe():
    card = merged_card(recipe(), SOURCES, SEARCH)

    assert "**ties** method (Yadav et al. 2023, TIES-Merging: Resolving interference when merging models" in card.text
    assert "TIES: trim, elect sign, disjoint mean" in card.text
    assert body_table(card, "| role | model | revision | weight |") == [
        ["base", "openai/clip-vit-base-patch32", "a" * 40, "—"],
        ["model", "tanganke/clip-vit-base-patch32_sun397", "b" * 40, "1"],
        ["model", "tanganke/clip-vit-base-patch32_dtd@" + "d" * 40, "d" * 40, "0.5"],
    ]
    assert body_table(card, "| parameter | value |") == [["alpha", "0.3"], ["density", "0.2"]]
    assert body_table(card, "| filter | parameters |") == [["`re:layers\\.0\\.`", "alpha=0.5"]]
    assert body_table(card, "| alpha | density | val_accuracy |") == [["0.1", "0.2", "0.612346"], ["0.3", "0.2", "0.7"]]
    assert yaml_block(card) == recipe()
    assert 'AutoModel.from_pretrained("me/clip-ties")' in card.text


def test_merged_card_of_local_inputs_has_no_hub_lineage(tmp_path):
    models = [{"model": str(tmp_path), "weight": 1.0}]
    local = recipe(base_model=str(tmp_path), models=models, push_to_hub=None, tensor_parameters=None)
    card = ModelCard(str(merged_card(local, [{"model": str(tmp_path), "role": "base"}])))

    assert card.data.base_model is None and card.data.to_dict().get("base_model_relation") is None
    # A local input is shown by folder name, marked local: never its absolute path, never as a Hub id.
    assert body_table(card, "| role | model | revision | weight |") == [
        ["base", f"{tmp_path.name} (local folder)", "—", "—"]
    ]
    assert str(tmp_path) not in card.text.split("## Recipe")[0]
    assert "## Coefficient search" not in card.text and "Per-tensor overrides" not in card.text
    assert 'from_pretrained("merged/clip-ties")' in card.text


def test_merged_card_is_accepted_by_the_hub(hub_server, tmp_path):
    merged_card(recipe(), SOURCES, SEARCH).save(tmp_path / "README.md")
    (tmp_path / "config.json").write_text("{}")
    push_folder(tmp_path, "me/clip-ties")  # create_commit sends README.md to /api/validate-yaml first

    card_data = HfApi().model_info("me/clip-ties").card_data
    assert card_data.base_model == [source["model"].split("@")[0] for source in SOURCES]
    assert card_data.base_model_relation == "merge"


@pytest.mark.parametrize(
    ("sam_mode", "tags", "intro"),
    [
        ("asam", ["saft_hf", "sharpness-aware-minimization", "asam", "ftlo"], "sharpness-aware fine-tuning (SAFT,"),
        ("none", ["saft_hf", "ftlo"], "without a sharpness-aware step"),
    ],
)
def test_finetune_card(sam_mode, tags, intro):
    info = {
        "base_model": "google/flan-t5-base",
        "base_revision": "e" * 40,
        "task": "glue-rte",
        "dataset": "nyu-mll/glue",
        "finetune_mode": "ftlo",
        "sam_mode": sam_mode,
        "sam_rho": 0.5,
        "sam_eta": 0.0,
        "training_args": {"learning_rate": 1e-5, "per_device_train_batch_size": 16, "max_steps": 8000},
        "eval_metrics": {"eval_accuracy": 0.7581227},
    }
    card = ModelCard(str(finetune_card(info)))

    assert card.data.base_model == ["google/flan-t5-base"]
    assert card.data.base_model_relation == "finetune"
    assert card.data.datasets == ["nyu-mll/glue"]
    assert card.data.tags == tags
    assert intro in card.text and "(revision `" + "e" * 40 + "`)" in card.text
    settings = body_table(card, "| setting | value | meaning |")
    assert [row[:2] for row in settings] == [["sam_mode", sam_mode], ["sam_rho", "0.5"], ["sam_eta", "0"]]
    assert settings[1][2] == "radius of the weight perturbation" and "\\|w\\| + eta" in settings[2][2]
    assert body_table(card, "| hyper-parameter | value |") == [
        ["learning_rate", "1e-05"],
        ["per_device_train_batch_size", "16"],
        ["max_steps", "8000"],
    ]
    assert body_table(card, "| metric | value |") == [["eval_accuracy", "0.758123"]]
    assert f"title     = {{{SAFT_TITLE}}}" in card.text
    assert "Lee, Yeoreum and Jung, Jinwook and Baik, Sungyong" in card.text


@pytest.mark.parametrize("local", [False, True])
def test_finetune_card_of_a_lora_adapter_with_a_local_dataset(tmp_path, local):
    dataset = tmp_path / "data" / "my-rte" if local else "nyu-mll/glue"
    info = {
        "base_model": "google/flan-t5-base",
        "finetune_mode": "lora",
        "sam_mode": "sam",
        "dataset": str(dataset),
        "tags": ["extra", "saft_hf"],
        "model_name": "rte-lora",
        "repo_id": "me/rte-lora",
        "license": "apache-2.0",
    }
    card = ModelCard(str(finetune_card(info)))
    assert card.data.library_name == "peft" and card.data.base_model_relation == "adapter"
    assert card.data.tags == ["saft_hf", "sharpness-aware-minimization", "sam", "lora", "extra"]
    assert card.data.license == "apache-2.0"
    assert "# rte-lora" in card.text.splitlines()
    assert 'AutoPeftModel.from_pretrained("me/rte-lora")' in card.text
    if local:
        assert card.data.datasets is None and str(tmp_path) not in str(card)
        assert "on the my-rte (local folder) dataset" in card.text
    else:
        assert card.data.datasets == ["nyu-mll/glue"]
        assert "[nyu-mll/glue](https://huggingface.co/datasets/nyu-mll/glue)" in card.text


def test_finetune_card_without_a_base_model_names_the_architecture():
    card = ModelCard(str(finetune_card({"architecture": "T5ForConditionalGeneration", "sam_mode": "asam"})))
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert "a fine-tuned version of a `T5ForConditionalGeneration` built from its configuration" in card.text


def test_task_vector_card():
    metadata = {
        "format": "saft_hf.task_vector",
        "base_model": "openai/clip-vit-base-patch32",
        "base_revision": "c" * 40,
        "task": "sun397",
        "finetune_mode": "full",
        "sam_mode": "asam",
        "sam_rho": "0.5",
        "sam_eta": "0.01",
        "saft_hf_version": "0.1.0",
        "base_fingerprint": "sha256:0123abcd",
        "source": "me/clip-sun397-saft",
        "repo_id": "me/clip-sun397-task-vector",
    }
    card = ModelCard(str(task_vector_card(metadata)))

    assert card.data.base_model == ["openai/clip-vit-base-patch32"]
    assert card.data.base_model_relation == "adapter"
    assert card.data.tags == ["saft_hf", "task-vector", "asam", "full"]
    fields = dict(body_table(card, "| field | value |"))
    assert fields["base revision"] == "c" * 40 and fields["base fingerprint"] == "sha256:0123abcd"
    assert (fields["fine-tuned model"], fields["sam_rho"], fields["sam_eta"]) == ("me/clip-sun397-saft", "0.5", "0.01")
    assert "  - model: me/clip-sun397-task-vector" in card.text and SAFT_TITLE in card.text


@pytest.mark.parametrize(
    ("render", "message"),
    [
        (lambda: merged_card({"base_model": "a/b"}, SOURCES), "no 'method'"),
        (lambda: finetune_card({"task": "x"}), "no 'base_model'"),
        (lambda: task_vector_card({"task": "x"}), "no 'base_model'"),
    ],
)
def test_cards_reject_missing_required_fields(render, message):
    with pytest.raises(ValueError, match=message):
        render()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"token": TOKEN, "repo_id": "a/b"}, {"repo_id": "a/b"}),
        (dict.fromkeys(["hf_token", "hub_token", "use_auth_token", "HF_TOKEN", "api_key", "password"], "x"), {}),
        (KEPT := {"pad_token_id": 0, "max_new_tokens": 5, "tokenizer": "t5", "tokenizer_name": "t5"}, KEPT),
        ({"note": f"pushed with {TOKEN} today"}, {"note": "pushed with <redacted> today"}),
        ([("api_org_" + "Q" * 30,), Path("/tmp/x")], [["<redacted>"], "/tmp/x"]),
    ],
)
def test_redact_secrets(value, expected):
    assert redact_secrets(value) == expected


def test_no_token_is_ever_rendered():
    leaky_recipe = recipe(
        hf_token=TOKEN,
        push_to_hub={"repo_id": "me/clip-ties", "private": True, "token": TOKEN},
        output_dir=f"merged/{TOKEN}",
    )
    leaky_sources = [{**SOURCES[0], "token": TOKEN}, *SOURCES[1:]]
    cards = [
        merged_card(leaky_recipe, leaky_sources, [{**SEARCH[0], "note": TOKEN}]),
        finetune_card({"base_model": "google/flan-t5-base", "training_args": {"hub_token": TOKEN, "max_steps": 8}}),
        task_vector_card({"base_model": "openai/clip-vit-base-patch32", "source": f"https://user:{TOKEN}@example.com"}),
    ]
    assert all(TOKEN not in str(card) for card in cards)
    assert yaml_block(cards[0])["push_to_hub"] == {"repo_id": "me/clip-ties", "private": True}
    assert "hf_token" not in yaml_block(cards[0]) and leaky_recipe["hf_token"] == TOKEN  # the input is not modified


@pytest.mark.slow
def test_templates_ship_in_the_wheel(tmp_path):
    """Built and installed like a user would, the package renders cards without the checkout's `model_cards/`."""
    source = tmp_path / "source"  # a copy: an in-tree build would write build/ and *.egg-info into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "saft_hf", "model_cards"):
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("saft_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"saft_hf/model_cards/{name}" for name in ("finetune.md", "task_vector.md", "merged.md")} <= names
    modules = {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "saft_hf").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"

    site = tmp_path / "site"
    pip_install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(pip_install, check=True, capture_output=True)
    script = textwrap.dedent(
        """
        import saft_hf.cards as cards
        print(cards.__file__)
        print(cards.finetune_card({"base_model": "google/flan-t5-base"}).data.base_model_relation)
        print(cards.task_vector_card({"base_model": "openai/clip-vit-base-patch32"}).data.base_model_relation)
        card = cards.merged_model_card(
            {"method": "ties"}, [{"model": "a/b", "role": "base"}], method_summary="", method_reference=""
        )
        print(card.data.base_model_relation)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(site)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    module_file, *relations = result.stdout.split()
    assert Path(module_file).is_relative_to(site) and not (site / "model_cards").exists()
    assert relations == ["finetune", "adapter", "merge"]


def test_merged_card_recipe_reloads_as_the_same_merge_config():
    from saft_hf.merging.config import MergeConfig

    config = MergeConfig.from_dict(recipe())
    card = merged_card(config.to_dict(), SOURCES, SEARCH)

    assert MergeConfig.from_dict(yaml_block(card)) == config
