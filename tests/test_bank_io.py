"""Bank I/O: block I/O with and without O_DIRECT, checksums, the model directory's bank files (written streaming,
read on every tier, disk-tier levels read in place), and refusal of corrupt files."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from hmlm.bank.blockio import ThreadPoolBlockIO, aligned_empty
from hmlm.bank.layout import BankLayout
from hmlm.bank.levelfile import BankFileError
from hmlm.bank.rows import ALIGN, RowFormat, word_checksums
from hmlm.bank.stores import TieredStore
from hmlm.memories.ffn import FFNMemory
from hmlm.protocols import AnchorShape

K = 3
SHAPE = AnchorShape(n_layers=2, d_model=8, n_heads=1, head_dim=8, ffn_dim=16)


@pytest.mark.parametrize("direct", [True, False])
def test_block_io_round_trip(tmp_path, direct):
    path = tmp_path / "f.bin"
    stride = 2 * ALIGN
    path.write_bytes(b"\0" * (ALIGN + 10 * stride))
    io = ThreadPoolBlockIO(path, base=ALIGN, stride=stride, threads=3, direct=direct)
    src = aligned_empty(3, stride)
    src.copy_(torch.randint(0, 256, (3, stride), dtype=torch.uint8))
    io.write_rows([7, 2, 9], src, stride)
    out = aligned_empty(3, stride)
    io.read_rows([2, 9, 7], out, stride)
    assert torch.equal(out[0], src[1]) and torch.equal(out[1], src[2]) and torch.equal(out[2], src[0])
    # a partial read (the values of a record) and an unaligned buffer both work (the latter through the page cache)
    part = torch.zeros((1, stride + 1), dtype=torch.uint8)[:, 1:]
    io.read_rows([9], part, 100)
    assert torch.equal(part[0, :100], src[2, :100])
    io.flush()
    io.close()


def test_checksums_catch_any_changed_word_and_ignore_layout():
    g = torch.Generator().manual_seed(0)
    buf = torch.randint(0, 256, (4, 64), dtype=torch.uint8, generator=g)
    base = word_checksums(buf)
    wide = torch.zeros((4, 96), dtype=torch.uint8)
    wide[:, :64] = buf
    assert torch.equal(word_checksums(wide[:, :64]), base)          # a strided view, same bytes, same sums
    assert torch.equal(word_checksums(torch.zeros(2, 64, dtype=torch.uint8)), torch.zeros(2, dtype=torch.int64))
    for pos in (0, 17, 63):
        flipped = buf.clone()
        flipped[1, pos] ^= 0x40
        sums = word_checksums(flipped)
        assert sums[1] != base[1] and torch.equal(sums[[0, 2, 3]], base[[0, 2, 3]])
    swapped = buf.clone()
    swapped[2, [0, 1, 2, 3]] = buf[2, [2, 3, 0, 1]]                 # two words exchanged
    assert word_checksums(swapped)[2] != base[2] or torch.equal(buf[2, :2], buf[2, 2:4])


def test_record_views():
    fmt = RowFormat(FFNMemory().block_spec(SHAPE, 3, 2), torch.bfloat16, "factored")
    rec = aligned_empty(2, fmt.stride)
    assert fmt.stride % ALIGN == 0 and fmt.params(rec).shape == (2, fmt.numel)
    assert fmt.m(rec).dtype == torch.bfloat16 and fmt.v(rec).shape == (2, fmt.v_numel)
    rows = torch.randn(2, fmt.numel)
    named = fmt.named(rows)
    assert named["w3"].shape == (2, 2, 3, 8) and torch.equal(fmt.flatten(named), rows)


def layout() -> BankLayout:
    return BankLayout(FFNMemory(), SHAPE, (3, 2, 1), K, (0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_is_safetensors_and_loads_on_every_tier(tmp_path, dtype):
    src = TieredStore(layout(), seed=2, dtype=dtype)
    files = src.save(tmp_path / "bank")
    assert set(files) == {"l0.safetensors", "l1.safetensors", "l2.safetensors", "generic.safetensors"}
    with safe_open(str(tmp_path / "bank" / "l2.safetensors"), framework="pt") as f:
        assert f.get_tensor("blocks").shape == (27, src.format_of("l2").numel)
        assert f.get_tensor("checksum").shape == (27,) and f.metadata()["format"] == "hmlm-bank-rows-1"
    paths = torch.tensor([[0, 4, 13], [2, 8, 26]])
    want = src.fetch(paths)
    for tiers in (["device"] * 3, ["host"] * 3, ["host", "host", "disk"]):
        dst = TieredStore(layout(), seed=99, dtype=dtype, tiers=tiers, init=False, disk_dir=tmp_path / "work",
                          open_disk=False)
        dst.load(tmp_path / "bank", digests=files)
        got = dst.fetch(paths)
        for name in want:
            assert torch.equal(got[name], want[name]), (tiers, name)
        dst.close()


def test_corrupt_export_is_refused_on_every_tier(tmp_path):
    src = TieredStore(layout(), seed=2)
    files = src.save(tmp_path / "bank")
    f = tmp_path / "bank" / "l2.safetensors"
    raw = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + 5 * src.format_of("l2").param_bytes + 3] ^= 0x10    # inside block 5
    f.write_bytes(bytes(raw))
    mem = TieredStore(layout(), init=False)
    with pytest.raises(BankFileError, match=r"l2.safetensors.*\[5\]"):
        mem.load(tmp_path / "bank", digests=files)
    disk = TieredStore(layout(), init=False, tiers=["host", "host", "disk"], disk_dir=tmp_path / "w", open_disk=False)
    disk.load(tmp_path / "bank", digests=files)           # in place: a block is checked when it is read
    disk.fetch(torch.tensor([[0, 0, 4]]))
    with pytest.raises(BankFileError, match="checksum"):
        disk.fetch(torch.tensor([[0, 1, 5]]))
    disk.close()
    # a file of another export (same shape, other values) does not match model.json's record of it
    TieredStore(layout(), seed=5).save(tmp_path / "other")
    (tmp_path / "other" / "l1.safetensors").replace(tmp_path / "bank" / "l1.safetensors")
    with pytest.raises(BankFileError, match="l1.safetensors.*model.json"):
        TieredStore(layout(), init=False).load(tmp_path / "bank", digests=files)


def test_legacy_per_tensor_bank_files_load(tmp_path):
    from safetensors.torch import save_file

    src = TieredStore(layout(), seed=4)
    (tmp_path / "bank").mkdir()
    for key in src.keys():
        tensors = {n: t.contiguous() for n, t in src.named_tensors(key).items()}
        save_file(tensors, str(tmp_path / "bank" / f"{key}.safetensors"))
    dst = TieredStore(layout(), init=False)
    dst.load(tmp_path / "bank")
    for key in src.keys():
        assert torch.equal(dst.read_rows(key).params, src.read_rows(key).params)


def test_state_dict_round_trip_across_tiers_and_optim_states(tmp_path):
    for optim_state in ("fp32", "bf16", "factored"):
        a = TieredStore(layout(), seed=1, optim_state=optim_state, tiers=["host", "disk", "device"],
                        disk_dir=tmp_path / optim_state / "a")
        paths = torch.tensor([[0, 1, 2], [1, 4, 13]])
        sum(t.sum() for t in a.fetch(paths, grad=True).values()).backward()
        a.step(lr=0.1, weight_decay=0.0)
        b = TieredStore(layout(), seed=3, optim_state=optim_state, disk_dir=tmp_path / optim_state / "b")
        b.load_state_dict(a.state_dict())
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), (optim_state, k)
        a.close()
