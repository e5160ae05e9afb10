"""Labelled image sets: a folder of class folders (``class/NNNN.jpg``) or a tar file of one,
a name resolved in the shared data folder (``cifar10-test``), optionally sliced per class.

The class index is the position of the class name in sorted order (as in CIFAR-10). A
slice ``[a:b]`` applies within each class, to its files in sorted order, so every slice is
balanced: ``cifar10-test[:5]`` is 5 images of each class, ``cifar10-test[50%:]`` the second
half of each class. An image that does not decode is skipped, counted and named in the
report, never silently dropped.
"""
from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from arfuse.errors import ArfuseError, did_you_mean
from arfuse.paths import shared_data_root

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

# name -> (path under the shared data folder, what it is)
NAMED_IMAGES: dict[str, tuple[str, str]] = {
    "cifar10-test": ("vision/cifar10-test-jpg.tar", "CIFAR-10 test set, 10,000 JPEG re-encoded images"),
}

_SLICE = re.compile(r"^(?P<base>.*?)\[(?P<a>[^:\]]*):(?P<b>[^:\]]*)\]$")


@dataclass
class ImageDataset:
    """Encoded images with integer labels; decoding happens batch by batch when scoring."""

    name: str                        # the spec as given, slice included
    classes: tuple[str, ...]         # sorted class names; label i is classes[i]
    files: list[str]                 # where each image came from (relative to the source)
    labels: list[int]
    blobs: list[bytes]               # the encoded image files
    source: str
    description: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of images that do not decode
    sizes: list[tuple[int, int]] = field(default_factory=list)    # (width, height) of each kept image
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def content_hash(self) -> str:
        """SHA-256 over the class names and every kept (file, label, bytes), in order."""
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode())
        for f, y, b in zip(self.files, self.labels, self.blobs):
            h.update(f"\0{f}\0{y}\0{len(b)}\0".encode())
            h.update(b)
        return h.hexdigest()

    def decode(self, i: int):
        """The ``i``-th image as an RGB PIL image."""
        return _decode(self.blobs[i])

    def subset(self, idx, name: str) -> "ImageDataset":
        idx = list(idx)
        return ImageDataset(name, self.classes, [self.files[i] for i in idx], [self.labels[i] for i in idx],
                            [self.blobs[i] for i in idx], self.source, self.description, list(self.skipped),
                            [self.sizes[i] for i in idx], dict(self.meta))

    def summary(self) -> dict:
        return {"name": self.name, "source": self.source, "images": len(self), "classes": len(self.classes),
                "skipped": len(self.skipped), "skipped_files": [f"{f} ({why})" for f, why in self.skipped[:20]],
                "sha256": self.content_hash}


def _decode(blob: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(blob))
    im.load()
    return im.convert("RGB")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not Path(name).name.startswith(".")


def _read_folder(root: Path) -> dict[str, list[tuple[str, bytes]]]:
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.iterdir() if f.is_file() and _is_image(f.name))
        by_class[d.name] = [(f"{d.name}/{f.name}", f.read_bytes()) for f in files]
    return by_class


def _read_tar(path: Path) -> dict[str, list[tuple[str, bytes]]]:
    by_path: dict[str, bytes] = {}
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile() and _is_image(m.name):
                    by_path[m.name.lstrip("./")] = tf.extractfile(m).read()
    except tarfile.TarError as e:
        raise ArfuseError(f"{path} is not a readable tar file ({e}): give a .tar of class folders or a folder") from None
    # the class is the image's parent folder (any top folders such as ``test/`` above it are ignored)
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    for name in sorted(by_path):
        parts = name.split("/")
        if len(parts) < 2:
            raise ArfuseError(f"{path}: image {name} is not inside a class folder: lay the archive out as class/NNNN.jpg")
        by_class.setdefault(parts[-2], []).append((name, by_path[name]))
    return by_class


def _bound(tok: str, n: int, spec: str) -> int | None:
    tok = tok.strip()
    if tok == "":
        return None
    try:
        if tok.endswith("%"):
            frac = float(tok[:-1]) / 100
            if not 0 <= frac <= 1:
                raise ValueError
            return int(round(frac * n))
        v = int(tok)
    except ValueError:
        raise ArfuseError(f"bad slice bound {tok!r} in {spec!r}: use an image count per class or a percentage "
                          "like 50%") from None
    return max(0, min(n, v if v >= 0 else n + v))


