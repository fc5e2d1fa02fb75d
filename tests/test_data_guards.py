"""Data that must not leak or hang: every on-disk source goes through one safe-path helper
(no escape from data.root, no image listed twice), label typos fail at once, and image
files are read only if they are regular files in an allowed raster format, 16-bit grey
scaled to 8 bits.

These tests call the sources and image loaders directly (no Ray); the end-to-end
`raybias prepare` refusals are in tests/test_safety.py and tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_data import make_celeba, make_csv, make_utkface, make_waterbirds, rewrite_csv
from raybias.config import config_from_dict
from raybias.data.images import ImageError, decode, load_file, load_files
from raybias.data.sources import DataError, load_source

REPO = Path(__file__).resolve().parents[1]


def load(fx, **data):
    cfg = config_from_dict({"data": {"source": fx.source, "root": str(fx.root), **data}})
    return load_source(cfg.data)


def _outside_image(tmp_path: Path) -> Path:
    outside = tmp_path / "secret" / "private.jpg"
    outside.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(outside, format="JPEG")
    return outside


# --- symlinks out of data.root: every source -------------------------------------------------

def test_celeba_refuses_an_image_that_is_a_symlink_out_of_the_root(tmp_path):
    for variant in ("txt", "kaggle"):
        fx = make_celeba(tmp_path / variant, variant=variant)
        victim = fx.notes["image_dir"] / "000005.jpg"
        victim.unlink()
        victim.symlink_to(_outside_image(tmp_path))
        with pytest.raises(DataError) as err:
            load(fx)
        msg = str(err.value)
        assert "000005.jpg" in msg and "resolves outside data.root" in msg, msg
        assert "list_attr_celeba" in msg and "line " in msg  # the metadata line that names it


def test_celeba_refuses_an_image_folder_that_is_a_symlink_out_of_the_root(tmp_path):
    fx = make_celeba(tmp_path / "real")
    moved = tmp_path / "elsewhere" / "img_align_celeba"
    moved.parent.mkdir()
    os.rename(fx.root / "img_align_celeba", moved)
    (fx.root / "img_align_celeba").symlink_to(moved, target_is_directory=True)
    with pytest.raises(DataError, match="resolves outside data.root"):
        load(fx)


def test_utkface_refuses_a_symlink_out_of_the_root(tmp_path):
    fx = make_utkface(tmp_path / "utk")
    link = fx.root / "UTKFace" / "30_1_0_20170109999999999.jpg.chip.jpg"
    link.symlink_to(_outside_image(tmp_path))
    with pytest.raises(DataError) as err:
        load(fx)
    assert link.name in str(err.value) and "resolves outside data.root" in str(err.value)


@pytest.mark.parametrize("source", ["csv", "waterbirds"])
def test_csv_and_waterbirds_refuse_a_symlink_out_of_the_root(tmp_path, source):
    fx = (make_csv if source == "csv" else make_waterbirds)(tmp_path / source)
    column = "path" if source == "csv" else "img_filename"
    link = fx.root / "link.jpg"
    link.symlink_to(_outside_image(tmp_path))

    def edit(rows, fields):
        rows[3][column] = "link.jpg"
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    with pytest.raises(DataError, match=r"line 5.*'link.jpg' is a symlink that resolves outside data.root"):
        load(fx)


def test_a_symlink_inside_the_root_is_fine(tmp_path):
    fx = make_csv(tmp_path / "csv")

    def edit(rows, fields):
        target = fx.root / rows[3]["path"]
        (fx.root / "alias.jpg").symlink_to(target)
        rows[3]["path"] = "alias.jpg"
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    table = load(fx).table
    assert "alias.jpg" in set(table["path"])


# --- one image listed twice ------------------------------------------------------------------

def test_csv_refuses_one_file_listed_through_a_symlink_alias(tmp_path):
    fx = make_csv(tmp_path / "csv")

    def edit(rows, fields):
        # line 9 names, through a link inside the root, the file of line 4
        (fx.root / "images" / "alias.jpg").symlink_to(fx.root / rows[2]["path"])
        rows[7]["path"] = "images/alias.jpg"
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    with pytest.raises(DataError) as err:
        load(fx)
    msg = str(err.value)
    assert "line 9: image 'images/alias.jpg' is already listed on line 4" in msg, msg
    assert "each image may be listed once" in msg


def test_csv_refuses_one_file_under_two_spellings(tmp_path):
    fx = make_csv(tmp_path / "csv")

    def edit(rows, fields):
        rows[7]["path"] = "./" + rows[2]["path"].replace("/", "//", 1)
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    with pytest.raises(DataError, match="line 9: image .* is already listed on line 4"):
        load(fx)


def test_waterbirds_refuses_two_img_ids_with_one_file(tmp_path):
    fx = make_waterbirds(tmp_path / "wb")
    seen = {}

    def edit(rows, fields):
        seen["first"], seen["second"] = rows[2]["img_id"], rows[10]["img_id"]
        rows[10]["img_filename"] = rows[2]["img_filename"]
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    with pytest.raises(DataError) as err:
        load(fx)
    msg = str(err.value)
    assert f"line 12 (img_id {seen['second']})" in msg and f"line 4 (img_id {seen['first']})" in msg, msg
    assert "already listed" in msg


def test_celeba_refuses_a_file_name_listed_twice(tmp_path):
    fx = make_celeba(tmp_path / "c")
    path = fx.root / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    name = lines[3].split()[0]  # line 4: the second image
    lines[10] = name + lines[10][len(name):]  # line 11 names it again
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"line 11: image 'img_align_celeba/{name}' is already listed on line 4"):
        load(fx)


def test_a_named_pipe_in_the_metadata_is_refused_by_the_source(tmp_path):
    fx = make_csv(tmp_path / "csv")
    os.mkfifo(fx.root / "pipe.png")

    def edit(rows, fields):
        rows[0]["path"] = "pipe.png"
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    with pytest.raises(DataError, match=r"line 2: image path 'pipe.png' is a named pipe \(FIFO\)"):
        load(fx)


# --- label typos fail at once ------------------------------------------------------------------

PROBE = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a regression fails, not the machine
from raybias.config import config_from_dict
from raybias.data.sources import load_source
cfg = config_from_dict({"data": {"source": "csv", "root": sys.argv[1]}})
started = time.perf_counter()
try:
    load_source(cfg.data)
    out = {"error": None}
except Exception as exc:
    out = {"error": f"{type(exc).__name__}: {exc}"}
out["seconds"] = time.perf_counter() - started
print("PROBE " + json.dumps(out))
"""


