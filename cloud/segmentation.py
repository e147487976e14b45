"""Segmentation folders: ``DIR/images/NAME.png|jpg``, ``DIR/masks/NAME.png``, ``DIR/classes.txt``.

A mask is an 8-bit label map of its image's size: each value a class index (the line of ``classes.txt``,
counted from 0), 255 = ignore (VOC and ADE20K tooling write them so). Extraction feeds the image through the
backbone's usual transform and the mask through the same geometry (every resize and crop, nearest neighbour
so labels never blend), then samples the mask at the set's label resolution, a small multiple of the token
grid (``formats/SPEC.md`` §14).

Every pair is checked when the folder is opened, before any model loads: an image without its mask, a mask
without its image, a mask of another size, a mask that is not one byte a pixel and a label that names no
class stop the run with one line naming the file. A bad mask is never skipped the way an undecodable image
is, since a set silently missing its hard cases would score better than it should.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mist.formats.manifest import IGNORE_INDEX, check_classes

from .datasets import ImageDataset, Source, _files_identity, _image_extensions
from .errors import CloudError

CLASSES_FILE = "classes.txt"
MASK_MODES = ("L", "P")  # one byte a pixel; a palette image's indices are its labels, as in VOC
DEFAULT_LABEL_MULTIPLE = 4  # a 14x14 grid gets 56x56 label maps: 3,136 bytes an image


def is_segmentation_folder(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "masks").is_dir() and (path / CLASSES_FILE).is_file()


def read_classes(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CloudError(f"{path}: unreadable class list ({e.__class__.__name__})") from None
    classes = [line.strip() for line in lines if line.strip()]
    if not classes:
        raise CloudError(f"{path}: names no classes (one class name a line, in label order)")
    if len(classes) >= IGNORE_INDEX:
        raise CloudError(f"{path}: {len(classes)} classes; a mask holds at most {IGNORE_INDEX} "
                         f"(one byte a pixel, {IGNORE_INDEX} = ignore)")
    check_classes(classes, lambda why: CloudError(f"{path}: the class names {why}"))
    return classes


def open_segmentation(root: Path) -> Source:
    """The pairs of a segmentation folder, in name order, every mask checked against its image."""
    classes = read_classes(root / CLASSES_FILE)
    extensions = _image_extensions()
    images = {p.stem: p for p in sorted((root / "images").iterdir())
              if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")}
    masks = {p.stem: p for p in sorted((root / "masks").iterdir())
             if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith(".")}
    for name in sorted(set(masks) - set(images)):
        raise CloudError(f"{masks[name]}: a mask without its image (no {root / 'images' / name}.*)")
    for name in sorted(set(images) - set(masks)):
        raise CloudError(f"{images[name]}: an image without its mask (no {root / 'masks' / name}.png)")
    if not images:
        raise CloudError(f"--data {root}: no image files under {root / 'images'}")
    names = sorted(images)
    for name in names:
        check_mask(masks[name], images[name], len(classes))
    paths, mask_paths = [images[n] for n in names], [masks[n] for n in names]
    labels = np.full(len(names), -1, np.int64)  # a row's targets are its label map, not one class
    identity = _files_identity([*paths, *mask_paths], [-1] * (2 * len(names)), root)
    return Source("segmentation", str(root), classes, labels, identity, paths=paths, masks=mask_paths)


def check_mask(mask_path: Path, image_path: Path, num_classes: int) -> None:
    """Refuse a mask that cannot be this image's label map (one line, naming the mask)."""
    try:
        with Image.open(image_path) as image:
            size = image.size
        with Image.open(mask_path) as mask:
            mode, mask_size = mask.mode, mask.size
            if mode not in MASK_MODES:
                raise CloudError(f"{mask_path}: mode {mode}; a mask is an 8-bit label map (mode L or P)")
            values = np.asarray(mask)
    except CloudError:
        raise
    except Exception as e:  # not an image, truncated, ...
        raise CloudError(f"{mask_path}: unreadable mask or image ({e.__class__.__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    if mask_size != size:
        raise CloudError(f"{mask_path}: {mask_size[0]}x{mask_size[1]} pixels, its image {image_path.name} is "
                         f"{size[0]}x{size[1]}; a mask labels its image pixel for pixel")
    bad = (values >= num_classes) & (values != IGNORE_INDEX)
    if bad.any():
        value = int(values[bad][0])
        raise CloudError(f"{mask_path}: label {value} names no class ({num_classes} in {CLASSES_FILE}; "
                         f"{IGNORE_INDEX} = ignore)")


def load_mask(source: Source, i: int) -> Image.Image:
    with Image.open(source.masks[i]) as mask:
        mask.load()
        # A palette image's indices are its labels: keep them, never map them to colours.
        return mask.copy() if mask.mode == "L" else Image.fromarray(np.asarray(mask), "L")


def mask_transform(image_transform: Callable) -> Callable[[Image.Image], np.ndarray]:
    """The geometry of ``image_transform`` (a torchvision Compose of resizes and crops, then tensor steps),
    redone with nearest-neighbour sampling for an 8-bit mask: returns (H, W) uint8 at the model's input size."""
    # Imported here, not at the top: torchvision costs every `mist-cloud` start-up about 1.7 s otherwise.
    from torchvision.transforms import InterpolationMode

    steps = []
    for step in getattr(image_transform, "transforms", [image_transform]):
        name = type(step).__name__
        if name in ("MaybeToTensor", "ToTensor", "Normalize", "MaybeNormalize", "ConvertImageDtype"):
            continue  # pixel values only, no geometry
        if not hasattr(step, "interpolation") and name not in ("CenterCrop", "CenterCropOrPad"):
            raise CloudError(f"the backbone's preprocessing step {name} has no mask counterpart mist knows; "
                             "segmentation needs resizes and centre crops")
        nearest = copy.copy(step)
        if hasattr(nearest, "interpolation"):
            nearest.interpolation = InterpolationMode.NEAREST
        if hasattr(nearest, "fill"):
            nearest.fill = IGNORE_INDEX  # padding labels nothing
        steps.append(nearest)

    def apply(mask: Image.Image) -> np.ndarray:
        for step in steps:
            mask = step(mask)
        return np.asarray(mask, dtype=np.uint8)

    return apply


def sample_labels(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, H, W) label maps at input resolution -> (B, h, w), nearest neighbour: output pixel i reads input
    row floor((i + 0.5) * H / h), the centre of the input block it covers."""
    _, H, W = masks.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * H / size[0]).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * W / size[1]).astype(np.int64), W - 1)
    return np.ascontiguousarray(masks[:, rows][:, :, cols])


class SegmentationDataset(ImageDataset):
    """Pairs as one (4, H, W) tensor, the image's three channels and its mask's labels as a fourth, so the
    batching, resume and skip logic of extraction carry them unchanged; ``split_batch`` takes them apart."""

    def __init__(self, source: Source, ids: np.ndarray, image_transform: Callable):
        masks = mask_transform(image_transform)

        def both(i: int) -> torch.Tensor:
            image = image_transform(source.load(i))
            labels = torch.from_numpy(masks(load_mask(source, i)).astype(np.float32))
            if labels.shape != image.shape[1:]:
                raise CloudError(f"{source.masks[i]}: transformed to {tuple(labels.shape)}, the image to "
                                 f"{tuple(image.shape[1:])}")
            return torch.cat([image, labels[None]])

        super().__init__(source, ids, transform=None)
        self._both = both

    def __getitem__(self, j: int) -> tuple[torch.Tensor | None, int, int, str]:
        i = int(self.ids[j])
        try:
            return self._both(i), -1, i, ""
        except Exception as e:
            reason = (str(e).splitlines() or [""])[0]
            return None, -1, i, f"{e.__class__.__name__}: {reason}"


def split_batch(images: torch.Tensor, label_size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """A batch of SegmentationDataset tensors -> (images (B, 3, H, W), label maps (B, h, w) uint8)."""
    masks = images[:, 3].numpy().astype(np.uint8)
    return images[:, :3].contiguous(), sample_labels(masks, label_size)