def resolve_image_source(base: str) -> tuple[Path, str]:
    """The folder or tar file of a name or path, and its description."""
    p = Path(base).expanduser()
    if p.exists():
        return p, ""
    if base in NAMED_IMAGES:
        rel, desc = NAMED_IMAGES[base]
        root = shared_data_root()
        if root is None or not (root / rel).exists():
            raise ArfuseError(f"image set {base!r} needs the shared data folder ({rel}): set ARFUSE_DATA to it, "
                              "or give a folder of class folders")
        return root / rel, desc
    if "/" in base or "." in Path(base).name:
        raise ArfuseError(f"image data {base} does not exist: check the path")
    raise ArfuseError(f"unknown image set {base!r}: give a folder of class folders, a .tar of one, or one of "
                      f"{', '.join(NAMED_IMAGES)}." + did_you_mean(base, NAMED_IMAGES))


def is_image_data(spec: str) -> bool:
    """Whether ``spec`` names an image set (a known name, a tar, or a folder of class folders)."""
    m = _SLICE.match(spec)
    base = m["base"] if m and not Path(spec).exists() else spec
    if base in NAMED_IMAGES:
        return True
    p = Path(base).expanduser()
    if p.is_file():
        return p.name.lower().endswith(TAR_SUFFIXES)
    return p.is_dir() and any(c.is_dir() for c in p.iterdir())


def load_image_dataset(spec: str, classes: tuple[str, ...] | list[str] | None = None) -> ImageDataset:
    """Labelled images of a spec: name or path, optional per-class slice ``[a:b]``.

    With ``classes`` (the model's class names), the data must hold exactly those class
    folders: a missing or unknown folder is an error, since labels are positions in that list.
    """
    base, a_tok, b_tok = spec, None, None
    m = _SLICE.match(spec)
    if m and not Path(spec).exists():
        base, a_tok, b_tok = m["base"], m["a"], m["b"]
    path, description = resolve_image_source(base)
    if path.is_dir():
        by_class = _read_folder(path)
        if len(by_class) == 1 and not next(iter(by_class.values())):  # one wrapper folder (test/...)
            by_class = _read_folder(path / next(iter(by_class)))
    elif path.name.lower().endswith(TAR_SUFFIXES):
        by_class = _read_tar(path)
    else:
        raise ArfuseError(f"image data {path} is neither a folder nor a tar file: give a folder of class folders "
                          "(class/NNNN.jpg) or a .tar of one")
    names = tuple(sorted(by_class))
    if not names or not any(by_class.values()):
        raise ArfuseError(f"no images in {path}: lay the images out as class/NNNN.jpg "
                          f"({', '.join(IMAGE_EXTS)})")
    empty = [c for c in names if not by_class[c]]
    if classes is not None:
        want = tuple(classes)
        missing = [c for c in want if c not in by_class or not by_class[c]]
        extra = [c for c in names if c not in want]
        if missing:
            raise ArfuseError(f"class folder{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)} "
                              f"missing from {path} (or holding no images): the model predicts {len(want)} classes "
                              f"({', '.join(want)}) and labels are positions in that list; add the folder, or use a "
                              "model trained on the classes present")
        if extra:
            raise ArfuseError(f"{path} has class folder{'s' if len(extra) > 1 else ''} {', '.join(repr(c) for c in extra)} "
                              f"that the model does not predict ({', '.join(want)}): remove them or use another model")
        names = want
    elif empty:
        raise ArfuseError(f"class folder{'s' if len(empty) > 1 else ''} {', '.join(repr(c) for c in empty)} in {path} "
                          "hold no images: add images or remove the folder (labels are positions among the folders)")
    files, labels, blobs, skipped, sizes = [], [], [], [], []
    for y, c in enumerate(names):
        items = by_class[c]
        n = len(items)
        a = _bound(a_tok, n, spec) if a_tok is not None else None
        b = _bound(b_tok, n, spec) if b_tok is not None else None
        for f, blob in items[slice(a, b)]:
            try:
                size = _decode(blob).size
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                skipped.append((f, f"{type(e).__name__}: {e}"))
                continue
            files.append(f)
            labels.append(y)
            blobs.append(blob)
            sizes.append(size)
    if not labels:
        raise ArfuseError(f"image set {spec!r} holds no decodable image ({len(skipped)} failed to decode, e.g. "
                          f"{skipped[0][0] if skipped else '-'}): check the slice and the files")
    return ImageDataset(spec, names, files, labels, blobs, str(path.resolve()), description, skipped, sizes,
                        {"slice": None if a_tok is None else f"[{a_tok}:{b_tok}] per class"})
