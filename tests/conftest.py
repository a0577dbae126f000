import zipfile

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The nets in the training tests are tiny: one thread is faster, and on a shared CPU much faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def damage_tensor_bytes(path, count=4000):
    """Flip `count` bytes in the middle of the largest tensor of a torch.save zip file, where
    torch.load notices nothing (it checks no CRC): a disk or a copy that damaged the file."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = info.header_offset  # local file header: 30 bytes, then the name and the extra field
    start = (header + 30 + int.from_bytes(data[header + 26:header + 28], "little")
             + int.from_bytes(data[header + 28:header + 30], "little"))
    first = start + max(0, (info.file_size - count) // 2)
    for i in range(first, first + min(count, info.file_size)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def damage():
    return damage_tensor_bytes


@pytest.fixture
def crash_in_step(monkeypatch):
    """crash_in_step(n): from now on train.py's n-th training step raises KeyboardInterrupt, as a
    kill would stop it; returns a function that puts the real step back."""
    import train

    real_losses = train.train_losses

    def arm(n):
        calls = []

        def crashing(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_losses(*args, **kwargs)

        monkeypatch.setattr(train, "train_losses", crashing)
        return lambda: monkeypatch.setattr(train, "train_losses", real_losses)

    return arm
