"""Dataset readers: MVTec / folder / VisA layouts, their error cases, and image/mask decoding."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from fake_datasets import (
    VISA_SAMPLE_ROWS_TEXT,
    make_fake_mvtec,
    make_fake_visa,
    rect_mask,
    visa_sample_rows,
    write_visa_csv,
)
from PIL import Image

from cdad_dist.data.catalog import Catalog, SampleRecord, scan_dataset, scan_folder, scan_mvtec, scan_visa
from cdad_dist.data.images import read_mask, read_rgb
from cdad_dist.errors import CdadError, DatasetError

OFFICIAL_VISA_CSV = Path("/work/shared/data/visa_split_csv/1cls.csv")


@pytest.fixture()
def mvtec(tmp_path: Path) -> Path:
    return make_fake_mvtec(tmp_path / "mvtec", ["bottle", "cable"], 3, 2, ["crack", "scratch"], 32)


@pytest.fixture()
def visa(tmp_path: Path) -> Path:
    return make_fake_visa(tmp_path / "visa", visa_sample_rows())


# ------------------------------------------------------------------------------------------------ MVTec


def test_scan_mvtec_records(mvtec: Path) -> None:
    cat = scan_mvtec(mvtec)
    assert cat.classes() == ["mvtec/bottle", "mvtec/cable"]
    assert cat.skipped == []
    # per class: 3 train, 2 good + 2 defects x 2 images test
    assert len(cat) == 2 * (3 + 2 + 4)
    train = cat.select(["bottle"], "train")
    assert len(train) == 3 and all(r.label == 0 and r.mask_path is None and r.defect == "good" for r in train)
    test = cat.select(["mvtec/cable"], "test")
    assert sorted({r.defect for r in test}) == ["crack", "good", "scratch"]
    for r in test:
        assert r.dataset == "mvtec" and r.qualified_class == "mvtec/cable"
        if r.defect == "good":
            assert r.label == 0 and r.mask_path is None
        else:
            assert r.label == 1
            stem = Path(r.image_path).stem
            assert r.mask_path == str(mvtec / "cable" / "ground_truth" / r.defect / f"{stem}_mask.png")
    assert set(cat.groups()) == {f"mvtec/{c}/{s}" for c in ("bottle", "cable") for s in ("train", "test")}
    assert len(cat.select(split="test")) == 12


def test_scan_mvtec_class_subset_and_order(mvtec: Path) -> None:
    cat = scan_mvtec(mvtec, ["cable", "bottle"])
    assert cat.classes() == ["mvtec/cable", "mvtec/bottle"]
    assert scan_mvtec(mvtec, ["cable"]).classes() == ["mvtec/cable"]


def test_root_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        scan_mvtec(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="nowhere"):
        scan_visa(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="nowhere"):
        scan_folder(tmp_path / "nowhere", "x")


def test_unknown_class(mvtec: Path) -> None:
    with pytest.raises(DatasetError, match="zipper"):
        scan_mvtec(mvtec, ["bottle", "zipper"])
    with pytest.raises(DatasetError, match="zipper"):
        scan_mvtec(mvtec, ["zipper"], skip_bad=True)  # class-level errors are never skipped


def test_class_without_train_dir(mvtec: Path) -> None:
    for p in (mvtec / "cable" / "train" / "good").iterdir():
        p.unlink()
    (mvtec / "cable" / "train" / "good").rmdir()
    with pytest.raises(DatasetError, match=r"cable.*train"):
        scan_mvtec(mvtec)
    assert scan_mvtec(mvtec, ["bottle"]).classes() == ["mvtec/bottle"]


def test_class_without_test_dir(mvtec: Path) -> None:
    import shutil

    shutil.rmtree(mvtec / "bottle" / "test")
    with pytest.raises(DatasetError, match=r"bottle.*test"):
        scan_mvtec(mvtec, skip_bad=True)


def test_anomalous_image_without_mask(mvtec: Path) -> None:
    (mvtec / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    bad = str(mvtec / "bottle" / "test" / "crack" / "001.png")
    with pytest.raises(DatasetError, match="no mask") as err:
        scan_mvtec(mvtec)
    assert bad in str(err.value)
    cat = scan_mvtec(mvtec, skip_bad=True)
    assert [p for p, _ in cat.skipped] == [bad]
    assert len(cat) == 2 * 9 - 1


def test_mask_size_mismatch(mvtec: Path) -> None:
    mask = mvtec / "cable" / "ground_truth" / "scratch" / "000_mask.png"
    cv2.imwrite(str(mask), rect_mask(32, 31))
    with pytest.raises(DatasetError, match="mask size 31x32 != image size 32x32") as err:
        scan_mvtec(mvtec)
    assert str(mask) in str(err.value)


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_corrupt_image(mvtec: Path, how: str) -> None:
    img = mvtec / "bottle" / "train" / "good" / "001.png"
    data = img.read_bytes()
    img.write_bytes({"garbage": b"not an image at all" * 10, "truncated": data[: len(data) // 2], "empty": b""}[how])
    with pytest.raises(DatasetError) as err:
        scan_mvtec(mvtec)
    assert str(img) in str(err.value)
    with pytest.raises(DatasetError, match=str(img)):
        read_rgb(img)


def test_truncated_jpeg_in_folder_dataset(tmp_path: Path) -> None:
    root = make_fake_mvtec(tmp_path / "f", ["a"], 2, 1, ["dent"], 32, ext=".jpg")
    img = root / "a" / "train" / "good" / "000.jpg"
    img.write_bytes(img.read_bytes()[:-200])
    with pytest.raises(DatasetError, match="truncated"):
        scan_folder(root, "shop")
    with pytest.raises(DatasetError, match="truncated"):
        read_rgb(img)
    cat = scan_folder(root, "shop", skip_bad=True)
    assert len(cat.skipped) == 1 and len(cat.select(split="train")) == 1


def test_empty_class(mvtec: Path) -> None:
    for p in (mvtec / "bottle" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"mvtec/bottle has no usable train images"):
        scan_mvtec(mvtec)


def test_class_emptied_by_skipping_still_raises(mvtec: Path) -> None:
    for p in (mvtec / "bottle" / "train" / "good").iterdir():
        p.write_bytes(b"junk")
    with pytest.raises(DatasetError, match="no usable train"):
        scan_mvtec(mvtec, skip_bad=True)


def test_skip_bad_counts_every_bad_sample(mvtec: Path) -> None:
    (mvtec / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()  # no mask
    cv2.imwrite(str(mvtec / "cable" / "ground_truth" / "crack" / "001_mask.png"), rect_mask(16, 16))  # size
    (mvtec / "cable" / "test" / "good" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # corrupt
    full = 2 * 9
    cat = scan_mvtec(mvtec, skip_bad=True)
    assert len(cat.skipped) == 3
    assert len(cat) == full - 3
    reasons = " | ".join(r for _, r in cat.skipped)
    assert "no mask" in reasons and "mask size" in reasons and "corrupt" in reasons
    skipped_paths = {p for p, _ in cat.skipped}
    assert not skipped_paths & {r.image_path for r in cat.records}


def test_hidden_and_non_image_files_ignored(mvtec: Path) -> None:
    (mvtec / "bottle" / "train" / "good" / "notes.txt").write_text("x")
    (mvtec / "bottle" / "train" / "good" / ".DS_Store").write_bytes(b"junk")
    assert len(scan_mvtec(mvtec, ["bottle"]).select(split="train")) == 3


# ----------------------------------------------------------------------------------------------- folder


def test_scan_folder_extensions_case_insensitive(tmp_path: Path) -> None:
    root = make_fake_mvtec(tmp_path / "f", ["widget"], 1, 1, ["dent"], 24)
    good = root / "widget" / "train" / "good"
    rng = np.random.default_rng(1)
    for i, ext in enumerate([".JPG", ".jpeg", ".bmp", ".tif", ".TIFF", ".Png"]):
        cv2.imwrite(str(good / f"x{i}{ext.lower()}"), rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
        (good / f"x{i}{ext.lower()}").rename(good / f"x{i}{ext}")
    cat = scan_folder(root, "parts")
    assert cat.classes() == ["parts/widget"]
    assert len(cat.select(split="train")) == 7
    assert {r.dataset for r in cat} == {"parts"}
    assert all(read_rgb(r.image_path).shape == (24, 24, 3) for r in cat)


def test_scan_folder_rejects_bad_names(tmp_path: Path) -> None:
    root = make_fake_mvtec(tmp_path / "f", ["a__b"], 1, 1, [], 16)
    with pytest.raises(DatasetError, match="a__b"):
        scan_folder(root, "ok")
    with pytest.raises(DatasetError, match="dataset name"):
        scan_folder(root, "bad/name")


def test_scan_dataset_dispatch(mvtec: Path, visa: Path) -> None:
    assert scan_dataset("mvtec", mvtec).classes() == ["mvtec/bottle", "mvtec/cable"]
    assert scan_dataset("folder", mvtec, name="mine").classes() == ["mine/bottle", "mine/cable"]
    assert scan_dataset("demo", mvtec, classes=["cable"]).classes() == ["demo/cable"]
    assert scan_dataset("visa", visa).classes() == ["visa/candle", "visa/capsules"]
    with pytest.raises(DatasetError, match="name"):
        scan_dataset("folder", mvtec)
    with pytest.raises(DatasetError, match="kaggle"):
        scan_dataset("kaggle", mvtec)


def test_catalog_select_and_add(mvtec: Path, visa: Path) -> None:
    both = scan_mvtec(mvtec) + scan_visa(visa)
    assert both.classes() == ["mvtec/bottle", "mvtec/cable", "visa/candle", "visa/capsules"]
    assert len(both.select(["candle", "mvtec/bottle"], "train")) == 3 + 3
    with pytest.raises(DatasetError, match="pill"):
        both.select(["pill"])
    with pytest.raises(DatasetError, match="val"):
        both.select(split="val")
    with pytest.raises(DatasetError, match="overlap"):
        _ = both + scan_mvtec(mvtec)
    ambiguous = scan_folder(mvtec, "a") + scan_folder(mvtec, "b")
    with pytest.raises(DatasetError, match="ambiguous"):
        ambiguous.select(["bottle"])
    assert isinstance(Catalog().records, list)


# ------------------------------------------------------------------------------------------------- VisA


def test_scan_visa_from_official_rows(visa: Path) -> None:
    cat = scan_visa(visa)
    assert cat.classes() == ["visa/candle", "visa/capsules"]
    rows = visa_sample_rows()
    assert len(cat) == len(rows)
    candle_test = cat.select(["candle"], "test")
    assert [r.label for r in candle_test] == [0, 0, 1, 1]
    assert [r.defect for r in candle_test] == ["good", "good", "anomaly", "anomaly"]
    anomaly = candle_test[2]
    assert anomaly == SampleRecord(
        "visa", "candle", "test", 1, "anomaly",
        str(visa / "candle/Data/Images/Anomaly/000.JPG"), str(visa / "candle/Data/Masks/Anomaly/000.png"),
    )  # fmt: skip
    assert len(cat.select(["capsules"], "train")) == 2
    # label-indexed masks (values 1 and 2) are binarised
    m = read_mask(anomaly.mask_path)
    assert set(np.unique(m)) == {0, 1} and m.shape == (30, 40)
    assert read_rgb(anomaly.image_path).shape == (30, 40, 3)


def test_visa_explicit_csv_and_subset(visa: Path, tmp_path: Path) -> None:
    other = write_visa_csv(tmp_path / "mine.csv", [r for r in visa_sample_rows() if r[0] == "capsules"])
    cat = scan_visa(visa, other)
    assert cat.classes() == ["visa/capsules"] and len(cat) == 5
    assert scan_visa(visa, classes=["capsules"]).classes() == ["visa/capsules"]
    with pytest.raises(DatasetError, match="candle"):
        scan_visa(visa, other, classes=["candle"])


def test_visa_missing_csv(visa: Path) -> None:
    with pytest.raises(DatasetError, match="nope.csv"):
        scan_visa(visa, visa / "nope.csv")
    (visa / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError, match="1cls.csv"):
        scan_visa(visa)


def test_visa_bad_csv_header_and_values(visa: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("object,split,image\ncandle,train,x.JPG\n")
    with pytest.raises(DatasetError, match=r"bad.csv.*missing column.*label"):
        scan_visa(visa, bad)
    rows = visa_sample_rows()
    rows[3][2] = "weird"
    write_visa_csv(bad, rows)
    with pytest.raises(DatasetError, match=r"bad.csv:5.*weird"):
        scan_visa(visa, bad)


def test_visa_anomaly_without_mask(visa: Path, tmp_path: Path) -> None:
    rows = visa_sample_rows()
    rows[5][4] = ""  # candle anomaly 000 without a mask entry
    csv_path = write_visa_csv(tmp_path / "m.csv", rows)
    with pytest.raises(DatasetError, match=r"Anomaly/000.JPG: anomalous image has no mask"):
        scan_visa(visa, csv_path)
    cat = scan_visa(visa, csv_path, skip_bad=True)
    assert len(cat.skipped) == 1 and len(cat) == len(rows) - 1


def test_visa_missing_image_and_mask_files(visa: Path) -> None:
    (visa / "capsules/Data/Masks/Anomaly/001.png").unlink()
    (visa / "candle/Data/Images/Normal/0451.JPG").unlink()
    with pytest.raises(DatasetError, match=r"0451.JPG: file does not exist"):
        scan_visa(visa)
    cat = scan_visa(visa, skip_bad=True)
    assert sorted(Path(p).name for p, _ in cat.skipped) == ["001.JPG", "0451.JPG"]


def test_visa_mask_size_mismatch(visa: Path) -> None:
    cv2.imwrite(str(visa / "candle/Data/Masks/Anomaly/001.png"), np.zeros((30, 41), np.uint8))
    with pytest.raises(DatasetError, match="mask size 41x30 != image size 40x30"):
        scan_visa(visa)


def test_visa_class_dir_missing(visa: Path) -> None:
    import shutil

    shutil.rmtree(visa / "capsules")
    with pytest.raises(DatasetError, match=r"visa/capsules: missing directory"):
        scan_visa(visa)
    assert scan_visa(visa, classes=["candle"]).classes() == ["visa/candle"]


def test_visa_class_without_test_rows(visa: Path, tmp_path: Path) -> None:
    rows = [r for r in visa_sample_rows() if not (r[0] == "capsules" and r[1] == "test")]
    with pytest.raises(DatasetError, match="visa/capsules has no usable test images"):
        scan_visa(visa, write_visa_csv(tmp_path / "t.csv", rows))


def test_sample_rows_are_from_the_official_csv() -> None:
    if not OFFICIAL_VISA_CSV.is_file():
        pytest.skip("official VisA csv not available here")
    official = OFFICIAL_VISA_CSV.read_text()
    for line in VISA_SAMPLE_ROWS_TEXT.splitlines()[1:]:
        assert line + "\r\n" in official or line + "\n" in official, line


def test_official_csv_parses(tmp_path: Path) -> None:
    """The reader accepts the exact official file (CRLF, empty mask cells) and finds its 12 classes."""
    if not OFFICIAL_VISA_CSV.is_file():
        pytest.skip("official VisA csv not available here")
    from cdad_dist.data.catalog import _read_visa_csv

    rows = _read_visa_csv(OFFICIAL_VISA_CSV)
    assert len(rows) == 10821
    objects = sorted({r["object"] for _, r in rows})
    assert len(objects) == 12 and objects[0] == "candle" and objects[-1] == "pipe_fryum"
    assert sum(1 for _, r in rows if r["object"] == "candle" and r["split"] == "train") == 900
    assert all(r["mask"] for _, r in rows if r["label"] == "anomaly")


# ------------------------------------------------------------------------------------------ image decoding


def test_read_rgb_normalises_formats(tmp_path: Path) -> None:
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert np.array_equal(read_rgb(tmp_path / "c.png"), rgb)
    grey = np.arange(80, dtype=np.uint8).reshape(8, 10)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    out = read_rgb(tmp_path / "g.png")
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8 and np.array_equal(out[..., 1], grey)
    rgba = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full((8, 10), 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    assert np.array_equal(read_rgb(tmp_path / "a.png"), rgb)
    cv2.imwrite(str(tmp_path / "d.png"), (grey.astype(np.uint16) * 257))
    assert np.array_equal(read_rgb(tmp_path / "d.png")[..., 2], grey)


def test_read_mask_binarises(tmp_path: Path) -> None:
    labels = np.zeros((6, 6), np.uint8)
    labels[1, 1], labels[2, 2], labels[3, 3] = 1, 2, 255
    cv2.imwrite(str(tmp_path / "l.png"), labels)
    assert np.array_equal(read_mask(tmp_path / "l.png"), (labels > 0).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "w.png"), labels.astype(np.uint16) * 3)
    assert read_mask(tmp_path / "w.png").sum() == 3
    colour = np.zeros((6, 6, 3), np.uint8)
    colour[0, 0, 1] = 9
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    assert read_mask(tmp_path / "c.png").sum() == 1
    # palette PNG whose index 0 is white: the indices, not the colours, are the labels
    pal = Image.fromarray(labels, mode="P")
    pal.putpalette([255, 255, 255, 0, 0, 0] + [10, 20, 30] * 254)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(read_mask(tmp_path / "p.png"), (labels > 0).astype(np.uint8))


def test_read_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="ghost.png"):
        read_rgb(tmp_path / "ghost.png")
    with pytest.raises(CdadError, match="ghost_mask.png"):
        read_mask(tmp_path / "ghost_mask.png")
    (tmp_path / "bad_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(DatasetError, match="bad_mask.png"):
        read_mask(tmp_path / "bad_mask.png")


def test_fake_visa_csv_roundtrip(visa: Path) -> None:
    text = (visa / "split_csv" / "1cls.csv").read_bytes().decode()
    assert text.replace("\r\n", "\n") == VISA_SAMPLE_ROWS_TEXT
    assert list(csv.reader(io.StringIO(text)))[1:] == visa_sample_rows()
