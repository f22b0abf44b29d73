"""SAFTTrainer's model card, the files saved beside the weights, and pushes to the local Hub server."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from test_trainer import clip_samples, t5_samples, tiny_clip, tiny_t5
from transformers import T5ForConditionalGeneration

from saft_hf import SAFTConfig, SAFTTrainer
from saft_hf.models.clip import HEAD_FILE
from saft_hf.modes import apply_finetune_mode

TOKEN = "hf_" + "Xy7" * 11 + "q"  # shaped like a user access token
SAFT_TITLE = "Mitigating Parameter Interference in Model Merging via Sharpness-Aware Fine-Tuning"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def local_base(tmp_path):
    """A tiny T5 loaded from a local folder, as a fine-tune of a converted or downloaded base model is."""
    folder = tmp_path / "models" / "tiny-t5"
    tiny_t5().save_pretrained(folder)
    return T5ForConditionalGeneration.from_pretrained(folder)


def config(output_dir, **overrides) -> SAFTConfig:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return SAFTConfig(**(settings | overrides))


def table(card: ModelCard, header: str) -> dict[str, list[str]]:
    lines = card.text.splitlines()
    rows = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        name, *values = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows[name] = values
    return rows


def test_a_training_run_writes_the_card(tmp_path, local_base):
    output_dir = tmp_path / "run" / "rte-saft"
    args = config(
        output_dir, hub_token=TOKEN, gradient_accumulation_steps=2, sam_eta=0.0, save_strategy="steps", save_steps=1
    )
    trainer = SAFTTrainer(model=local_base, args=args, train_dataset=t5_samples(8), eval_dataset=t5_samples(4, 2))
    trainer.add_model_file(lambda folder: (folder / "extra.json").write_text("{}"))
    trainer.train()
    assert (output_dir / "README.md").is_file(), "written with each checkpoint, as TRL's trainers do"
    trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card(dataset_name="nyu-mll/glue", task="glue-rte", tags=["glue"])

    assert (output_dir / "extra.json").is_file() and (output_dir / "checkpoint-1" / "extra.json").is_file()
    text = (output_dir / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.tags == ["saft_hf", "sharpness-aware-minimization", "asam", "glue"]
    assert card.data.datasets == ["nyu-mll/glue"] and card.data.library_name == "transformers"
    assert card.data.get("base_model") is None, "a local base is no Hub lineage"
    assert "# rte-saft" in text.splitlines()
    assert "fine-tuned version of tiny-t5 (local folder) for glue-rte" in text
    settings = table(card, "| setting | value | meaning |")
    assert {name: values[0] for name, values in settings.items()} == {
        "sam_mode": "asam",
        "sam_rho": "0.5",
        "sam_eta": "0",
        "sam_adaptive_scope": "all",
        "sam_interval": "1",
        "sam_sync_perturbation": "False",
    }
    hyper = {name: values[0] for name, values in table(card, "| hyper-parameter | value |").items()}
    assert hyper["learning_rate"] == "0.001" and hyper["gradient_accumulation_steps"] == "2"
    assert hyper["total_train_batch_size"] == "4" and hyper["training_steps"] == "2"
    assert hyper["optimizer"] == str(args.optim.value) and hyper["lr_scheduler_type"] == "constant"
    metrics = table(card, "| metric | value |")
    assert set(metrics) == {"eval_loss"}
    assert float(metrics["eval_loss"][0]) == pytest.approx(trainer.state.log_history[-1]["eval_loss"], rel=1e-5)
    assert f"title     = {{{SAFT_TITLE}}}" in text and "Lee, Yeoreum and Jung, Jinwook and Baik, Sungyong" in text
    assert "booktitle = {International Conference on Learning Representations (ICLR)}" in text
    assert str(tmp_path) not in text and TOKEN not in text and "hub_token" not in text


def test_plain_fine_tuning_card(tmp_path):
    trainer = SAFTTrainer(
        model=tiny_t5(), args=config(tmp_path / "plain", sam_mode="none"), train_dataset=t5_samples(4)
    )
    trainer.train()
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "plain" / "README.md")
    assert card.data.tags == ["saft_hf"]
    assert "without a sharpness-aware step" in card.text
    assert "a `T5ForConditionalGeneration` built from its configuration" in card.text
    assert table(card, "| setting | value | meaning |").keys() == {"sam_mode"}
    assert trainer.model.model_tags == ["saft_hf"]


def test_create_model_card_refuses_unknown_arguments(tmp_path):
    trainer = SAFTTrainer(model=tiny_t5(), args=config(tmp_path))
    trainer.create_model_card(finetuned_from="google/flan-t5-base", tasks="text2text-generation", dataset_tags="x")
    assert ModelCard.load(tmp_path / "README.md").data.base_model == ["google/flan-t5-base"]
    with pytest.raises(TypeError, match="datset"):
        trainer.create_model_card(datset="typo")


@pytest.fixture
def transformers_on_local_hub(hub_server, monkeypatch):
    """transformers keeps one shared `HfApi` (endpoint fixed when built): make it build a new one."""
    monkeypatch.setattr("transformers.utils.hub._hf_api", None)
    return hub_server


def remote_files(hub, repo_id: str) -> dict[str, bytes]:
    return {path: stored.content for path, stored in hub.state.repos[repo_id].resolve("main").files.items()}


def test_push_to_hub_uploads_the_card(tmp_path, transformers_on_local_hub, local_base):
    hub = transformers_on_local_hub
    output_dir = tmp_path / "out"
    args = config(output_dir, push_to_hub=True, hub_model_id="org/saft-t5", hub_token=hub.token)
    trainer = SAFTTrainer(model=local_base, args=args, train_dataset=t5_samples(4))
    trainer.train()
    (output_dir / "notes.txt").write_text("written by the caller before the push")
    trainer.push_to_hub(dataset_name="nyu-mll/glue", task="glue-rte")

    files = remote_files(hub, "org/saft-t5")
    assert {"README.md", "model.safetensors", "config.json", "notes.txt"} <= set(files)
    assert files["README.md"] == (output_dir / "README.md").read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert card.data.tags == ["saft_hf", "sharpness-aware-minimization", "asam"]
    assert 'AutoModel.from_pretrained("org/saft-t5")' in card.text and "# saft-t5" in card.text
    assert hub.token not in card.text and str(tmp_path) not in card.text


def test_lora_push_includes_the_zero_shot_head(tmp_path, transformers_on_local_hub):
    # What recipes/finetune.py does with --push_to_hub: the head is registered before `save_model`, whose push then
    # carries it (it used to be written after the push).
    hub = transformers_on_local_hub
    classifier = tiny_clip()
    model = apply_finetune_mode(classifier, "lora", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    args = config(tmp_path / "out", push_to_hub=True, hub_model_id="org/clip-lora", hub_token=hub.token)
    trainer = SAFTTrainer(model=model, args=args, train_dataset=clip_samples(4))
    trainer.add_model_file(lambda folder: classifier.head.save(folder / HEAD_FILE))
    trainer.train()
    trainer.save_model()

    files = remote_files(hub, "org/clip-lora")
    assert {HEAD_FILE, "adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files)
    assert files[HEAD_FILE] == (tmp_path / "out" / HEAD_FILE).read_bytes()
    metadata = yaml.safe_load(re.match(r"---\n(.*?)\n---", files["README.md"].decode(), re.DOTALL).group(1))
    assert metadata["library_name"] == "peft" and "lora" in metadata["tags"]
    assert str(tmp_path) not in files["README.md"].decode()
