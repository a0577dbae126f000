import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data


def save_rgb(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def save_label(path, array, palette=False):
    """An 8-bit label PNG; palette=True writes a VOC-style P image whose indices are the ids."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(np.asarray(array, np.uint8), mode="L")
    if palette:
        img = img.convert("P")  # keeps the indices; give it the VOC colours like the real files
        img.putpalette([c for colour in data.voc_colormap(256) for c in colour])
    img.save(path)


def denormalise(image):
    """float 3 x H x W -> float H x W x 3 in 0..255."""
    mean = torch.tensor(data.MEAN).view(3, 1, 1)
    std = torch.tensor(data.STD).view(3, 1, 1)
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def random_ids(rng, shape, values):
    return rng.choice(np.asarray(values, np.uint8), size=shape)


# -----------------------------------------------------------------------------
# fixture trees in the real layouts

def make_voc(root, rng, aug=False):
    """VOC2012 with train a, b and val c; with aug, SegmentationClassAug + train_aug.txt (a, b, d)."""
    labels = {}
    for name in "abcd":
        save_rgb(root / "JPEGImages" / f"{name}.jpg", rng.integers(0, 255, (20, 28, 3)))
        label = random_ids(rng, (20, 28), range(21))
        label[0, :] = 255  # boundary pixels, ignored
        labels[name] = label
        save_label(root / "SegmentationClass" / f"{name}.png", label, palette=True)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("a\nb\n")
    (lists / "val.txt").write_text("c\n")
    if aug:
        for name in "abd":
            labels["aug_" + name] = random_ids(rng, (20, 28), range(21))
            save_label(root / "SegmentationClassAug" / f"{name}.png", labels["aug_" + name])
        (lists / "train_aug.txt").write_text("a\nb\nd\n")
    return labels


def make_cityscapes(root, rng):
    labels = {}
    for split, city, frames in (("train", "aachen", 2), ("train", "bonn", 1), ("val", "lindau", 1)):
        for i in range(frames):
            stem = f"{city}_{i:06d}_000019"
            save_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rng.integers(0, 255, (16, 32, 3)))
            label = random_ids(rng, (16, 32), list(range(34)) + [255])
            labels[stem] = label
            save_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
    return labels


def make_camvid(root, rng):
    """train: 0001 (png) and 0002 (jpg) with labels 0..11; val: 0003 (png)."""
    images, labels = {}, {}
    for split, stem, ext in (("train", "0001", "png"), ("train", "0002", "jpg"), ("val", "0003", "png")):
        images[stem] = np.full((18, 24, 3), int(stem) * 60, np.uint8)  # colour identifies the frame
        labels[stem] = random_ids(rng, (18, 24), range(12))
        save_rgb(root / split / f"{stem}.{ext}", images[stem])
        save_label(root / f"{split}annot" / f"{stem}.png", labels[stem])
    return images, labels


def test_voc_lengths_and_labels_keep_255(tmp_path):
    labels = make_voc(tmp_path, np.random.default_rng(0))
    train = data.build_dataset("voc", tmp_path, "train", train=True, crop_size=16)
    val = data.build_dataset("voc", tmp_path, "val", train=False)
    assert (len(train), len(val)) == (2, 1)
    assert (val.num_classes, len(val.class_names), len(val.palette)) == (21, 21, 21)
    assert val.palette[15] == (192, 128, 128)  # person in the VOC devkit colormap
    image, label = val[0]
    assert image.shape == (3, 20, 28) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    np.testing.assert_array_equal(label.numpy(), labels["c"])  # palette indices, 255 kept
    assert (label[0] == 255).all()


def test_voc_prefers_sbd_aug_when_present(tmp_path):
    labels = make_voc(tmp_path, np.random.default_rng(1), aug=True)
    train = data.build_dataset("voc", tmp_path, "train", train=False)
    val = data.build_dataset("voc", tmp_path, "val", train=False)
    assert (len(train), len(val)) == (3, 1)
    np.testing.assert_array_equal(train[2][1].numpy(), labels["aug_d"])
    np.testing.assert_array_equal(val[0][1].numpy(), labels["c"])  # val stays on SegmentationClass


def test_voc_aug_list_overlapping_val_is_an_error(tmp_path):
    make_voc(tmp_path, np.random.default_rng(2), aug=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("a\nc\n")
    with pytest.raises(ValueError, match="train_aug.txt.*val.txt"):
        data.build_dataset("voc", tmp_path, "train", train=False)


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    labels = make_cityscapes(tmp_path, np.random.default_rng(3))
    train = data.build_dataset("cityscapes", tmp_path, "train", train=False)
    val = data.build_dataset("cityscapes", tmp_path, "val", train=False)
    assert (len(train), len(val), train.num_classes) == (3, 1, 19)
    expected = np.full(256, 255)
    for label_id, train_id in {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                               24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}.items():
        expected[label_id] = train_id
    image, label = train[2]  # sorted by city: aachen 0, aachen 1, bonn 0
    assert image.shape == (3, 16, 32)
    np.testing.assert_array_equal(label.numpy(), expected[labels["bonn_000000_000019"]])


def test_camvid_pairs_by_stem_and_void_becomes_255(tmp_path):
    images, labels = make_camvid(tmp_path, np.random.default_rng(4))
    train = data.build_dataset("camvid", tmp_path, "train", train=False)
    val = data.build_dataset("camvid", tmp_path, "val", train=False)
    assert (len(train), len(val), train.num_classes) == (2, 1, 11)
    for dataset, stems in ((train, ("0001", "0002")), (val, ("0003",))):
        for (image, label), stem in zip(dataset, stems):
            assert abs(denormalise(image).mean() - images[stem].mean()) < 3  # the jpg is lossy
            expected = labels[stem].astype(np.int64)
            expected[expected == 11] = 255
            np.testing.assert_array_equal(label.numpy(), expected)


def test_training_needs_a_crop_size(tmp_path):
    make_camvid(tmp_path, np.random.default_rng(5))
    with pytest.raises(ValueError, match="crop_size"):
        data.build_dataset("camvid", tmp_path, "train", train=True)


# -----------------------------------------------------------------------------
# augmentation

def colour_coded(rng, height, width, block=16):
    """A label of block x block squares of ids 0..9 and an image whose colour encodes the id."""
    ids = rng.integers(0, 10, (height // block + 1, width // block + 1))
    label = np.kron(ids, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)
    colours = np.array([[25 * i, 255 - 25 * i, (80 * i) % 256] for i in range(10)], np.uint8)
    return Image.fromarray(colours[label]), label, colours


@pytest.mark.parametrize("crop", [(24, 40), (150, 90)])  # smaller / larger than the scaled image
def test_augmentation_keeps_image_and_label_aligned(crop):
    torch.manual_seed(0)
    rng = np.random.default_rng(6)
    for _ in range(20):
        image, label, colours = colour_coded(rng, 64, 72)
        out_image, out_label = data.random_scale_crop_flip(image, label, crop)
        assert out_image.shape == (3, *crop) and out_label.shape == crop
        out_label = out_label.numpy()
        assert set(np.unique(out_label)) <= set(np.unique(label)) | {255}  # never invents values
        # interior pixels (same id everywhere within 3 px) must show exactly their id's colour;
        # pixels near an edge are blended by the bilinear resize
        padded = np.pad(out_label, 3, constant_values=254)
        interior = np.ones(crop, bool)
        for dy in range(7):
            for dx in range(7):
                interior &= padded[dy:dy + crop[0], dx:dx + crop[1]] == out_label
        interior &= out_label != 255
        assert interior.any()
        rgb = denormalise(out_image)
        np.testing.assert_allclose(rgb[interior], colours[out_label[interior]], atol=1.5)
        # padding: label 255 (the source has none) and image 0 after normalisation (the mean)
        assert (out_image[:, torch.from_numpy(out_label == 255)] == 0).all()


def test_augmentation_differs_across_dataloader_workers(tmp_path):
    images, _ = make_camvid(tmp_path, np.random.default_rng(7))
    dataset = data.build_dataset("camvid", tmp_path, "train", train=True, crop_size=12)
    same_item = torch.utils.data.Subset(dataset, [0] * 8)
    loader = torch.utils.data.DataLoader(same_item, batch_size=1, num_workers=2)
    labels = torch.cat([label for _, label in loader])
    assert len({tuple(label.flatten().tolist()) for label in labels}) > 1


def test_image_scale_resizes_images_and_training_labels_but_not_validation_labels(tmp_path):
    _, labels = make_camvid(tmp_path, np.random.default_rng(13))  # 18 x 24 frames
    full = data.build_dataset("camvid", tmp_path, "val", train=False)[0]
    image, label = data.build_dataset("camvid", tmp_path, "val", train=False, image_scale=0.5)[0]
    assert image.shape == (3, 9, 12) and torch.equal(label, full[1])  # scored against the full labels
    # training: the augmentation of the frame and label resized first (bilinear and nearest)
    scaled = data.build_dataset("camvid", tmp_path, "train", train=True, crop_size=(16, 20), image_scale=0.5)
    torch.manual_seed(3)
    got_image, got_label = scaled[0]
    source = Image.open(tmp_path / "train" / "0001.png").convert("RGB").resize((12, 9), Image.BILINEAR)
    unscaled_label = data.build_dataset("camvid", tmp_path, "train", train=False)[0][1].numpy().astype(np.uint8)
    torch.manual_seed(3)
    want_image, want_label = data.random_scale_crop_flip(
        source, np.array(Image.fromarray(unscaled_label).resize((12, 9), Image.NEAREST)), (16, 20))
    assert torch.equal(got_image, want_image) and torch.equal(got_label, want_label)


@pytest.mark.parametrize("scale", [0, -0.5, 4.5, float("nan"), float("inf")])
def test_image_scale_outside_0_4_is_refused(tmp_path, scale):
    make_camvid(tmp_path, np.random.default_rng(14))
    with pytest.raises(ValueError, match=r"image scale must be a number in \(0, 4\], got"):
        data.build_dataset("camvid", tmp_path, "val", train=False, image_scale=scale)


def test_the_synthetic_set_takes_no_image_scale():
    with pytest.raises(ValueError, match="synthetic set takes no image scale"):
        data.build_dataset("synthetic", None, "val", train=False, image_scale=0.5)


# -----------------------------------------------------------------------------
# the synthetic set (its scenes: tests/test_scenes.py)

def test_synthetic_training_items_have_the_crop_size():
    dataset = data.build_dataset("synthetic", None, "train", train=True, crop_size=(40, 64), image_size=48)
    image, label = dataset[0]
    assert image.shape == (3, 40, 64) and label.shape == (40, 64)
    assert (label[40:, :] == 255).all() and (label[:, 48:] == 255).all()  # padded past 48 x 48 only
    assert (label[:40, :48] != 255).all()


# -----------------------------------------------------------------------------
# bad input

def test_missing_root_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainannot"):
        data.build_dataset("camvid", tmp_path / "nope", "train", train=False)
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        data.build_dataset("voc", tmp_path / "nope", "val", train=False)
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        data.build_dataset("cityscapes", tmp_path / "nope", "val", train=False)


def test_image_without_label(tmp_path):
    make_camvid(tmp_path, np.random.default_rng(8))
    save_rgb(tmp_path / "train" / "0009.jpg", np.zeros((18, 24, 3)))
    with pytest.raises(ValueError, match="0009.jpg has no label"):
        data.build_dataset("camvid", tmp_path, "train", train=False)
    make_cityscapes(tmp_path / "cs", np.random.default_rng(8))
    os.remove(tmp_path / "cs" / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png")
    with pytest.raises(ValueError, match="lindau_000000_000019_leftImg8bit.png has no label"):
        data.build_dataset("cityscapes", tmp_path / "cs", "val", train=False)


@pytest.mark.parametrize("index, name", [(0, "0001.png"), (1, "0002.jpg")])
def test_truncated_image_names_the_file(tmp_path, index, name):
    make_camvid(tmp_path, np.random.default_rng(9))
    path = tmp_path / "train" / name
    save_rgb(path, np.random.default_rng(9).integers(0, 255, (18, 24, 3)))
    path.write_bytes(path.read_bytes()[:120])
    dataset = data.build_dataset("camvid", tmp_path, "train", train=False)
    with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
        dataset[index]


def test_label_out_of_range_names_file_and_values(tmp_path):
    _, labels = make_camvid(tmp_path, np.random.default_rng(10))
    label = labels["0003"].copy()
    label[0, :2] = (12, 40)
    save_label(tmp_path / "valannot" / "0003.png", label)
    dataset = data.build_dataset("camvid", tmp_path, "val", train=False)
    with pytest.raises(ValueError, match=r"0003.png has values \[12, 40\]"):
        dataset[0]


def test_colour_label_and_size_mismatch_are_errors(tmp_path):
    make_camvid(tmp_path, np.random.default_rng(11))
    save_rgb(tmp_path / "valannot" / "0003.png", np.zeros((18, 24, 3)))
    with pytest.raises(ValueError, match="0003.png has mode RGB"):
        data.build_dataset("camvid", tmp_path, "val", train=False)[0]
    save_label(tmp_path / "trainannot" / "0001.png", np.zeros((10, 24)))
    with pytest.raises(ValueError, match="0001.png is 24x18 but its label .*0001.png is 24x10"):
        data.build_dataset("camvid", tmp_path, "train", train=False)[0]


def test_empty_split(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "testannot").mkdir()
    with pytest.raises(ValueError, match="empty"):
        data.build_dataset("camvid", tmp_path, "test", train=False)
    make_voc(tmp_path / "voc", np.random.default_rng(12))
    (tmp_path / "voc" / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match="val.txt lists no images"):
        data.build_dataset("voc", tmp_path / "voc", "val", train=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_dataset("coco", None, "train", train=False)
    with pytest.raises(ValueError, match="splits"):
        data.build_dataset("synthetic", None, "test", train=False)
    with pytest.raises(ValueError, match="crop_size"):
        data.build_dataset("synthetic", None, "train", train=True, crop_size=(0, 4))
    with pytest.raises(ValueError, match="length"):
        data.build_dataset("synthetic", None, "train", train=False, length=0)
    with pytest.raises(ValueError, match="colour"):
        data.build_dataset("synthetic", None, "train", train=False, colour=True)
    with pytest.raises(ValueError, match="no options"):
        data.build_dataset("camvid", "somewhere", "train", train=False, seed=1)


# ----------------------------------------------------------------------------- labelled lists

def test_labelled_list_in_each_datasets_own_format(tmp_path):
    make_camvid(tmp_path / "camvid", np.random.default_rng(20))
    camvid = data.build_dataset("camvid", tmp_path / "camvid", "train", train=False)
    listing = tmp_path / "camvid_list.txt"
    listing.write_text("train/0002.jpg trainannot/0002.png\n\n")  # train.txt's format; blank lines skipped
    assert data.listed_indices(camvid, listing) == [1]
    make_voc(tmp_path / "voc", np.random.default_rng(21))
    voc = data.build_dataset("voc", tmp_path / "voc", "train", train=False)
    listing.write_text("b\na\nb\n")  # VOC ids; a repeat counts once
    assert data.listed_indices(voc, listing) == [0, 1]
    synthetic = data.build_dataset("synthetic", None, "train", train=False, length=8, image_size=32)
    listing.write_text("7\n0\n")
    assert data.listed_indices(synthetic, listing) == [0, 7]


def test_labelled_list_errors_name_the_file_and_line(tmp_path):
    synthetic = data.build_dataset("synthetic", None, "train", train=False, length=8, image_size=32)
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=f"--labelled-list: {re.escape(str(missing))} not found"):
        data.listed_indices(synthetic, missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match=f"--labelled-list: {re.escape(str(empty))} lists no frame"):
        data.listed_indices(synthetic, empty)
    stranger = tmp_path / "stranger.txt"
    stranger.write_text("1\n8\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(stranger))} line 2 names '8', which is not a frame of the "
                                         r"train split \(8 frames\)"):
        data.listed_indices(synthetic, stranger)


def test_partly_labelled_keeps_the_image_and_ignores_the_labels_of_unlisted_frames():
    synthetic = data.build_dataset("synthetic", None, "train", train=False, length=4, image_size=32)
    partly = data.PartlyLabelled(synthetic, [2])
    assert len(partly) == 4 and partly.num_classes == synthetic.num_classes
    for index in range(4):
        image, label = partly[index]
        want_image, want_label = synthetic[index]
        assert torch.equal(image, want_image)
        assert torch.equal(label, want_label) if index == 2 else (label == data.IGNORE_INDEX).all()


# ----------------------------------------------------------------------------- IDD-Lite

def make_idd_lite(root, rng):
    """train: sequences 0 (frames 000100, 000200) and 7 (000100 again: frame numbers repeat across
    sequences); val: sequence 3 (000300). Labels 0..6 and 255."""
    labels = {}
    for split, sequence, frame in (("train", "0", "000100"), ("train", "0", "000200"), ("train", "7", "000100"),
                                   ("val", "3", "000300")):
        save_rgb(root / "leftImg8bit" / split / sequence / f"{frame}_image.jpg", rng.integers(0, 255, (12, 16, 3)))
        label = random_ids(rng, (12, 16), list(range(7)) + [255])
        labels[f"{sequence}/{frame}"] = label
        save_label(root / "gtFine" / split / sequence / f"{frame}_label.png", label)
    return labels


def test_idd_lite_reads_its_official_layout(tmp_path, monkeypatch):
    labels = make_idd_lite(tmp_path, np.random.default_rng(30))
    monkeypatch.chdir(tmp_path)  # a relative root
    assert len(data.build_dataset("idd_lite", ".", "val", train=False)) == 1
    train = data.build_dataset("idd_lite", tmp_path, "train", train=False)
    val = data.build_dataset("idd_lite", tmp_path, "val", train=False)
    assert (len(train), len(val), train.num_classes) == (3, 1, 7)
    assert train.class_names == data.IDD_LITE_CLASSES and len(train.palette) == 7
    assert data.frame_names(train) == ["0/000100", "0/000200", "7/000100"]
    for dataset, names in ((train, data.frame_names(train)), (val, ["3/000300"])):
        for index, name in enumerate(names):
            image, label = dataset[index]
            assert image.shape == (3, 12, 16)
            assert np.array_equal(label.numpy(), labels[name])
    cropped = data.build_dataset("idd_lite", tmp_path, "train", train=True, crop_size=(8, 8), image_scale=0.5)
    assert cropped[0][0].shape == (3, 8, 8)


def test_idd_lite_errors_name_the_file(tmp_path):
    make_idd_lite(tmp_path, np.random.default_rng(31))
    with pytest.raises(FileNotFoundError, match="IDD-Lite layout"):
        data.build_dataset("idd_lite", tmp_path / "nope", "train", train=False)
    os.remove(tmp_path / "gtFine" / "train" / "7" / "000100_label.png")
    with pytest.raises(ValueError, match=r"000100_image.jpg has no label: .*7/000100_label.png does not exist"):
        data.build_dataset("idd_lite", tmp_path, "train", train=False)
    save_label(tmp_path / "gtFine" / "val" / "3" / "000300_label.png", np.full((12, 16), 7))
    with pytest.raises(ValueError, match=r"000300_label.png has values \[7\] outside"):
        data.build_dataset("idd_lite", tmp_path, "val", train=False)[0]
    with pytest.raises(ValueError, match="splits"):
        data.build_dataset("idd_lite", tmp_path, "test", train=False)


def test_idd_lite_labelled_list_names_sequence_and_frame(tmp_path):
    make_idd_lite(tmp_path, np.random.default_rng(32))
    train = data.build_dataset("idd_lite", tmp_path, "train", train=False)
    listing = tmp_path / "list.txt"
    listing.write_text("7/000100\nleftImg8bit/train/0/000200_image.jpg\n")  # a name, or an image path
    assert data.listed_indices(train, listing) == [1, 2]
    listing.write_text("000100\n")  # without its sequence the frame number is ambiguous
    with pytest.raises(ValueError, match="line 1 names '000100', which is not a frame"):
        data.listed_indices(train, listing)


def test_labelled_list_that_is_not_utf8_is_named(tmp_path):
    synthetic = data.build_dataset("synthetic", None, "train", train=False, length=8, image_size=32)
    listing = tmp_path / "latin1.txt"
    listing.write_bytes("1\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"--labelled-list: {re.escape(str(listing))} is not UTF-8 text"):
        data.listed_indices(synthetic, listing)


def test_every_record_is_complete():
    for name, record in data.DATASETS.items():
        assert len(record.classes) == len(record.palette), name
        assert {"data_root", "iters", "batch_size", "lr", "crop_size", "width"} <= set(record.defaults), name
        assert set(record.label_ids.values()) == set(range(len(record.classes))) or record.pairs is None, name


# ----------------------------------------------------------------------------- cross-domain

def test_camvid_and_idd_lite_share_idd_lites_seven_classes():
    groups, lut, coarse = data.shared_classes("camvid", "idd_lite")  # a CamVid model on IDD-Lite frames
    assert lut is None and coarse == "idd_lite"
    camvid = data.CAMVID_CLASSES
    assert [[camvid[i] for i in group] for group in groups] == [
        ["road"], ["pavement"], ["pedestrian", "bicyclist"], ["car"], ["pole", "signsymbol", "fence"],
        ["building", "tree"], ["sky"]]
    groups, lut, coarse = data.shared_classes("idd_lite", "camvid")  # an IDD-Lite model on CamVid frames
    assert groups is None and coarse == "idd_lite"
    assert lut[:11].tolist() == [6, 5, 4, 0, 1, 5, 4, 4, 3, 2, 2] and lut[255] == 255


def test_a_pair_without_a_correspondence_is_refused_by_name():
    with pytest.raises(ValueError, match="no class correspondence between voc and camvid"):
        data.shared_classes("voc", "camvid")
    with pytest.raises(ValueError, match="no class correspondence between idd_lite and camvid over the classes of camvid"):
        data.shared_classes("idd_lite", "camvid", "camvid")  # IDD-Lite's classes do not split into CamVid's
    groups, lut, coarse = data.shared_classes("camvid", "camvid", "idd_lite")  # both sides mapped
    assert len(groups) == 7 and lut[3] == 0 and coarse == "idd_lite"


def test_shared_labels_maps_the_label_ids(tmp_path):
    labels = make_camvid(tmp_path, np.random.default_rng(33))[1]
    val = data.build_dataset("camvid", tmp_path, "val", train=False)
    _, lut, coarse = data.shared_classes("idd_lite", "camvid")
    shared = data.SharedLabels(val, lut, coarse)
    assert shared.num_classes == 7 and shared.class_names == data.IDD_LITE_CLASSES
    assert shared.palette == data.IDD_LITE_PALETTE
    want = np.where(labels["0003"] == 11, 255, lut[np.minimum(labels["0003"], 10)])
    assert np.array_equal(shared[0][1].numpy(), want)
