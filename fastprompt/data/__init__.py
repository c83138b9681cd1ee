"""Medical image data: decoding, folder/CSV datasets, high-resolution transforms, few-shot splits."""

from fastprompt.data.cache import FeatureCache, FeatureDataset, hf_feature_transform, preload
from fastprompt.data.datasets import (
    ClassMismatchError,
    CsvDataset,
    EmptyClassWarning,
    ImageFolderDataset,
    SkippedImageWarning,
    SplitLayoutError,
    UnknownClassWarning,
    split_folders,
    split_layout_error,
    write_unreadable,
)
from fastprompt.data.images import IMAGE_EXTENSIONS, CorruptImageError, TransparentImageWarning, load_image
from fastprompt.data.splits import make_few_shot_splits, train_val_split
from fastprompt.data.transforms import AUGMENTATIONS, build_transforms, transforms_for_model

__all__ = [
    "AUGMENTATIONS",
    "IMAGE_EXTENSIONS",
    "ClassMismatchError",
    "CorruptImageError",
    "CsvDataset",
    "EmptyClassWarning",
    "FeatureCache",
    "FeatureDataset",
    "ImageFolderDataset",
    "SkippedImageWarning",
    "SplitLayoutError",
    "TransparentImageWarning",
    "UnknownClassWarning",
    "build_transforms",
    "hf_feature_transform",
    "load_image",
    "make_few_shot_splits",
    "preload",
    "split_folders",
    "split_layout_error",
    "train_val_split",
    "transforms_for_model",
    "write_unreadable",
]
