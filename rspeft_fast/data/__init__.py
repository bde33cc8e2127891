"""Embedded data: a small procedurally generated scene-classification set that needs no download.

:func:`make_textures` draws ``per_class`` images of each of :data:`CLASSES` (oriented stripes at two
frequencies, checkerboards, blobs, dot grids), each with a random phase, frequency jitter, random
foreground/background colours (so colour says nothing about the class) and pixel noise. It is
deterministic for a given seed. :func:`write_image_folder` writes it in the layout of UCM /
NWPU-RESISC45 / AID (one folder per class) for trying the folder loader.
"""
from .textures import CLASSES, TextureScenes, make_textures, write_image_folder

__all__ = ["CLASSES", "TextureScenes", "make_textures", "write_image_folder"]
