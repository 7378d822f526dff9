"""An independent transcription of the reference InternVL preprocessing.

Written from OpenGVLab's ``load_image`` / ``dynamic_preprocess`` / ``find_closest_aspect_ratio`` (the
chat model code on the model hubs) and kept as close to it as Python allows: Pillow decode and
``convert('RGB')``, the float64 aspect-ratio walk over a set sorted by tile count, one resize, tiles cut
with ``Image.crop``, the thumbnail last. torchvision is not a dependency, so ``ToTensor`` + ``Normalize``
are written with numpy in the same float32 operations (``x / 255``, then ``(x - mean) / std``).

It shares no code with ``services.preprocess``: the tests check our pipeline against it, and the demo
model is trained on its tiles, so a bug in our own tiling shows up as a wrong answer instead of being
learned.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(ratios, key=lambda x: x[0] * x[1])


def reference_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448):
    return find_closest_aspect_ratio(
        width / height, target_ratios(min_num, max_num), width, height, image_size
    )


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    target_aspect_ratio = reference_grid(orig_width, orig_height, min_num, max_num, image_size)

    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    if len(processed_images) != blocks:
        raise RuntimeError("tile count mismatch")
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def reference_tile_images(data: bytes, min_num=1, max_num=12, image_size=448, use_thumbnail=True):
    """The reference's tiles as PIL images (decode, convert, dynamic_preprocess)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return dynamic_preprocess(image, min_num, max_num, image_size, use_thumbnail)


def reference_tiles(data: bytes, min_num=1, max_num=12, image_size=448, use_thumbnail=True) -> np.ndarray:
    """The reference's tiles as one uint8 (N, S, S, 3) array."""
    tiles = reference_tile_images(data, min_num, max_num, image_size, use_thumbnail)
    return np.stack([np.asarray(t) for t in tiles])


def to_tensor_normalize(tile: Image.Image) -> np.ndarray:
    """``Normalize(MEAN, STD)(ToTensor()(tile))`` in numpy: (3, S, S) float32."""
    x = np.asarray(tile, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # HWC -> CHW
    x = x / np.float32(255)  # ToTensor: img.float().div(255)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    return (x - mean) / std  # Normalize: tensor.sub_(mean).div_(std)


def reference_load_image(data: bytes, input_size=448, max_num=12) -> np.ndarray:
    """``load_image``: tiles, each ToTensor + Normalize'd, stacked to float32 (N, 3, S, S)."""
    tiles = reference_tile_images(data, 1, max_num, input_size, True)
    return np.stack([to_tensor_normalize(t) for t in tiles])
