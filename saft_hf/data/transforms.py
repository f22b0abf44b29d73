"""CLIP image preprocessing with PIL and torch only (no torchvision).

Evaluation: resize (shortest edge, aspect kept), centre crop, rescale to [0, 1], normalise — the steps and the
arithmetic of transformers' `CLIPImageProcessor` (PIL backend), so the tensors are identical to the processor's.
Training: a random resized crop (Szegedy et al. 2015, as torchvision's `RandomResizedCrop` draws it) to the model's
input size, then the same rescale and normalisation. The default crop scale (0.9, 1.0) and aspect ratio
(3/4, 4/3) are open_clip's training transform, which the task-arithmetic fine-tunes (Ilharco et al. 2023) and the
SAFT paper trained with.

Every size, the resampling filter, mean and std come from the model's image processor config
(`CLIPImageTransform.from_processor`), so one saved `preprocessor_config.json` drives training and evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

DEFAULT_TRAIN_SCALE = (0.9, 1.0)
DEFAULT_TRAIN_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
_NORMALIZATION_TABLES: dict = {}


def _size_field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


@dataclass(frozen=True)
class CLIPImageTransform:
    """Images to normalised `(3, height, width)` float tensors, for evaluation or (randomly cropped) training.

    Args:
        shortest_edge: evaluation resize: the shorter side becomes this many pixels, aspect ratio kept. Exclusive
            with `resize_to`.
        resize_to: evaluation resize to exactly `(height, width)` instead.
        crop_size: `(height, width)` of the centre crop (evaluation) and of the random resized crop (training);
            None: no crop at evaluation, and training crops to the evaluation resize's output size.
        mean, std: per-channel normalisation after rescaling.
        rescale_factor: pixel values are multiplied by this (1/255: uint8 to [0, 1]).
        resample: PIL resampling filter (CLIP: bicubic).
        train_scale: range of the crop's area as a fraction of the image's area (training).
        train_ratio: range of the crop's aspect ratio, width / height (training), sampled log-uniformly.
    """

    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    crop_size: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    train_scale: tuple[float, float] = DEFAULT_TRAIN_SCALE
    train_ratio: tuple[float, float] = DEFAULT_TRAIN_RATIO

    def __post_init__(self):
        if (self.shortest_edge is None) == (self.resize_to is None):
            raise ValueError("CLIPImageTransform: set exactly one of shortest_edge and resize_to.")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"CLIPImageTransform: mean and std need 3 channels, got {self.mean} and {self.std}.")
        if not 0 < self.train_scale[0] <= self.train_scale[1] <= 1:
            raise ValueError(
                f"CLIPImageTransform: train_scale must satisfy 0 < low <= high <= 1, got {self.train_scale}."
            )
        if not 0 < self.train_ratio[0] <= self.train_ratio[1]:
            raise ValueError(f"CLIPImageTransform: train_ratio must satisfy 0 < low <= high, got {self.train_ratio}.")

    @classmethod
    def from_processor(cls, image_processor: Any, **overrides) -> CLIPImageTransform:
        """Read sizes, filter, mean and std from a `CLIPImageProcessor` (or a `CLIPProcessor` holding one).

        `overrides` replace fields, e.g. `train_scale=(0.08, 1.0)` for torchvision's default crop scale.
        """
        processor = getattr(image_processor, "image_processor", image_processor)
        missing = [name for name in ("size", "image_mean", "image_std") if getattr(processor, name, None) is None]
        if missing:
            raise ValueError(f"{type(processor).__name__} lacks {missing}: it is not a CLIP-style image processor.")
        if getattr(processor, "do_resize", True) is False or getattr(processor, "do_normalize", True) is False:
            raise ValueError(f"{type(processor).__name__}: do_resize and do_normalize must be on for CLIP inputs.")
        shortest_edge = _size_field(processor.size, "shortest_edge")
        height, width = _size_field(processor.size, "height"), _size_field(processor.size, "width")
        if shortest_edge is None and (height is None or width is None):
            raise ValueError(f"Image processor size {processor.size} has neither shortest_edge nor height/width.")
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", True) else None
        crop_size = (_size_field(crop, "height"), _size_field(crop, "width")) if crop is not None else None
        rescale = getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else 1.0
        resample = getattr(processor, "resample", None)
        values = dict(
            shortest_edge=shortest_edge,
            resize_to=None if shortest_edge is not None else (height, width),
            crop_size=crop_size,
            mean=tuple(float(m) for m in processor.image_mean),
            std=tuple(float(s) for s in processor.image_std),
            rescale_factor=float(rescale),
            resample=int(Image.Resampling.BICUBIC if resample is None else resample),
        )
        return cls(**(values | overrides))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """`(width, height)` after the evaluation resize (transformers' rounding: the long side is truncated)."""
        if self.resize_to is not None:
            return self.resize_to[1], self.resize_to[0]
        short, long = sorted((width, height))
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)

    def output_size(self) -> tuple[int, int] | None:
        """`(height, width)` of every output tensor, or None when evaluation outputs keep the image's aspect."""
        return self.crop_size or self.resize_to

    def evaluation(self, image: Image.Image) -> torch.Tensor:
        """Resize, centre crop (offsets rounded down, as `CLIPImageProcessor` does), rescale, normalise."""
        return self.normalize(self.evaluation_image(image))

    def evaluation_image(self, image: Image.Image) -> Image.Image:
        """The evaluation resize and centre crop, before rescaling (an RGB image)."""
        image = image.convert("RGB").resize(self.resized_size(*image.size), resample=self.resample)
        if self.crop_size is not None:
            crop_height, crop_width = self.crop_size
            if crop_height > image.height or crop_width > image.width:
                raise ValueError(
                    f"Centre crop {self.crop_size} is larger than the resized image {(image.height, image.width)}."
                )
            top, left = (image.height - crop_height) // 2, (image.width - crop_width) // 2
            image = image.crop((left, top, left + crop_width, top + crop_height))
        return image

    def training(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random resized crop to the output size, rescale, normalise. Randomness comes from `generator`, or from
        torch's global RNG (seeded by `set_seed` and per DataLoader worker) when None."""
        box = self.random_crop_box(image.width, image.height, generator)
        return self.normalize(self.training_image(image, box))

    def training_image(self, image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        """The crop `box` = `(top, left, height, width)` of `image` resized to the output size (an RGB image)."""
        image = image.convert("RGB")
        top, left, height, width = box
        output_height, output_width = self.output_size() or self.resized_size(image.width, image.height)[::-1]
        crop = image.crop((left, top, left + width, top + height))
        return crop.resize((output_width, output_height), resample=self.resample)

    def random_crop_box(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """`(top, left, height, width)` of a crop covering a random fraction `train_scale` of the area with a
        log-uniform aspect ratio in `train_ratio`; after 10 misses, the centre crop of the closest allowed ratio."""
        area = width * height
        log_low, log_high = math.log(self.train_ratio[0]), math.log(self.train_ratio[1])
        for _ in range(_CROP_ATTEMPTS):
            u_scale, u_ratio = torch.rand(2, generator=generator).tolist()
            target_area = area * (self.train_scale[0] + u_scale * (self.train_scale[1] - self.train_scale[0]))
            aspect = math.exp(log_low + u_ratio * (log_high - log_low))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
                return top, left, crop_height, crop_width
        ratio = width / height
        if ratio < self.train_ratio[0]:
            crop_width, crop_height = width, round(width / self.train_ratio[0])
        elif ratio > self.train_ratio[1]:
            crop_width, crop_height = round(height * self.train_ratio[1]), height
        else:
            crop_width, crop_height = width, height
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def normalize(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """Rescale and normalise an RGB image, or a uint8 array `(..., height, width, 3)` of them, to a float tensor
        `(..., 3, height, width)`. Element by element (a table of the 256 values per channel), so a stacked batch
        gives the same numbers as one image at a time."""
        pixels = np.moveaxis(np.asarray(image, dtype=np.uint8), -1, -3)
        table = self._normalization_table()
        return torch.from_numpy(np.stack([table[channel][pixels[..., channel, :, :]] for channel in range(3)], axis=-3))

    def _normalization_table(self) -> np.ndarray:
        # transformers' order of operations and dtypes: rescale in float64, cast to float32, then normalise.
        table = _NORMALIZATION_TABLES.get(self)
        if table is None:
            levels = (np.arange(256, dtype=np.uint8).astype(np.float64) * self.rescale_factor).astype(np.float32)
            table = (levels[None, :] - np.array(self.mean, dtype=np.float32)[:, None]) / np.array(
                self.std, dtype=np.float32
            )[:, None]
            table = _NORMALIZATION_TABLES[self] = np.ascontiguousarray(table, dtype=np.float32)
        return table

    def __call__(self, images: Sequence[Image.Image], train: bool = False) -> torch.Tensor:
        """A batch `(n, 3, height, width)`: `training` transforms if `train`, else `evaluation`."""
        transform = self.training if train else self.evaluation
        return torch.stack([transform(image) for image in images])


CACHE_BYTES = 512 * 2**20  # per process; past it, inputs are still built, just no longer kept
_decoded: dict[tuple, Image.Image] = {}
_resized: dict[tuple, np.ndarray] = {}
_cached_bytes = 0


class CachedImageInputs:
    """`CLIPImageTransform` batches from encoded images (a datasets `Image(decode=False)` column: `{"bytes",
    "path"}` dicts), memoised per process: each image is decoded once, and each evaluation image and each training
    crop box (`random_crop_box`) of it is resized once and kept as uint8; rescaling and normalisation run on the
    stacked batch.

    The random crop boxes are drawn exactly as `CLIPImageTransform.training` draws them (same generator, same
    order), so a batch is bit-identical to `transform(decoded_images, train)`: only the repeated decoding and
    resizing is saved. Worth it for small images seen many times (the digits demo: an 8x8 image admits nine crop
    boxes, and every fine-tune, evaluation and merge search of a process reuses them); the cache is shared by every
    instance in the process (keyed by transform, decoding and image) and stops growing at `CACHE_BYTES`.
    """

    def __init__(self, transform: CLIPImageTransform, decode: Callable[[dict], Image.Image], decode_key: Any = None):
        self.transform = transform
        self.decode = decode  # the dataset's `Image` feature's decode_example (mode conversion, EXIF transpose)
        self.decode_key = decode_key  # what distinguishes `decode` from another (the feature's mode)

    def __call__(
        self, encoded: Sequence[dict], train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.transform.normalize(np.stack([self.pixels(item, train, generator) for item in encoded]))

    def pixels(self, encoded: dict, train: bool = False, generator: torch.Generator | None = None) -> np.ndarray:
        """One image's resized (training: randomly cropped) uint8 pixels `(height, width, 3)`."""
        global _cached_bytes
        source = encoded["bytes"] if encoded.get("bytes") is not None else encoded["path"]
        image_key = (self.decode_key, source)
        image = _decoded.get(image_key)
        if image is None:
            image = self.decode(encoded).convert("RGB")
            if _cached_bytes < CACHE_BYTES:
                _decoded[image_key] = image
                _cached_bytes += len(image.tobytes()) + (len(source) if isinstance(source, bytes) else 0)
        box = self.transform.random_crop_box(image.width, image.height, generator) if train else None
        key = (self.transform, image_key, box)
        pixels = _resized.get(key)
        if pixels is None:
            resized = self.transform.training_image(image, box) if train else self.transform.evaluation_image(image)
            pixels = np.asarray(resized, dtype=np.uint8)
            if _cached_bytes < CACHE_BYTES:
                _resized[key] = pixels
                _cached_bytes += pixels.nbytes
        return pixels


def clear_input_cache() -> None:
    """Forget every image `CachedImageInputs` kept in this process."""
    global _cached_bytes
    _decoded.clear()
    _resized.clear()
    _cached_bytes = 0
