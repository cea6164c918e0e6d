"""Data layer: Flowers-102 reader/downloader, splits, image folders, safe decoding.

Importing this package has no side effects (no folders created, no logging configured).
"""

from .decode import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, DataError, ImageDecodeError, open_image
from .download import VGG_BASE_URL, VGG_FILES, download_flowers102, md5sum
from .folder import ImageFolder, LabeledImages, list_images, load_image_folder
from .splits import SPLIT_KINDS, load_split, make_split, save_split, subset_classes
from .synth import write_synthetic
from .vgg import VGGFlowers, class_names, load_vgg, resolve_data_root, verify_report

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "SPLIT_KINDS",
    "VGG_BASE_URL",
    "VGG_FILES",
    "DataError",
    "ImageDecodeError",
    "ImageFolder",
    "LabeledImages",
    "VGGFlowers",
    "class_names",
    "download_flowers102",
    "list_images",
    "load_image_folder",
    "load_split",
    "load_vgg",
    "make_split",
    "md5sum",
    "open_image",
    "resolve_data_root",
    "save_split",
    "subset_classes",
    "verify_report",
    "write_synthetic",
]
