import pytest
import torch
from torch.utils.data import Dataset

import utils
from utils import confusion_matrix, predict, segmentation_metrics, window_starts


pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# metrics


def brute_force_metrics(prediction, label, num_classes):
    """Per-class IoU/Acc (percent, None where undefined) and the means, by counting pixel by pixel."""
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    correct = total = 0
    for p, y in zip(prediction.flatten().tolist(), label.flatten().tolist()):
        if y == 255:
            continue
        total += 1
        if p == y:
            tp[y] += 1
            correct += 1
        else:
            fp[p] += 1
            fn[y] += 1
    iou = [100 * tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else None for c in range(num_classes)]
    acc = [100 * tp[c] / (tp[c] + fn[c]) if tp[c] + fn[c] else None for c in range(num_classes)]

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values)

    return {"aAcc": 100 * correct / total, "mAcc": mean(acc), "mIoU": mean(iou), "iou": iou, "acc": acc}


def test_metrics_match_a_brute_force_count_with_ignored_pixels():
    generator = torch.Generator().manual_seed(0)
    num_classes = 6
    label = torch.randint(0, 4, (3, 17, 23), generator=generator)  # classes 4 and 5 never labelled
    label[torch.rand(label.shape, generator=generator) < 0.2] = 255
    prediction = torch.randint(0, 5, label.shape, generator=generator)  # class 4 predicted, 5 never
    names = [f"c{i}" for i in range(num_classes)]

    confusion = sum(confusion_matrix(p, y, num_classes) for p, y in zip(prediction, label))
    metrics = segmentation_metrics(confusion, names)
    expected = brute_force_metrics(prediction, label, num_classes)

    assert confusion.sum() == (label != 255).sum()
    for key in ("aAcc", "mAcc", "mIoU"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-12)
    for c, name in enumerate(names):
        for key, want in (("IoU", expected["iou"][c]), ("Acc", expected["acc"][c])):
            got = metrics["per_class"][name][key]
            if want is None:  # undefined for this class: must be reported as undefined, not as a number
                assert got is None, (name, key, got)
            else:
                assert got == pytest.approx(want, rel=1e-12), (name, key)
    # the mmseg conventions: predicted-but-unlabelled class 4 has IoU 0 (counted) and no Acc;
    # class 5, in neither labels nor predictions, is undefined and left out of both means
    assert metrics["per_class"]["c4"] == {"IoU": 0.0, "Acc": None}
    assert metrics["per_class"]["c5"] == {"IoU": None, "Acc": None}


def test_perfect_prediction_is_100_percent_and_ignore_pixels_do_not_count():
    label = torch.tensor([[0, 1, 255], [2, 2, 255]])
    prediction = torch.tensor([[0, 1, 0], [2, 2, 1]])  # wrong only where the label is ignored
    metrics = segmentation_metrics(confusion_matrix(prediction, label, 3), ["a", "b", "c"])
    assert (metrics["aAcc"], metrics["mAcc"], metrics["mIoU"]) == (100.0, 100.0, 100.0)


def test_confusion_matrix_rejects_out_of_range_ids_and_shape_mismatch():
    with pytest.raises(ValueError, match="class id >= num_classes"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 3)


def test_format_metrics_prints_every_class_and_the_means():
    metrics = segmentation_metrics(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 3), ["x", "y", "z"])
    text = utils.format_metrics(metrics)
    assert [line.split()[0] for line in text.splitlines()[1:4]] == ["x", "y", "z"]
    assert text.splitlines()[-1] == "aAcc 50.00 mAcc 50.00 mIoU 25.00"


# -----------------------------------------------------------------------------
# prediction


class PointwiseNet(torch.nn.Module):
    """A 1x1 conv at full resolution: its logits at a pixel depend on that pixel only, so sliding
    windows and flips must reproduce the whole-image prediction."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_window_starts_cover_the_image_and_end_flush():
    assert window_starts(10, 20, 7) == [0]
    assert window_starts(20, 20, 14) == [0]
    starts = window_starts(50, 16, 11)
    assert starts == [0, 11, 22, 33, 34]
    assert all(b - a <= 11 for a, b in zip(starts, starts[1:]))


def test_sliding_window_flip_and_scale_1_agree_with_the_whole_image():
    torch.manual_seed(0)
    net = PointwiseNet().eval()
    image = torch.randn(1, 3, 21, 30)
    whole = predict(net, image)
    assert whole.shape == (1, 4, 21, 30)
    assert torch.allclose(whole.sum(1), torch.ones(1, 21, 30))
    assert torch.allclose(predict(net, image, window=(8, 11)), whole, atol=1e-6)
    assert torch.allclose(predict(net, image, window=(40, 40)), whole, atol=1e-6)
    assert torch.allclose(predict(net, image, flip=True), whole, atol=1e-6)
    multi = predict(net, image, scales=(0.5, 1.0, 1.5), flip=True)
    assert multi.shape == whole.shape and torch.allclose(multi.sum(1), torch.ones(1, 21, 30))


class HalfSizeImages(Dataset):
    """Images at half the size of their labels, as data.py gives them with image_scale=0.5."""
    num_classes = 4

    def __len__(self):
        return 2

    def __getitem__(self, index):
        label = torch.randint(0, 4, (18, 24), generator=torch.Generator().manual_seed(index))
        label[:3] = 255
        return torch.randn(3, 9, 12, generator=torch.Generator().manual_seed(10 + index)), label


def test_predictions_are_upsampled_to_the_labels_and_every_label_pixel_is_scored():
    torch.manual_seed(0)
    net = PointwiseNet().eval()
    image = torch.randn(1, 3, 9, 12)
    with torch.no_grad():
        probabilities = predict(net, image, size=(18, 24))
        want = utils.upsample(net(image)["out"], (18, 24)).softmax(1)
    torch.testing.assert_close(probabilities, want)
    dataset = HalfSizeImages()
    confusion = utils.evaluate(net, dataset, torch.device("cpu"))
    assert confusion.sum() == sum(int((dataset[i][1] != 255).sum()) for i in range(len(dataset)))


def test_amp_default_is_bf16_on_cuda_and_off_on_cpu():
    assert utils.resolve_amp(None, torch.device("cpu")) == "off"
    assert utils.resolve_amp(None, torch.device("cuda")) == "bf16"
    assert utils.resolve_amp("fp16", torch.device("cpu")) == "fp16"
