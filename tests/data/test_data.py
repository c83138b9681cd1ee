"""fastprompt.data: decoding, folder/CSV datasets and their faults, transforms, few-shot splits."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastprompt.data import (
    AUGMENTATIONS,
    ClassMismatchError,
    CorruptImageError,
    CsvDataset,
    EmptyClassWarning,
    ImageFolderDataset,
    SkippedImageWarning,
    SplitLayoutError,
    TransparentImageWarning,
    UnknownClassWarning,
    build_transforms,
    load_image,
    make_few_shot_splits,
    split_folders,
    train_val_split,
    transforms_for_model,
    write_unreadable,
)

# ---------------------------------------------------------------- helpers


def _rgb(path: Path, color=(200, 100, 50), size=(6, 4), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _rgb(root / name / f"img{i}.png", color=(10 * i, 50, 100))
    return root


# ---------------------------------------------------------------- decoding


def test_8bit_rgb_round_trips_exactly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_16bit_gray_png_keeps_its_precision_and_real_range(tmp_path):
    values = (1000 + np.arange(600, dtype=np.uint16) * 5).reshape(20, 30)  # 12-bit data, 600 levels
    Image.fromarray(values).save(tmp_path / "g16.png")
    image = load_image(tmp_path / "g16.png")
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32 and image.shape == (3, 20, 30)
    assert image.min() == 0.0 and image.max() == 1.0  # scaled by 1000..3995, not by 65535 or clipped to 8 bits
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert len(torch.unique(image[0])) == 600
    expected = (values.astype(np.float32) - 1000) / (values.max() - 1000)
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)


def test_float_tiff_is_scaled_to_unit_range(tmp_path):
    values = np.linspace(-3, 5, 12, dtype=np.float32).reshape(3, 4)
    Image.fromarray(values).save(tmp_path / "f.tiff")
    image = load_image(tmp_path / "f.tiff")
    np.testing.assert_allclose(image[2].numpy(), (values + 3) / 8, atol=1e-6)


def test_gray_palette_and_rgba_become_rgb(tmp_path):
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "l.png")), np.full((3, 3, 3), 77))

    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "p.png")
    decoded = np.asarray(load_image(tmp_path / "p.png"))
    assert decoded.shape == (2, 2, 3)
    assert tuple(decoded[0, 0]) == (255, 0, 0) and tuple(decoded[1, 1]) == (0, 0, 255)

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)
    rgba[1, 1] = (200, 100, 50, 0)  # fully transparent: composited over black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    decoded = np.asarray(load_image(tmp_path / "rgba.png"))
    assert tuple(decoded[0, 0]) == (200, 100, 50) and tuple(decoded[1, 1]) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.new("RGB", (8, 4), (0, 128, 0)).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (4, 8)


def test_decoding_is_by_content_and_failures_are_corrupt_image_errors(tmp_path):
    _rgb(tmp_path / "jpeg_named.png", fmt="JPEG")
    assert load_image(tmp_path / "jpeg_named.png").size == (6, 4)

    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(CorruptImageError, match="text.png") as info:
        load_image(tmp_path / "text.png")
    assert info.value.path == str(tmp_path / "text.png") and info.value.reason

    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=95)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:600])
    with pytest.raises(CorruptImageError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")

    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent.png")


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    def write(name, raw, **attributes):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns = raw.shape
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PhotometricInterpretation = attributes.pop("photometric", "MONOCHROME2")
        for key, value in attributes.items():
            setattr(ds, key, value)
        ds.PixelData = raw.astype(np.uint16).tobytes()
        new_api = int(pydicom.__version__.split(".")[0]) >= 3  # 2.x spells enforce_file_format differently
        ds.save_as(tmp_path / name, **({"enforce_file_format": True} if new_api else {"write_like_original": False}))
        return tmp_path / name

    raw = np.array([[0, 1000], [2000, 4000]])
    # modality: HU = 2 * raw - 1000 -> [[-1000, 1000], [3000, 7000]]; window 1000 +- 1000 -> [[0, .5], [1, 1]]
    path = write("ct.dcm", raw, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2001)
    image = load_image(path)
    assert image.shape == (3, 2, 2)
    np.testing.assert_allclose(image[0].numpy(), [[0.0, 0.5], [1.0, 1.0]], atol=1e-3)

    inverted = load_image(write("cr.dcm", raw, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted[1].numpy(), 1 - raw / 4000, atol=1e-6)  # no window: real range, inverted
    assert pydicom.dcmread(path).PhotometricInterpretation == "MONOCHROME2"


def test_dicom_without_pydicom_asks_for_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    (tmp_path / "scan.dcm").write_bytes(bytes(128) + b"DICM" + bytes(16))
    with pytest.raises(ImportError, match=r"fastprompt\[dicom\]"):
        load_image(tmp_path / "scan.dcm")


# ---------------------------------------------------------------- image folders


def test_folder_classes_samples_and_duplicate_names(tmp_path):
    root = _folder(tmp_path / "data", {"normal": 2, "tumour": 3})
    _rgb(root / "tumour" / "nested" / "img0.png")  # same file name as others, in a sub-folder
    (root / "tumour" / "notes.txt").write_text("ignored")
    (root / "tumour" / ".hidden.png").write_text("ignored")
    _rgb(root / "tumour" / ".ipynb_checkpoints" / "img0.png")  # hidden folder: ignored
    data = ImageFolderDataset(root)
    assert data.classes == ["normal", "tumour"] and not data.multilabel
    assert data.targets == [0, 0, 1, 1, 1, 1]
    paths = [path for path, _ in data.samples]
    assert len(set(paths)) == 6 and sum(Path(p).name == "img0.png" for p in paths) == 3
    image, target = data[5]
    assert isinstance(image, Image.Image) and target == 1


def test_folder_transform_and_loader(tmp_path):
    root = _folder(tmp_path / "data", {"a": 2, "b": 1})
    Image.fromarray(np.full((9, 5), 3000, dtype=np.uint16)).save(root / "b" / "deep.png")  # 16-bit among 8-bit
    data = ImageFolderDataset(root, transform=build_transforms(16, train=False))
    batch, targets = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    assert targets.tolist() == [0, 0, 1, 1]


def test_empty_class_folder_is_warned_and_ignored(tmp_path):
    root = _folder(tmp_path / "data", {"a": 1, "b": 1, "empty": 0})
    with pytest.warns(EmptyClassWarning, match="empty"):
        data = ImageFolderDataset(root)
    assert data.classes == ["a", "b"]
    with pytest.warns(EmptyClassWarning):  # an explicit class list keeps indices stable
        fixed = ImageFolderDataset(root, classes=["empty", "a", "b"])
    assert fixed.targets == [1, 2]


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (None, "does not exist"),
        ({}, "no class sub-folders"),
        ({"only": 2}, "at least two"),
        ({"only": 2, "empty": 0}, "at least two"),
    ],
)
def test_folder_errors_name_the_path_and_the_fix(tmp_path, layout, match):
    root = tmp_path / "data"
    if layout is not None:
        root.mkdir()
        _folder(root, layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyClassWarning)
        with pytest.raises(ValueError, match=match) as info:
            ImageFolderDataset(root)
    assert str(root) in str(info.value)


def test_explicit_classes_without_any_image_is_an_error(tmp_path):
    root = _folder(tmp_path / "data", {"a": 0, "b": 0})
    with pytest.warns(EmptyClassWarning), pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(root, classes=["a", "b"])


def _corrupt_folder(root: Path) -> Path:
    _folder(root, {"a": 2, "b": 2})
    (root / "a" / "img1.png").write_text("broken")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "b" / "tiny.png")
    return root


def test_skip_serves_next_readable_sample_and_counts(tmp_path):
    data = ImageFolderDataset(_corrupt_folder(tmp_path / "data"))
    with pytest.warns(SkippedImageWarning, match="img1.png"):
        image, target = data[1]
    assert target == 1 and np.asarray(image)[0, 0, 1] == 50  # b/img0.png, the next sample
    assert list(data.skipped) == [str(tmp_path / "data" / "a" / "img1.png")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data[1]  # reported once per file
    assert len(data.skipped) == 1


def test_raise_mode_and_verify(tmp_path):
    root = _corrupt_folder(tmp_path / "data")
    with pytest.raises(CorruptImageError, match="img1.png"):
        ImageFolderDataset(root, on_error="raise")[1]
    data = ImageFolderDataset(root, transform=build_transforms(8, train=True))
    with pytest.warns(SkippedImageWarning, match="1 unreadable"):
        dropped = data.verify(workers=2, progress=False)
    assert list(dropped) == [str(root / "a" / "img1.png")] and len(data) == 4 and data.targets == [0, 1, 1, 1]
    assert all(data[i][0].shape == (3, 8, 8) for i in range(len(data)))  # the 1x1 image is resized
    with pytest.raises(CorruptImageError):
        ImageFolderDataset(root, on_error="raise").verify(progress=False)


# ---------------------------------------------------------------- CSV lists


def test_csv_single_label_names_and_indices(tmp_path):
    for i in range(4):
        _rgb(tmp_path / "img" / f"{i}.png")
    (tmp_path / "names.csv").write_text("path,label\nimg/0.png,cat\nimg/1.png,dog\nimg/2.png,cat\n\n")
    data = CsvDataset(tmp_path / "names.csv")
    assert data.classes == ["cat", "dog"] and data.targets == [0, 1, 0] and not data.multilabel
    (tmp_path / "idx.csv").write_text("file,y\nimg/0.png,2\nimg/1.png,0\nimg/3.png,1\n")
    data = CsvDataset(tmp_path / "idx.csv", classes=["x", "y", "z"])
    assert data.targets == [2, 0, 1] and data[0][1] == 2


def test_csv_label_outside_class_list_names_the_row(tmp_path):
    _rgb(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("path,label\na.png,cat\na.png,bird\n")
    with pytest.raises(
        ClassMismatchError, match=r"line 3: label 'bird' \(1 image\) is not in the class list.*no images of dog"
    ):
        CsvDataset(tmp_path / "l.csv", classes=["cat", "dog"])
    (tmp_path / "i.csv").write_text("path,label\na.png,0\na.png,7\n")
    with pytest.raises(ClassMismatchError, match=r"line 3: label '7' \(1 image\)"):
        CsvDataset(tmp_path / "i.csv", classes=["cat", "dog"])
    (tmp_path / "n.csv").write_text("path,label\na.png,0\na.png,1\na.png,-1\n")
    with pytest.raises(ValueError, match=r"line 4: label '-1'"):
        CsvDataset(tmp_path / "n.csv")


def test_csv_multilabel(tmp_path):
    for i in range(3):
        _rgb(tmp_path / f"{i}.png")
    (tmp_path / "ml.csv").write_text("path,effusion,nodule,mass\n0.png,1,0,1\n1.png,0,0,1\n2.png,1,1,0\n")
    data = CsvDataset(tmp_path / "ml.csv")
    assert data.multilabel and data.classes == ["effusion", "nodule", "mass"]
    np.testing.assert_array_equal(data.targets, [[1, 0, 1], [0, 0, 1], [1, 1, 0]])
    _, target = data[2]
    assert target.dtype == torch.float32 and target.tolist() == [1.0, 1.0, 0.0]
    with pytest.warns(UnknownClassWarning, match=r"label column 'nodule' \(1 positive image\)"):
        reordered = CsvDataset(tmp_path / "ml.csv", classes=["mass", "effusion"], unknown_classes="skip")
    np.testing.assert_array_equal(reordered.targets, [[1, 1], [1, 0], [0, 1]])
    (tmp_path / "bad.csv").write_text("path,effusion,nodule\n0.png,1,0.5\n")
    with pytest.raises(ValueError, match="line 2.*'nodule'"):
        CsvDataset(tmp_path / "bad.csv")


def test_csv_missing_files_header_and_shape_errors(tmp_path):
    _rgb(tmp_path / "a.png")
    _rgb(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,x\nb.png,y\ngone.png,y\n")
    with pytest.warns(SkippedImageWarning, match="gone.png"):
        data = CsvDataset(tmp_path / "m.csv")
    assert len(data) == 2 and len(data.skipped) == 1
    with pytest.raises(ValueError, match="line 4: image .*gone.png"):
        CsvDataset(tmp_path / "m.csv", on_error="raise")
    (tmp_path / "nohead.csv").write_text("a.png,x\nb.png,y\n")
    with pytest.raises(ValueError, match="header"):
        CsvDataset(tmp_path / "nohead.csv")
    (tmp_path / "ragged.csv").write_text("path,label\na.png,x,extra\n")
    with pytest.raises(ValueError, match="line 2: 3 columns"):
        CsvDataset(tmp_path / "ragged.csv")
    (tmp_path / "one.csv").write_text("path,label\na.png,x\nb.png,x\n")
    with pytest.raises(ValueError, match="1 class"):
        CsvDataset(tmp_path / "one.csv")
    with pytest.raises(ValueError, match="does not exist"):
        CsvDataset(tmp_path / "absent.csv")


# ---------------------------------------------------------------- transforms


def test_eval_transform_shape_dtype_and_normalisation(tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    transform = build_transforms((24, 40), train=False, mean=mean, std=std)
    out = transform(Image.new("RGB", (7, 3), (51, 102, 153)))  # 0.2, 0.4, 0.6
    assert out.shape == (3, 24, 40) and out.dtype == torch.float32 and type(out) is torch.Tensor
    expected = (torch.tensor([0.2, 0.4, 0.6]) - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out.mean((1, 2)), expected, atol=1e-5, rtol=0)
    deep = transform(torch.full((3, 5, 5), 0.4))  # what load_image returns for 16-bit files
    torch.testing.assert_close(deep[1], torch.zeros(24, 40), atol=1e-5, rtol=0)
    cropped = build_transforms(16, train=False, crop_pct=0.5)(Image.new("RGB", (64, 64)))
    assert cropped.shape == (3, 16, 16)


def test_train_transform_flip_crop_and_jitter():
    torch.manual_seed(0)
    pixels = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8) / 192
    flip = build_transforms(8, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, mean=(0,) * 3, std=(1,) * 3)
    torch.testing.assert_close(flip(pixels), pixels.flip(-1))
    fpt = build_transforms(12, train=True, **AUGMENTATIONS["fpt"])
    outs = torch.stack([fpt(Image.new("RGB", (1, 1), (120, 60, 30))) for _ in range(3)])
    assert outs.shape == (3, 3, 12, 12) and torch.isfinite(outs).all()
    tiny = build_transforms(16, train=True, **AUGMENTATIONS["ept"])(torch.rand(3, 1, 1))
    assert tiny.shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"img_size": 0}, "img_size"),
        ({"img_size": 8, "scale": (0.5, 0.1)}, "scale"),
        ({"img_size": 8, "hflip": 2.0}, "hflip"),
        ({"img_size": 8, "interpolation": "lanczos9"}, "interpolation"),
        ({"img_size": 8, "std": (1, 0, 1)}, "std"),
    ],
)
def test_transform_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_transforms(train=True, **kwargs)


def test_transforms_for_model_use_pretrained_normalisation():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_classes=2)
    model.pretrained_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
    evaluate = transforms_for_model(model, 32, train=False)
    assert evaluate.transforms[1].interpolation.value == "bilinear"
    out = evaluate(torch.full((3, 4, 4), 0.3))
    torch.testing.assert_close(out.mean((1, 2)), torch.tensor([0.4, 0.2, 0.0]), atol=1e-5, rtol=0)
    train = transforms_for_model(model, 32, train=True, augment="fpt", hflip=0.0)
    assert train(torch.rand(3, 40, 50)).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="augment"):
        transforms_for_model(model, 32, train=True, augment="bogus")


# ---------------------------------------------------------------- splits


def test_few_shot_single_label_counts_determinism_and_exclusion():
    labels = np.repeat(np.arange(3), 10)
    exclude = list(range(0, 30, 3))
    splits = make_few_shot_splits(labels, shots=[1, 5], seeds=[0, 1], exclude=exclude)
    assert set(splits) == {(1, 0), (5, 0), (1, 1), (5, 1)}
    for (k, _), indices in splits.items():
        assert np.bincount(labels[indices], minlength=3).tolist() == [k] * 3
        assert not set(indices) & set(exclude) and indices == sorted(indices)
    assert set(splits[(1, 0)]) <= set(splits[(5, 0)])
    assert splits[(5, 0)] != splits[(5, 1)]
    assert make_few_shot_splits(labels.tolist(), 5, 0, exclude=exclude)[(5, 0)] == splits[(5, 0)]


def test_few_shot_multilabel_per_positive_class():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 4)) < 0.3).astype(int)
    splits = make_few_shot_splits(labels, shots=2, seeds=range(3), exclude=[0, 1, 2])
    for indices in splits.values():
        assert (labels[indices].sum(0) >= 2).all() and not {0, 1, 2} & set(indices)
        assert len(indices) <= 2 * 4


def test_few_shot_short_class_is_a_clear_error():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="class 1 has 1 sample"):
        make_few_shot_splits(labels, shots=2, seeds=0, exclude=[3])
    with pytest.raises(ValueError, match="exclude"):
        make_few_shot_splits(labels, shots=1, seeds=0, exclude=[8])
    with pytest.raises(ValueError, match="shots"):
        make_few_shot_splits(labels, shots=0, seeds=0)


def test_train_val_split_is_stratified_and_disjoint():
    labels = np.repeat([0, 1], [20, 10])
    train, val = train_val_split(labels, val_fraction=0.2, seed=3)
    assert sorted(train + val) == list(range(30)) and not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [4, 2]
    assert train_val_split(labels, 0.2, 3) == (train, val)
    with pytest.raises(ValueError, match="class 2 has a single sample"):
        train_val_split(np.array([0, 0, 1, 1, 2]))


def test_transforms_for_model_finds_the_backbone_inside_a_wrapper():
    from timm.models.vision_transformer import VisionTransformer

    backbone = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
    backbone.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    wrapper = torch.nn.Sequential(torch.nn.Identity(), backbone)
    out = transforms_for_model(wrapper, 16, train=False)(torch.full((3, 4, 4), 1.0))
    torch.testing.assert_close(out, torch.ones(3, 16, 16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pretrained_cfg"):
        transforms_for_model(torch.nn.Linear(2, 2), 16, train=False)


# ---------------------------------------------------------------- data that would silently train the wrong thing


@pytest.mark.parametrize(
    "names", [("train", "val"), ("train", "val", "test"), ("Training", "Validation"), ("train", "test")]
)
def test_a_dataset_root_with_split_folders_is_refused_naming_the_fix(tmp_path, names):
    root = tmp_path / "chest_xray"
    for split in names:
        _folder(root / split, {"NORMAL": 2, "PNEUMONIA": 2})
    assert set(split_folders(root).values()) == {root / name for name in names}
    with pytest.raises(SplitLayoutError) as info:
        ImageFolderDataset(root)
    message = str(info.value)
    if "test" in names[1]:  # no validation split: hold a share out, test at the end
        assert f"--data {root / names[0]} --val-fraction 0.2, then evaluate --data {root / names[1]}" in message
    else:
        assert f"--data {root / names[0]} --val {root / names[1]}" in message
    assert ("evaluate on" in message) == (len(names) == 3 or "test" in names[1])
    assert "\n" not in message
    assert "NORMAL, PNEUMONIA" in message  # the classes it would have learned are inside the splits
    assert ImageFolderDataset(root / names[0]).classes == ["NORMAL", "PNEUMONIA"]
    assert ImageFolderDataset(root, classes=list(names)).classes == list(names)  # asked for explicitly: allowed
    with pytest.raises(SplitLayoutError, match="--val"):  # a validation set pointed at the root
        ImageFolderDataset(root, classes=["NORMAL", "PNEUMONIA"])


def test_split_folders_is_empty_for_a_class_folder_layout(tmp_path):
    assert split_folders(_folder(tmp_path / "a", {"cat": 1, "dog": 1})) == {}
    assert split_folders(_folder(tmp_path / "b", {"train": 1, "cat": 1})) == {}  # a class that happens to be "train"
    assert split_folders(_folder(tmp_path / "c", {"train": 1})) == {}  # one folder: no second split to confuse
    assert split_folders(_folder(tmp_path / "d", {"train": 1, "val": 1, "cat": 1})) == {}  # "cat" is a class


def test_evaluation_classes_the_model_was_not_trained_on_are_refused_or_skipped_once(tmp_path):
    root = _folder(tmp_path / "test", {"normal": 2, "pneumonia": 1, "covid": 3, "Tumour": 1})
    with pytest.raises(ClassMismatchError) as info:
        ImageFolderDataset(root, classes=["normal", "pneumonia", "tumour"])
    error = info.value
    assert error.extra == {"Tumour": 1, "covid": 3} and error.missing == ["tumour"]
    assert "class folder covid (3 images)" in str(error) and "did you mean 'tumour'" in str(error)
    assert "empty class folder" not in str(error)
    other_case = _folder(tmp_path / "case", {"ap": 1, "PA": 1})
    with pytest.raises(ClassMismatchError, match="did you mean 'pa'"):  # too short for a spelling match
        ImageFolderDataset(other_case, classes=["ap", "pa"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageFolderDataset(root, classes=["normal", "pneumonia", "tumour"], unknown_classes="skip")
    messages = [str(w.message) for w in caught]
    skipped = [str(w.message) for w in caught if w.category is UnknownClassWarning]
    assert len(skipped) == 1 and "Tumour (1 image)" in skipped[0] and "covid (3 images)" in skipped[0]
    missing = [str(w.message) for w in caught if w.category is EmptyClassWarning]
    assert len(missing) == 1 and "tumour" in missing[0] and "no folder" in missing[0]
    assert "empty class folder" not in " ".join(messages)
    assert data.classes == ["normal", "pneumonia", "tumour"] and data.targets == [0, 0, 1]
    assert data.skipped_classes == {"Tumour": 1, "covid": 3}


def test_classes_are_mapped_by_name_whatever_the_folder_order(tmp_path):
    root = _folder(tmp_path / "val", {"b": 1, "c": 2, "a": 3})
    data = ImageFolderDataset(root, classes=["c", "a", "b"])
    assert data.targets == [0, 0, 1, 1, 1, 2]
    assert [Path(p).parent.name for p, _ in data.samples] == ["c", "c", "a", "a", "a", "b"]


def test_an_empty_class_folder_is_still_called_empty(tmp_path):
    root = _folder(tmp_path / "val", {"a": 1, "b": 0, "c": 1})
    with pytest.warns(EmptyClassWarning, match=r"empty class folder\(s\) in .*\['b'\] \(kept in the class list\)"):
        ImageFolderDataset(root, classes=["a", "b", "c"])


def test_csv_classes_outside_the_list_are_named_and_can_be_skipped(tmp_path):
    for i in range(4):
        _rgb(tmp_path / f"{i}.png")
    (tmp_path / "s.csv").write_text("path,label\n0.png,cat\n1.png,bird\n2.png,dog\n3.png,bird\n")
    with pytest.raises(ClassMismatchError, match=r"lines 3, 5: label 'bird' \(2 images\)") as info:
        CsvDataset(tmp_path / "s.csv", classes=["cat", "dog"])
    assert info.value.extra == {"bird": 2}
    with pytest.warns(UnknownClassWarning, match="bird"):
        data = CsvDataset(tmp_path / "s.csv", classes=["cat", "dog"], unknown_classes="skip")
    assert data.targets == [0, 1] and data.skipped_classes == {"bird": 2}

    (tmp_path / "m.csv").write_text("path,effusion,nodule,mass\n0.png,1,0,1\n1.png,0,1,1\n")
    with pytest.raises(ClassMismatchError, match="mass") as info:
        CsvDataset(tmp_path / "m.csv", classes=["nodule", "effusion"])  # a label column the model does not know
    assert info.value.extra == {"mass": 2}
    with pytest.warns(UnknownClassWarning, match="mass"):
        data = CsvDataset(tmp_path / "m.csv", classes=["nodule", "effusion"], unknown_classes="skip")
    np.testing.assert_array_equal(data.targets, [[0, 1], [1, 0]])


def test_a_fully_transparent_image_warns_and_keeps_its_colour(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 90, 120, 200  # colour stored, alpha 0 everywhere
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    with pytest.warns(TransparentImageWarning, match=r"clear\.png.*fully transparent"):
        decoded = np.asarray(load_image(tmp_path / "clear.png"))
    assert (decoded == (90, 120, 200)).all()  # not the all-black image compositing would give

    blank = np.zeros((2, 2, 2), dtype=np.uint8)  # gray + alpha, nothing stored at all
    Image.fromarray(blank, "LA").save(tmp_path / "blank.png")
    with pytest.warns(TransparentImageWarning, match=r"blank\.png.*holds no image"):
        load_image(tmp_path / "blank.png")

    half = np.zeros((1, 3, 4), dtype=np.uint8)
    half[0, 0] = (200, 100, 50, 255)
    half[0, 1] = (200, 100, 50, 128)
    half[0, 2] = (200, 100, 50, 0)
    Image.fromarray(half, "RGBA").save(tmp_path / "half.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # partial transparency is ordinary: composited over black, no warning
        decoded = np.asarray(load_image(tmp_path / "half.png"))
    assert tuple(decoded[0, 0]) == (200, 100, 50) and tuple(decoded[0, 1]) == (100, 50, 25)
    assert tuple(decoded[0, 2]) == (0, 0, 0)


def test_every_unreadable_image_is_listed_and_written(tmp_path):
    root = _folder(tmp_path / "data", {"a": 3, "b": 3})
    for name in ("a/img0.png", "a/img2.png", "b/img1.png"):
        (root / name).write_text("not an image")
    data = ImageFolderDataset(root)
    with pytest.warns(SkippedImageWarning, match="3 unreadable"):
        data.verify(workers=1, progress=False)
    (tmp_path / "list.csv").write_text("path,label\nmissing.png,x\ndata/a/img1.png,y\ndata/b/img0.png,x\n")
    with pytest.warns(SkippedImageWarning):
        listed = CsvDataset(tmp_path / "list.csv", classes=["x", "y"])
    expected = sorted(str(root / name) for name in ("a/img0.png", "a/img2.png", "b/img1.png"))
    assert [path for path, _ in data.unreadable] == expected

    out = tmp_path / "run" / "unreadable.csv"
    assert write_unreadable(out, data, listed) == 4
    import csv

    with open(out, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "reason"] and len(rows) == 5
    assert sorted(row[0] for row in rows[1:]) == sorted([*expected, str(tmp_path / "missing.png")])
    assert all(row[1] for row in rows[1:])
    clean = ImageFolderDataset(_folder(tmp_path / "clean", {"a": 1, "b": 1}))
    assert write_unreadable(out, clean) == 0 and not out.exists()  # no stale list from an earlier attempt


def centre_square(size: int = 64, inner: int = 32) -> torch.Tensor:
    """A black [3, size, size] image with a white centre square of side `inner`."""
    image = torch.zeros(3, size, size)
    start = (size - inner) // 2
    image[:, start : start + inner, start : start + inner] = 1.0
    return image


def test_eval_crop_pct_keeps_the_centre_of_the_image():
    """crop_pct=0.5 resizes to size/0.5 and crops the centre half: a white centre a little larger than that half (44 of
    64 pixels) fills the output; the black border stays outside."""
    out = build_transforms(16, train=False, crop_pct=0.5, mean=(0,) * 3, std=(1,) * 3)(centre_square(64, 44))
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, torch.ones(3, 16, 16), atol=0.02, rtol=0)


def test_fpt_crops_keep_most_of_the_image():
    """FPT's side-branch crops cover >= 80 % of the image (ratio 0.7-1.3), so each is wider and taller than 3/4 of
    a side and always holds the centre: a small white centre mark survives every draw (EPT's 8 % crops lose it)."""
    torch.manual_seed(0)
    options = {**AUGMENTATIONS["fpt"], "color_jitter": 0.0, "mean": (0,) * 3, "std": (1,) * 3}
    fpt = build_transforms(32, train=True, **options)
    image = centre_square(64, 4)
    assert all(fpt(image).max() > 0.2 for _ in range(40))
    ept = build_transforms(32, train=True, **{**options, **{k: AUGMENTATIONS["ept"][k] for k in ("scale", "ratio")}})
    assert not all(ept(image).max() > 0.2 for _ in range(40))  # the check can tell small crops apart
