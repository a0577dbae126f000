import numpy as np
import torch

import data
from scenes import SYNTHETIC_CLASSES, draw_scene


def test_draw_scene_is_a_function_of_the_generator_state():
    for size in (32, 64, 96):
        image, label = draw_scene(np.random.default_rng(size), size)
        again, again_label = draw_scene(np.random.default_rng(size), size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert label.shape == (size, size) and label.dtype == np.uint8
        assert label.max() < len(SYNTHETIC_CLASSES)
        assert np.array_equal(image, again) and np.array_equal(label, again_label)


def test_synthetic_is_deterministic_and_differs_across_splits_and_seeds():
    val = data.build_dataset("synthetic", None, "val", train=False, image_size=48)
    again = data.build_dataset("synthetic", None, "val", train=False, image_size=48)
    train = data.build_dataset("synthetic", None, "train", train=False, image_size=48)
    other_seed = data.build_dataset("synthetic", None, "val", train=False, image_size=48, seed=1)
    assert (len(train), len(val)) == (data.SYNTHETIC_LENGTH["train"], data.SYNTHETIC_LENGTH["val"])
    for i in range(3):
        image, label = val[i]
        assert image.shape == (3, 48, 48) and label.shape == (48, 48) and label.dtype == torch.int64
        assert torch.equal(image, again[i][0]) and torch.equal(label, again[i][1])
        assert not torch.equal(image, train[i][0])
        assert not torch.equal(image, other_seed[i][0])


def test_synthetic_labels_in_range_and_every_class_drawn():
    dataset = data.build_dataset("synthetic", None, "train", train=False, length=60)
    counts = torch.zeros(dataset.num_classes, dtype=torch.long)
    for _, label in dataset:
        assert label.min() >= 0 and label.max() < dataset.num_classes
        counts += torch.bincount(label.flatten(), minlength=dataset.num_classes)
    assert (counts > 0).all(), dict(zip(dataset.class_names, counts.tolist()))
    assert len(dataset.palette) == len(dataset.class_names) == dataset.num_classes