@pytest.mark.parametrize("column, value", [("a", "30000000"), ("a", str(10 ** 12)), ("y", "1e300"),
                                           ("y", "99999999999999999999999999")])
def test_a_huge_label_fails_at_once_naming_its_line(tmp_path, column, value):
    fx = make_csv(tmp_path / "csv")

    def edit(rows, fields):
        rows[5][column] = value
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(fx.root)], capture_output=True, text=True,
                          env=env, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(lines[0][len("PROBE "):])
    assert out["error"] and out["error"].startswith("DataError"), out
    assert f"metadata.csv, line 7: column '{column}' has '{value}', out of range" in out["error"], out
    assert out["seconds"] < 2, out


def test_label_bound_follows_the_number_of_rows(tmp_path):
    fx = make_csv(tmp_path / "csv")  # 158 rows: a label of 158 cannot have 0..158 all present

    def edit(rows, fields):
        rows[0]["y"] = str(len(rows))
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    with pytest.raises(DataError, match=r"line 2: column 'y' has '158', out of range.*<= 157.*158 rows"):
        load(fx)


# --- image files: formats, bit depth, pipes ---------------------------------------------------

def test_16_bit_grey_png_is_scaled_not_saturated(tmp_path):
    rng = np.random.default_rng(0)
    source = np.clip(rng.normal(133 * 257, 40 * 257, (40, 40)), 0, 65535).astype(np.uint16)
    img = Image.fromarray(source)
    assert img.mode == "I;16"
    img.save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"  # stored 16-bit
    expected = source.mean() / 257  # about 133 in 8-bit terms
    for fmt in ("png", "jpeg"):
        stored = decode(load_file(str(tmp_path / "grey16.png"), 16, image_format=fmt))
        assert stored.shape == (16, 16, 3)
        assert abs(stored.mean() - expected) < 3, (fmt, stored.mean(), expected)
    # a 32-bit integer grey TIFF holding 16-bit values is read the same way
    Image.fromarray(source.astype(np.int32)).save(tmp_path / "grey32.tif")
    assert Image.open(tmp_path / "grey32.tif").mode == "I"
    assert abs(decode(load_file(str(tmp_path / "grey32.tif"), 16)).mean() - expected) < 3
    # values outside 16 bits are refused with a clear error, not clipped
    Image.fromarray(np.full((8, 8), 1 << 20, np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ImageError, match=r"wide.tif: I grey image with values .* outside the 16-bit range"):
        load_file(str(tmp_path / "wide.tif"), 8)


def test_16_bit_png_through_a_source_keeps_its_brightness(tmp_path):
    fx = make_csv(tmp_path / "csv")
    source = np.full((24, 24), 133 * 257, np.uint16)
    Image.fromarray(source).save(fx.root / "grey16.png")

    def edit(rows, fields):
        rows[0]["path"] = "grey16.png"
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    table = load(fx).table
    row = table[table["path"] == "grey16.png"].iloc[0]
    (png,) = load_files([row["_file"]], 16, workers=1)
    assert abs(decode(png).mean() - 133) < 1.5


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def test_an_eps_file_named_jpg_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    calls = []

    def ghostscript(*args, **kwargs):
        calls.append("Ghostscript")
        raise OSError("Ghostscript must not run")

    accept = EpsImagePlugin._accept

    def probe(prefix):
        calls.append("identified as EPS")
        return accept(prefix)

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "_accept", probe)
    Image.register_open(EpsImagePlugin.EpsImageFile.format, EpsImagePlugin.EpsImageFile, probe)
    try:
        evil = tmp_path / "evil.jpg"
        evil.write_bytes(EPS)
        # the probe is live: without formats= Pillow identifies the file and calls Ghostscript
        with pytest.raises(OSError, match="Ghostscript must not run"):
            Image.open(evil).load()
        assert calls == ["identified as EPS", "Ghostscript"]
        calls.clear()
        with pytest.raises(ImageError) as err:
            load_file(str(evil), 8)
        assert str(evil) in str(err.value) and "cannot decode image" in str(err.value)
        assert "PNG, JPEG" in str(err.value)
        with pytest.raises(ImageError):
            decode(EPS, 8, where="evil")
        assert calls == []
    finally:
        Image.register_open(EpsImagePlugin.EpsImageFile.format, EpsImagePlugin.EpsImageFile, accept)


def _in_thread(fn, timeout: float = 10.0):
    """Run fn in a daemon thread: (finished, exception). A regression that blocks fails the
    test instead of hanging the suite."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), box.get("exc")


def test_a_named_pipe_among_the_images_is_an_error_not_a_hang(tmp_path):
    fifo = tmp_path / "000001.jpg"
    os.mkfifo(fifo)
    try:
        finished, exc = _in_thread(lambda: load_file(str(fifo), 8))
        assert finished, "load_file blocked on a named pipe"
        assert isinstance(exc, ImageError) and str(fifo) in str(exc) and "named pipe" in str(exc), exc
        good = tmp_path / "good.png"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
        finished, exc = _in_thread(lambda: load_files([str(good), str(fifo)], 8, workers=2))
        assert finished and isinstance(exc, ImageError) and "named pipe" in str(exc), exc
    finally:
        # a regressed reader blocked in open(): a writer that opens and closes ends its wait
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waiting (the normal case)


def test_a_folder_is_not_read_as_an_image(tmp_path):
    with pytest.raises(ImageError, match="is a folder"):
        load_file(str(tmp_path), 8)
