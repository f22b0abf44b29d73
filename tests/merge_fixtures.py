"""Tiny models for the task-vector and merge tests: built from configs (hidden sizes 32-64), perturbed
deterministically to stand in for fine-tunes, and saved with ``save_pretrained`` like real checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=64,
    max_position_embeddings=16,
)


def _seeded(builder, seed: int):
    torch.manual_seed(seed)
    return builder().eval()


def tiny_clip_vision(seed: int = 0) -> CLIPVisionModel:
    return _seeded(lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)), seed)


def tiny_clip(seed: int = 0) -> CLIPModel:
    return _seeded(lambda: CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)), seed)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    config = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)
    return _seeded(lambda: T5ForConditionalGeneration(config), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    return _seeded(lambda: GPT2LMHeadModel(config), seed)


def finetune_like(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A copy whose floating-point parameters moved by seeded noise: a stand-in for a fine-tune."""
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return tuned


def save(model: torch.nn.Module, folder: Path, *, processor: bool = False, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    if processor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def clip_vision_family(root: Path, count: int, **save_kwargs) -> tuple[Path, list[Path]]:
    """A tiny CLIP vision base and ``count`` fine-tunes of it, saved under ``root``."""
    base = tiny_clip_vision()
    base_dir = save(base, root / "base", processor=True, **save_kwargs)
    tuned = [save(finetune_like(base, seed=index + 1), root / f"ft{index}", **save_kwargs) for index in range(count)]
    return base_dir, tuned
