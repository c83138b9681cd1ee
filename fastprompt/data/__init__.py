"""Medical image data: decoding, folder/CSV datasets, high-resolution transforms, few-shot splits."""

from fastprompt.data.cache import FeatureCache, FeatureDataset, preload
from fastprompt.data.datasets import CsvDataset, EmptyClassWarning, ImageFolderDataset, SkippedImageWarning
from fastprompt.data.images import IMAGE_EXTENSIONS, CorruptImageError, load_image
from fastprompt.data.splits import make_few_shot_splits, train_val_split
from fastprompt.data.transforms import AUGMENTATIONS, build_transforms, transforms_for_model

__all__ = [
    "AUGMENTATIONS",
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "CsvDataset",
    "EmptyClassWarning",
    "FeatureCache",
    "FeatureDataset",
    "ImageFolderDataset",
    "SkippedImageWarning",
    "build_transforms",
    "load_image",
    "make_few_shot_splits",
    "preload",
    "train_val_split",
    "transforms_for_model",
]
