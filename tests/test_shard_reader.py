"""Parallel positioned reads of safetensors rows == what the safetensors library reads."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fsdp_qlora.model.shard_reader import RowRange, RowReader, ShardFormatError, read_ahead, read_index

TENSORS = {
    "matrix": torch.randn(96, 40).to(torch.bfloat16),
    "vector": torch.randn(33),
    "cube": torch.arange(5 * 6 * 7, dtype=torch.int64).reshape(5, 6, 7),
    "scalar": torch.tensor(3.5, dtype=torch.float16),
    "empty": torch.zeros(0, 4),
    "flags": torch.tensor([True, False, True]),
}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    return path


def test_index_matches_the_library(shard):
    entries = read_index(shard)
    with safe_open(str(shard), framework="pt") as reader:
        assert sorted(entries) == sorted(reader.keys())
        for name, entry in entries.items():
            assert list(entry.shape) == list(reader.get_slice(name).get_shape())
            assert entry.dtype == reader.get_tensor(name).dtype


@pytest.mark.parametrize("workers, chunk_bytes", [(1, 1 << 20), (4, 7)])  # 7: reads split mid-element
def test_row_ranges_equal_the_library_slices(shard, workers, chunk_bytes):
    entries = read_index(shard)
    ranges = [RowRange(entries[name], start, stop) for name, start, stop in
              [("matrix", 0, 96), ("matrix", 48, 96), ("matrix", 95, 96), ("vector", 11, 22), ("cube", 2, 5),
               ("scalar", 0, 1), ("empty", 0, 0), ("flags", 1, 3), ("matrix", 0, 0)]]
    # A window smaller than any slice: every read still runs one ahead, results stay in order.
    with RowReader(workers, chunk_bytes=chunk_bytes) as reader:
        got = list(read_ahead(ranges, reader, max_bytes_in_flight=16))
    assert [rows for rows, _ in got] == ranges
    for rows, tensor in got:
        expected = TENSORS[rows.entry.name]
        expected = expected if expected.dim() == 0 else expected[rows.start:rows.stop]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape
        assert torch.equal(tensor, expected), rows


def test_truncated_or_corrupt_files_are_one_clear_error(shard, tmp_path):
    from fsdp_qlora.errors import ConfigError

    assert issubclass(ShardFormatError, ConfigError)  # train.py prints it as one line, exit 2
    data = shard.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-10])
    with pytest.raises(ShardFormatError, match="truncated.safetensors is truncated or corrupt .* re-download it"):
        read_index(truncated)
    for name, content in [("huge-length", b"\xff" * 64), ("not-json", (20).to_bytes(8, "little") + b"{not json" * 4),
                          ("no-offsets", (24).to_bytes(8, "little") + b'{"w": {"dtype": "F32"}} ')]:
        garbage = tmp_path / f"{name}.safetensors"
        garbage.write_bytes(content)
        with pytest.raises(ShardFormatError, match=f"{name}.safetensors has a corrupt safetensors header"):
            read_index(garbage)
