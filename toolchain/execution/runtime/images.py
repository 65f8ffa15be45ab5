"""Real images for parity checks of vision models: matplotlib's sample images, or a folder of images.

Found without importing matplotlib (plan time hashes the files into validate's key); decoded with
Pillow and preprocessed with transformers' ViTImageProcessor sized from the model's config.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
MATPLOTLIB = "matplotlib:sample_data"


def is_image_source(spec: str, base: Path) -> bool:
    """Whether validate's `corpus` names images (matplotlib's samples or a folder), not text."""
    return spec.startswith("matplotlib:") or (base / spec).is_dir()


def image_files(spec: str, base: Path) -> list[Path]:
    """The image files of a source, sorted by name; FileNotFoundError / ValueError if there are none."""
    if spec.startswith("matplotlib:"):
        if spec != MATPLOTLIB:
            raise ValueError(f"unknown matplotlib image source '{spec}' (known: {MATPLOTLIB})")
        found = importlib.util.find_spec("matplotlib")
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError("the matplotlib package (which ships the sample images) is not installed")
        folder = Path(found.submodule_search_locations[0]) / "mpl-data" / "sample_data"
    else:
        folder = (base / spec).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def processor(config):
    """ViTImageProcessor for a model config: resized to its image_size, ImageNet-standard mean/std 0.5
    (transformers 5 names the Pillow backend ViTImageProcessorPil; the default one needs torchvision)."""
    import transformers

    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    size = int(config.image_size)
    return cls(size={"height": size, "width": size})


def pixel_values(files: list[Path], config):
    """(n, channels, size, size) float32 pixel values of the images, RGB."""
    import numpy as np
    from PIL import Image

    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return np.asarray(processor(config)(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)
