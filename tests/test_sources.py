"""User-data sources: image folders and WebDataset tar shards, decoding and error policy."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from jaxunified.data.sources import (
    ImageDecodeError,
    ImageFolderSource,
    WebDatasetSource,
    decode_image,
    expand_shards,
    read_captions,
)

RES = 16


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _bands(width=60, height=20) -> Image.Image:
    """Three vertical bands red | green | blue: a centre crop keeps only green."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 3, 0] = 255
    a[:, width // 3 : 2 * width // 3, 1] = 255
    a[:, 2 * width // 3 :, 2] = 255
    return Image.fromarray(a)


def _gray() -> Image.Image:
    return Image.fromarray(np.full((24, 24), 90, np.uint8), "L")


def _transparent() -> Image.Image:
    # Fully transparent black: composited on white it must come out white, not black.
    return Image.fromarray(np.zeros((20, 20, 4), np.uint8), "RGBA")


def _palette() -> Image.Image:
    return Image.fromarray(np.full((20, 20, 3), (0, 51, 204), np.uint8)).convert("P")  # web-safe: exact in "P"


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "golden_retriever").mkdir(parents=True)
    (root / "misc").mkdir()
    (root / ".hidden").mkdir()
    _bands().save(root / "golden_retriever" / "bands.jpg", quality=95)
    _gray().save(root / "misc" / "gray.png")
    _transparent().save(root / "misc" / "rgba.png")
    _palette().save(root / "pal.bmp")
    (root / "misc" / "broken.webp").write_bytes(b"RIFF\x00\x00not really a webp")
    (root / "misc" / "notes.txt").write_text("not an image")
    _gray().save(root / ".hidden" / "skip.png")
    return root


def test_image_folder_decodes_every_mode(folder):
    src = ImageFolderSource(folder, resolution=RES)
    assert src.files == [
        "golden_retriever/bands.jpg",
        "misc/broken.webp",
        "misc/gray.png",
        "misc/rgba.png",
        "pal.bmp",
    ]
    records = {f: src[i] for i, f in enumerate(src.files)}
    for f, rec in records.items():
        if f.endswith("broken.webp"):
            continue
        assert rec["image"].shape == (RES, RES, 3) and rec["image"].dtype == np.uint8
    bands = records["golden_retriever/bands.jpg"]["image"].astype(int)[:, 2:-2]  # edges see the filter taps
    assert (bands[..., 1] > 200).all() and (bands[..., 0] < 40).all()  # centre crop, not squash
    gray = records["misc/gray.png"]["image"]
    assert (gray == gray[..., :1]).all() and abs(int(gray[0, 0, 0]) - 90) <= 1
    assert (records["misc/rgba.png"]["image"] == 255).all()
    np.testing.assert_allclose(records["pal.bmp"]["image"][0, 0], (0, 51, 204), atol=1)
    # Captions from folder names, '' at the root.
    assert records["golden_retriever/bands.jpg"]["caption"] == "golden retriever"
    assert records["misc/gray.png"]["caption"] == "misc"
    assert records["pal.bmp"]["caption"] == ""


def test_corrupt_images_skip_or_raise(folder):
    src = ImageFolderSource(folder, resolution=RES)
    broken = src.files.index("misc/broken.webp")
    assert src[broken] is None and src.num_skipped == 1 and src.skipped[0].endswith("broken.webp")
    strict = ImageFolderSource(folder, resolution=RES, on_error="raise")
    with pytest.raises(ImageDecodeError, match="broken.webp"):
        strict[broken]
    with pytest.raises(ValueError, match="on_error"):
        ImageFolderSource(folder, resolution=RES, on_error="ignore")


def test_user_errors_name_the_fix(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope", resolution=RES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        ImageFolderSource(tmp_path / "empty", resolution=RES)
    with pytest.raises(ValueError, match="resolution"):
        ImageFolderSource(folder, resolution=0)
    with pytest.raises(FileNotFoundError, match="captions file"):
        ImageFolderSource(folder, tmp_path / "caps.json", resolution=RES)


@pytest.mark.parametrize("fmt", ["json", "json_list", "jsonl", "tsv"])
def test_captions_file_formats(tmp_path, folder, fmt):
    entries = {"golden_retriever/bands.jpg": "three bands", "gray.png": "a grey square"}  # by path, by name
    if fmt == "json":
        path = tmp_path / "caps.json"
        path.write_text(json.dumps(entries))
    elif fmt == "json_list":
        path = tmp_path / "caps.json"
        path.write_text(json.dumps([{"file_name": k, "text": v} for k, v in entries.items()]))
    elif fmt == "jsonl":
        path = tmp_path / "caps.jsonl"
        path.write_text("\n".join(json.dumps({"image": k, "caption": v}) for k, v in entries.items()))
    else:
        path = tmp_path / "caps.tsv"
        path.write_text("".join(f"{k}\t{v}\n" for k, v in entries.items()))
    assert read_captions(path) == entries
    src = ImageFolderSource(folder, path, resolution=RES)
    captions = dict(zip(src.files, src.captions))
    assert captions["golden_retriever/bands.jpg"] == "three bands"
    assert captions["misc/gray.png"] == "a grey square"
    assert captions["misc/rgba.png"] == ""


def test_sources_pickle_and_have_stable_reprs(folder):
    a, b = ImageFolderSource(folder, resolution=RES), ImageFolderSource(folder, resolution=RES)
    assert repr(a) == repr(b) and "0x" not in repr(a)
    a[1]
    c = pickle.loads(pickle.dumps(a))
    assert repr(c) == repr(a) and c.skipped == []
    np.testing.assert_array_equal(c[0]["image"], a[0]["image"])


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path):
    red = Image.fromarray(np.full((30, 40, 3), (200, 0, 0), np.uint8))
    _write_shard(
        tmp_path / "shard-0000.tar",
        [
            ("000.jpg", _encode(red, "JPEG")),
            ("000.txt", b"a red picture\n"),
            ("000.json", b"{}"),
            ("sub/001.png", _encode(_gray(), "PNG")),
            ("sub/001.txt", "caf\u00e9 au lait".encode()),
            ("002.txt", b"caption without an image"),
        ],
    )
    _write_shard(
        tmp_path / "shard-0001.tar",
        [
            ("010.webp", _encode(_transparent(), "WEBP")),
            ("011.jpg", b"\xff\xd8 truncated jpeg"),
            ("011.txt", b"broken"),
            ("012.png", _encode(_palette(), "PNG")),
            ("012.txt", b"blue"),
        ],
    )
    return tmp_path


def test_webdataset_indexes_and_reads_lazily(shards):
    src = WebDatasetSource(str(shards / "shard-*.tar"), resolution=RES)
    assert len(src) == 5 and src.keys == ["000", "sub/001", "010", "011", "012"]
    rec = src[0]
    assert rec["caption"] == "a red picture" and rec["image"].shape == (RES, RES, 3)
    assert abs(int(rec["image"][..., 0].mean()) - 200) < 10
    assert src[1]["caption"] == "caf\u00e9 au lait" and (src[1]["image"] == src[1]["image"][..., :1]).all()
    assert src[2]["caption"] == "" and (src[2]["image"] > 250).all()  # no .txt; transparent webp
    assert src[4]["caption"] == "blue"
    assert src[3] is None and src.num_skipped == 1 and "011" in src.skipped[0]
    # Random access in any order, and after pickling (as grain workers do).
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[4]["image"], src[4]["image"])
    assert repr(clone) == repr(src) and "0x" not in repr(src)
    with pytest.raises(ImageDecodeError, match="011"):
        WebDatasetSource([shards / "shard-0001.tar"], resolution=RES, on_error="raise")[1]


def test_webdataset_shard_patterns_and_errors(shards, tmp_path):
    brace = expand_shards(str(shards / "shard-{0000..0001}.tar"))
    assert brace == sorted(expand_shards(str(shards / "shard-*.tar")))
    with pytest.raises(FileNotFoundError, match="no tar shards match"):
        expand_shards(str(tmp_path / "missing-*.tar"))
    with pytest.raises(FileNotFoundError, match="shard-0002.tar"):
        expand_shards(str(shards / "shard-{0000..0002}.tar"))
    with tarfile.open(tmp_path / "zipped.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("a.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="uncompressed"):
        WebDatasetSource(str(tmp_path / "zipped.tar.gz"), resolution=RES)


def test_decode_image_16_bit_grayscale():
    a = np.full((10, 10), 40000, np.uint16)
    data = _encode(Image.fromarray(a), "PNG")
    out = decode_image(data, 8)
    assert out.shape == (8, 8, 3) and abs(int(out[0, 0, 0]) - 40000 * 255 // 65535) <= 1
