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
