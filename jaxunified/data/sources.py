"""Grain random-access sources for user images: a folder tree, or WebDataset tar shards.

Both return the record shape of the shapes dataset — ``{"image": uint8 [R, R, 3], "caption": str}``
— after decoding with PIL, converting any mode (grayscale, palette, RGBA, 16-bit) to RGB,
resizing the short side to ``resolution`` and centre-cropping.

Unreadable images: with ``on_error="skip"`` (default) ``source[i]`` returns ``None``, which
``pipeline.make_loader`` filters out, and the record's name is appended to ``source.skipped``
(a list; ``source.num_skipped`` is its length). Counts live in the process that decoded: with
``worker_count > 0`` grain decodes in child processes, so read them with ``worker_count=0``.
``on_error="raise"`` raises ``ImageDecodeError`` naming the file instead.
"""

from __future__ import annotations

import collections
import glob as globlib
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_ON_ERROR = ("skip", "raise")
_MAX_LOGGED_SKIPS = 10
_MAX_OPEN_SHARDS = 64

log = logging.getLogger(__name__)


class ImageDecodeError(ValueError):
    """An image could not be read or decoded (raised with ``on_error="raise"``)."""


# ----------------------------------------------------------------------------------------------
# Decoding


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # convert("L") clips high-bit-depth values instead of scaling them.
        a = np.asarray(im, np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent pixels often hold arbitrary colour; composite on white as a viewer would.
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def decode_image(data: bytes | str | os.PathLike, resolution: int) -> np.ndarray:
    """Decodes encoded bytes (or a file) to uint8 [resolution, resolution, 3]: short side resized, centre crop."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale ≥ target
        im = _to_rgb(ImageOps.exif_transpose(im))
        w, h = im.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
        return np.asarray(im, np.uint8)


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or not 8 <= resolution <= 4096:
        raise ValueError(f"image resolution {resolution!r} is invalid; set data.resolution to an integer in [8, 4096]")
    return int(resolution)


class _DecodingSource:
    """Shared decode / error policy of the user-data sources."""

    def __init__(self, resolution: int, on_error: str):
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error={on_error!r} is invalid; use one of {_ON_ERROR}")
        self.resolution = _check_resolution(resolution)
        self.on_error = on_error
        self.skipped: list[str] = []

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _record(self, name: str, read: Callable[[], bytes | str], caption: str) -> dict | None:
        try:
            image = decode_image(read(), self.resolution)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, EOFError, zlib.error...
            if self.on_error == "raise":
                raise ImageDecodeError(
                    f"cannot decode image {name}: {type(e).__name__}: {e}. Fix or delete the file, "
                    "or pass on_error='skip' to skip unreadable images"
                ) from e
            self.skipped.append(name)
            if len(self.skipped) <= _MAX_LOGGED_SKIPS:
                log.warning("skipping unreadable image %s (%s: %s)", name, type(e).__name__, e)
            return None
        return {"image": image, "caption": caption}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["skipped"] = []  # a worker process counts its own skips
        return state


def _fingerprint(names: Iterable[str]) -> str:
    # grain validates repr(source) on restore; a digest of the record list (not absolute paths)
    # lets a run resume where the same data is mounted elsewhere, and fails if the data changed.
    digest = hashlib.sha1()
    for name in names:
        digest.update(name.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Image folders


_NAME_KEYS = ("file", "file_name", "filename", "image", "path", "key")
_CAPTION_KEYS = ("caption", "text", "txt")


def _caption_entry(obj, where: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with a file name and a caption, got {obj!r}")
    name = next((obj[k] for k in _NAME_KEYS if k in obj), None)
    caption = next((obj[k] for k in _CAPTION_KEYS if k in obj), None)
    if name is None or caption is None:
        raise ValueError(f"{where}: needs one of the keys {_NAME_KEYS} and one of {_CAPTION_KEYS}; got {sorted(obj)}")
    return str(name), str(caption)


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """Reads a file-name → caption mapping.

    Formats, by extension: ``.json`` — an object ``{"a/b.jpg": "caption", ...}`` or a list of
    objects; ``.jsonl`` — one object per line; anything else (``.tsv``, ``.txt``) — one
    ``name<TAB>caption`` per line. Objects name the file under ``file``/``file_name``/
    ``filename``/``image``/``path``/``key`` and the caption under ``caption``/``text``/``txt``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file {path} does not exist; fix data.captions_file or leave it unset")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        if ext == ".json":
            data = json.load(f)
            if isinstance(data, dict):
                return {str(k): str(v) for k, v in data.items()}
            return dict(_caption_entry(obj, f"{path} item {i}") for i, obj in enumerate(data))
        out = {}
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if ext == ".jsonl":
                name, caption = _caption_entry(json.loads(line), where)
            else:
                if "\t" not in line:
                    raise ValueError(f"{where}: expected 'file name<TAB>caption', got {line[:80]!r}")
                name, caption = line.split("\t", 1)
            out[name] = caption
        return out


def _scan_images(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip .git, .ipynb_checkpoints
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found)  # record i must name the same file on every host and every run


class ImageFolderSource(_DecodingSource):
    """Every .jpg/.jpeg/.png/.webp/.bmp under ``root`` (recursive, sorted, hidden entries skipped).

    Captions: with ``captions_file`` (see ``read_captions``), looked up by the path relative to
    ``root`` (``"dogs/001.jpg"``), then by bare file name; images with no entry get ``""`` and a
    warning with their count. Without one, the caption is the parent folder's path relative to
    ``root`` with ``_``/``/`` read as spaces (``root/golden_retriever/x.jpg`` → "golden retriever"),
    and ``""`` for images directly in ``root``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        captions_file: str | os.PathLike | None = None,
        *,
        resolution: int,
        on_error: str = "skip",
    ):
        super().__init__(resolution, on_error)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"image folder {self.root} does not exist; set data.path to a folder of "
                f"{'/'.join(IMAGE_EXTENSIONS)} images"
            )
        self.files = _scan_images(self.root)
        if not self.files:
            raise ValueError(
                f"image folder {self.root} holds no {'/'.join(IMAGE_EXTENSIONS)} files (searched recursively)"
            )
        self.captions = self._captions(captions_file)
        self._fingerprint = _fingerprint(self.files)

    def _captions(self, captions_file) -> list[str]:
        if captions_file is None:
            return [os.path.dirname(f).replace("/", " ").replace("_", " ") for f in self.files]
        table = read_captions(captions_file)
        by_base = collections.defaultdict(list)
        for key, caption in table.items():
            by_base[os.path.basename(key)].append(caption)
        captions, missing = [], []
        for f in self.files:
            caption = table.get(f)
            if caption is None and len(by_base.get(os.path.basename(f), ())) == 1:
                caption = by_base[os.path.basename(f)][0]
            if caption is None:
                missing.append(f)
            captions.append(caption or "")
        if missing:
            log.warning(
                "%d of %d images in %s have no caption in %s (e.g. %s); their caption is ''",
                len(missing), len(self.files), self.root, captions_file, missing[0],
            )
        return captions

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict | None:
        rel = self.files[index]
        path = os.path.join(self.root, rel)
        return self._record(path, lambda: path, self.captions[index])

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(images={len(self.files)}, fingerprint={self._fingerprint}, "
            f"resolution={self.resolution})"
        )


# ----------------------------------------------------------------------------------------------
# WebDataset tar shards


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Paths from a path, a glob (``data/*.tar``), a brace range (``cc12m-{0000..0099}.tar``) or a list of these."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths: list[str] = []
    for pattern in map(os.fspath, patterns):
        match = _BRACE.search(pattern)
        if match:
            lo, hi = match.group(1), match.group(2)
            width = len(lo)
            head, tail = pattern[: match.start()], pattern[match.end() :]
            expanded = [f"{head}{str(i).zfill(width)}{tail}" for i in range(int(lo), int(hi) + 1)]
            missing = [p for p in expanded if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{len(missing)} shards of {pattern} do not exist, e.g. {missing[0]}")
            paths += expanded
        elif globlib.has_magic(pattern):
            found = sorted(globlib.glob(pattern))
            if not found:
                raise FileNotFoundError(f"no tar shards match {pattern}; set data.path to existing .tar files")
            paths += found
        else:
            if not os.path.isfile(pattern):
                raise FileNotFoundError(f"tar shard {pattern} does not exist; set data.path to existing .tar files")
            paths.append(pattern)
    if not paths:
        raise ValueError("no tar shards given; set data.path to a .tar file, glob or list of them")
    return paths


def _split_member(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is everything up to the first dot of the base name.
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _index_shard(path: str, caption_ext: str) -> list[tuple[str, int, int, int, int]]:
    try:
        tar = tarfile.open(path, mode="r:")  # plain tar only: compressed members have no usable offsets
    except tarfile.ReadError as e:
        raise ValueError(
            f"{path} is not an uncompressed tar file ({e}); random access needs plain .tar shards "
            "(decompress .tar.gz shards first)"
        ) from e
    samples: dict[str, list] = {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_member(member.name)
            entry = samples.setdefault(key, [key, -1, 0, -1, 0])
            if ("." + ext) in IMAGE_EXTENSIONS and entry[1] < 0:
                entry[1:3] = member.offset_data, member.size
            elif ext == caption_ext:
                entry[3:5] = member.offset_data, member.size
    return [tuple(e) for e in samples.values() if e[1] >= 0]


class WebDatasetSource(_DecodingSource):
    """Samples of WebDataset tar shards (``key.jpg|png|webp|…`` + ``key.txt``, the CC12M/LAION layout).

    The constructor reads every shard's member headers once and keeps each sample's byte offsets;
    ``source[i]`` then reads just that sample's bytes (``os.pread``), so access is random and lazy.
    Samples without an image are ignored; samples without a caption get ``""``.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        resolution: int,
        on_error: str = "skip",
        caption_ext: str = "txt",
    ):
        super().__init__(resolution, on_error)
        self.shards = expand_shards(shards)
        keys, rows = [], []
        for shard_index, path in enumerate(self.shards):
            for key, img_off, img_size, txt_off, txt_size in _index_shard(path, caption_ext.lower()):
                keys.append(key)
                rows.append((shard_index, img_off, img_size, txt_off, txt_size))
        if not rows:
            raise ValueError(f"no image samples found in {len(self.shards)} shard(s) starting with {self.shards[0]}")
        self.keys = keys
        self._index = np.asarray(rows, np.int64)  # [N, 5]: compact even for millions of samples
        self._fingerprint = _fingerprint(f"{os.path.basename(s)}" for s in self.shards)
        self._init_handles()

    def _init_handles(self):
        self._lock = threading.Lock()  # grain reads records from a thread pool
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._pid = os.getpid()

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        with self._lock:
            if self._pid != os.getpid():  # forked: start from fresh descriptors of our own
                for inherited in self._fds.values():
                    os.close(inherited)
                self._fds.clear()
                self._pid = os.getpid()
            fd = self._fds.pop(shard, None)
            if fd is None:
                fd = os.open(self.shards[shard], os.O_RDONLY)
                while len(self._fds) >= _MAX_OPEN_SHARDS:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[shard] = fd  # most recently used last
            # Read under the lock so eviction can never close a descriptor mid-read.
            data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes (shard truncated?)")
        return data

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict | None:
        shard, img_off, img_size, txt_off, txt_size = (int(x) for x in self._index[index])
        name = f"{self.shards[shard]}:{self.keys[index]}"
        caption = ""
        if txt_off >= 0:
            try:
                caption = self._read(shard, txt_off, txt_size).decode("utf-8", errors="replace").strip()
            except OSError:
                caption = ""  # the image read below reports the broken shard
        return self._record(name, lambda: self._read(shard, img_off, img_size), caption)

    def __getstate__(self):
        state = super().__getstate__()
        for transient in ("_lock", "_fds", "_pid"):
            state.pop(transient, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_handles()

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return (
            f"WebDatasetSource(shards={len(self.shards)}, samples={len(self.keys)}, "
            f"fingerprint={self._fingerprint}, resolution={self.resolution})"
        )
