"""DeepSpeed for the bank's offloaded tiers (issue 9): the disk tier through DeepSpeed's async I/O
(`memory.disk_io`), host rows updated by DeepSpeed's CPU Adam (`memory.host_update`), and the zero3 baseline store.

The ops build only where DeepSpeed (and, for async I/O, libaio: HMLM_LIBAIO_DIR) is there; those tests are skipped with
the reason elsewhere (CI). The recipe keys, their refusals and the fallback of `auto` are tested everywhere.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from hmlm.bank import blockio
from hmlm.bank.aio import block_io_factory
from hmlm.bank.blockio import ThreadPoolBlockIO, aligned_empty
from hmlm.bank.cpu_adam import resolve_host_update
from hmlm.bank.dsops import OpUnavailable, load_op
from hmlm.bank.layout import BankLayout
from hmlm.bank.stores import TieredStore
from hmlm.config import RecipeError
from hmlm.memories.ffn import FFNMemory
from hmlm.protocols import AnchorShape

K = 3
SHAPE = AnchorShape(n_layers=2, d_model=8, n_heads=1, head_dim=8, ffn_dim=16)


def op_or_skip(name: str):
    try:
        return load_op(name)
    except OpUnavailable as exc:
        pytest.skip(f"DeepSpeed's {name} op is not available here: {exc}")


def have_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


# ------------------------------------------------------------------------------------------------ keys and fallbacks
def test_recipe_keys_and_refusals(tiny_recipe):
    r = tiny_recipe(**{"memory.disk_io": "threads", "memory.host_update": "cpu_adam"})
    assert r.memory.disk_io == "threads" and r.memory.host_update == "cpu_adam"
    assert tiny_recipe().memory.disk_io == "auto" and tiny_recipe().memory.host_update == "auto"
    with pytest.raises(RecipeError, match="memory.disk_io"):
        tiny_recipe(**{"memory.disk_io": "uring"})
    with pytest.raises(RecipeError, match="memory.host_update"):
        tiny_recipe(**{"memory.host_update": "tpu"})
    # DeepSpeed's CPU Adam keeps full moments: the factored second moment is refused, naming both keys
    with pytest.raises(RecipeError, match=r"memory\.host_update.*memory\.optim_state=factored"):
        tiny_recipe(**{"memory.host_update": "cpu_adam", "memory.optim_state": "factored"})
    assert resolve_host_update("auto", "factored") == "gpu"
    with pytest.raises(ValueError, match="memory.optim_state=factored"):
        resolve_host_update("cpu_adam", "factored")


@pytest.mark.skipif(have_deepspeed(), reason="checks the refusal where DeepSpeed is not installed")
def test_auto_is_the_thread_pool_and_aio_says_why_it_cannot(caplog, monkeypatch):
    """`auto` is the thread pool (it trained faster than AIO on the GPU machine) and never tries the op; `aio` where
    the op cannot load is an error naming both keys."""
    monkeypatch.setattr(blockio, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="hmlm.bank"):
        assert block_io_factory("auto") is ThreadPoolBlockIO
    assert not [r for r in caplog.records if "async I/O" in r.getMessage()]
    with pytest.raises(OpUnavailable, match="memory.disk_io=aio.*memory.disk_io=threads"):
        block_io_factory("aio")
    assert block_io_factory("threads") is ThreadPoolBlockIO


# ------------------------------------------------------------------------------------------------ async I/O
def test_aio_block_io_reads_and_writes_what_the_thread_pool_does(tmp_path):
    op_or_skip("async_io")
    from hmlm.bank.aio import AIOBlockIO

    stride, rows = 8192, 6
    path = tmp_path / "f.level"
    with open(path, "wb") as f:
        f.truncate(4096 + rows * stride)
    aio = AIOBlockIO(path, base=4096, stride=stride, threads=3)
    threads = ThreadPoolBlockIO(path, base=4096, stride=stride, threads=2)
    if not aio.direct:
        pytest.skip(f"{tmp_path} does not accept O_DIRECT")
    g = torch.Generator().manual_seed(0)
    src = aligned_empty(rows, stride)
    src.copy_(torch.randint(0, 256, (rows, stride), generator=g, dtype=torch.uint8))
    aio.write_rows([4, 1, 5], src[:3], stride)
    out = aligned_empty(3, stride)
    threads.read_rows([4, 1, 5], out, stride)
    assert torch.equal(out, src[:3]) and aio.requests == 3
    threads.write_range(0, src)
    back = aligned_empty(rows, stride)
    aio.read_range(0, back)
    assert torch.equal(back, src)
    # the first bytes of records (values only): spans of whole 4 KiB pages through the kernel
    part = aligned_empty(2, 4096)
    aio.read_rows([2, 3], part, 100)
    assert torch.equal(part[:, :100], src[2:4, :100])
    # an unaligned buffer takes the thread pool's path and gives the same bytes
    odd = torch.empty((2, stride + 1), dtype=torch.uint8)[:, 1:]
    before = aio.requests
    aio.read_rows([0, 5], odd, stride)
    assert torch.equal(odd, src[[0, 5]]) and aio.requests == before
    aio.close()
    threads.close()


def train_store(store: TieredStore, steps: int, seed: int = 1, lr: float = 3e-3) -> list[float]:
    """A few steps of fitting the fetched memory to random targets (MSE), paths at random; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    layout = store.layout
    targets = {name: torch.randn((K ** 3, *s.shape), generator=g) * 0.05
               for name, s in layout.spec(layout.total_rank).items()}
    losses = []
    for _ in range(steps):
        leaf = torch.randint(0, K ** 3, (5,), generator=g)
        paths = torch.stack([leaf // K ** 2, leaf // K, leaf], 1)
        nxt = torch.stack([leaf // K ** 2, leaf // K, leaf], 1)
        store.prefetch(nxt)
        fetched = store.fetch(paths, grad=True, generic_mask=torch.tensor([False, True, False, False, False]))
        loss = sum(((fetched[n] - targets[n][leaf]) ** 2).mean() for n in fetched)
        loss.backward()
        losses.append(float(loss.detach()))
        store.step(lr=lr, weight_decay=0.01, grad_clip=0.5)
    return losses


def layout3() -> BankLayout:
    return BankLayout(FFNMemory(), SHAPE, (3, 2, 1), K, (0, 1))


def bank_of(store: TieredStore) -> dict[str, torch.Tensor]:
    return {key: store.read_rows(key, with_state=True).params.clone() for key in store.keys()}


def test_disk_tier_trains_identically_through_aio_and_threads(tmp_path):
    op_or_skip("async_io")
    from hmlm.bank.aio import AIOBlockIO

    runs = {}
    for disk_io in ("threads", "aio"):
        store = TieredStore(layout3(), seed=3, tiers=["disk", "host", "disk"], disk_dir=tmp_path / disk_io,
                            optim_state="bf16", dtype=torch.bfloat16, io_threads=2, disk_io=disk_io)
        losses = train_store(store, 6)
        io = store.levels["l0"].storage.io
        assert isinstance(io, AIOBlockIO if disk_io == "aio" else ThreadPoolBlockIO)
        if disk_io == "aio":
            if not io.direct:
                pytest.skip(f"{tmp_path} does not accept O_DIRECT")
            assert io.requests > 0   # the rows went through DeepSpeed's handles
        runs[disk_io] = (losses, bank_of(store), store.read_rows("l2", with_state=True).m.clone())
        store.close()
    assert runs["aio"][0] == runs["threads"][0]
    for key, ref in runs["threads"][1].items():
        assert torch.equal(runs["aio"][1][key], ref), key
    assert torch.equal(runs["aio"][2], runs["threads"][2])


# ------------------------------------------------------------------------------------------------ CPU Adam
@pytest.mark.parametrize("dtype,optim_state", [(torch.float32, "fp32"), (torch.bfloat16, "fp32"),
                                               (torch.float32, "bf16"), (torch.bfloat16, "bf16")])
def test_cpu_adam_equals_the_gpu_path_on_host_rows(dtype, optim_state):
    op_or_skip("cpu_adam")
    runs = {}
    for update in ("gpu", "cpu_adam"):
        store = TieredStore(layout3(), seed=5, tiers=["host", "device", "host"], dtype=dtype, optim_state=optim_state,
                            host_update=update)
        losses = train_store(store, 8)
        assert store.updates_on_host("l2") == (update == "cpu_adam") and not store.updates_on_host("l1")
        state = {key: store.read_rows(key, with_state=True) for key in store.keys()}
        runs[update] = (losses, state, store.steps_of("l2").clone())
        store.close()
    (ref_losses, ref, ref_steps), (losses, got, steps) = runs["gpu"], runs["cpu_adam"]
    assert torch.equal(steps, ref_steps)
    # float32 rounding of a different kernel; bf16 storage rounds a few values to the neighbouring bf16 number
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 and optim_state == "fp32" else dict(rtol=2e-2,
                                                                                                    atol=1e-4)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **tol)
    for key in ref:
        for part in ("params", "m", "v"):
            torch.testing.assert_close(getattr(got[key], part).float(), getattr(ref[key], part).float(), **tol,
                                       msg=lambda m: f"{key}.{part}: {m}")
    # rows never fetched keep their initial values, bit for bit
    fetched = runs["gpu"][2] > 0
    assert not bool(fetched.all()) and bool(fetched.any())
    assert torch.equal(got["l2"].params[~fetched], ref["l2"].params[~fetched])


def test_cpu_adam_store_refuses_factored_moments():
    with pytest.raises(ValueError, match="memory.host_update=cpu_adam.*memory.optim_state=factored"):
        TieredStore(layout3(), tiers=["host"] * 3, optim_state="factored", host_update="cpu_adam")


# ------------------------------------------------------------------------------------------------ zero3 baseline
def test_zero3_store_is_registered_like_the_built_ins():
    from hmlm import registry
    from hmlm.bank.zero3 import Zero3Store

    assert registry.get("stores", "zero3") is Zero3Store


@pytest.fixture(scope="module")
def zero3_world():
    """One gloo world of one process for every zero3 test of this module, torn down after the last: DeepSpeed keeps
    its process groups in module globals, so a world destroyed between two tests leaves the second with dead groups."""
    if not have_deepspeed():
        pytest.skip("DeepSpeed is not installed")
    op_or_skip("cpu_adam")
    import importlib

    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
            mp.delenv(key, raising=False)   # the store sets a world of one; restored afterwards
        mp.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)  # gloo collectives
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


def test_zero3_store_equals_the_device_store_when_every_row_is_fetched(zero3_world):
    from hmlm.bank.stores import DeviceStore
    from hmlm.bank.zero3 import Zero3Store

    layout = BankLayout(FFNMemory(), SHAPE, (2, 1), 2, (0, 1))
    # four samples whose paths cover every row of both levels: the dense AdamW then equals the lazy one
    paths = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 3]])
    g = torch.Generator().manual_seed(0)
    targets = {n: torch.randn((4, *s.shape), generator=g) * 0.05 for n, s in layout.spec(layout.total_rank).items()}
    results = {}
    for name, cls in (("device", DeviceStore), ("zero3", Zero3Store)):
        store = cls(layout, seed=2, generic=False)
        store.to_compute("cpu")
        losses = []
        for _ in range(3):
            fetched = store.fetch(paths, grad=True)
            loss = sum(((fetched[n] - targets[n]) ** 2).mean() for n in fetched)
            loss.backward()
            losses.append(float(loss.detach()))
            store.step(lr=1e-2, weight_decay=0.01, grad_clip=0.0)
        results[name] = (losses, {k: store.read_rows(k).params.clone() for k in store.keys()})
        assert store.tier_of("l0") == ("zero3" if name == "zero3" else "device")
        store.close()
    torch.testing.assert_close(torch.tensor(results["zero3"][0]), torch.tensor(results["device"][0]),
                               rtol=1e-5, atol=1e-7)
    for key, ref in results["device"][1].items():
        torch.testing.assert_close(results["zero3"][1][key], ref, rtol=1e-5, atol=1e-6)
    assert results["device"][0][-1] < results["device"][0][0]


def test_zero3_store_trains_when_the_steps_fetch_different_keys(zero3_world):
    """A batch drawn all-generic, then one with no generic sample, then a mix: ZeRO-3 traces the parameters of the
    first step and refused any other set at the next ("tracing error at step 1" on the GPU, round 4)."""
    from hmlm.bank.zero3 import Zero3Store

    layout = BankLayout(FFNMemory(), SHAPE, (2, 1), 2, (0, 1))
    store = Zero3Store(layout, seed=2, generic=True)
    store.to_compute("cpu")
    paths = torch.tensor([[0, 0], [1, 3]])
    before = {k: store.read_rows(k).params.clone() for k in store.keys()}
    for mask in ([True, True], [False, False], [True, False], [True, True]):
        fetched = store.fetch(paths, grad=True, generic_mask=torch.tensor(mask))
        sum((v ** 2).sum() for v in fetched.values()).backward()
        store.step(lr=1e-2, weight_decay=0.0, grad_clip=0.0)
    after = {k: store.read_rows(k).params for k in store.keys()}
    store.close()
    assert not torch.equal(after["generic"], before["generic"])
    assert not torch.equal(after["l0"], before["l0"])


def test_bench_train_has_a_zero3_row(tiny_recipe, tmp_path, request):
    """`hmlm bench train --stores zero3`: a measured row where DeepSpeed runs (several steps, so ZeRO-3's trace of
    the first one is checked against the next), an error row saying why elsewhere."""
    from hmlm.bench.train_step import run_bench

    if have_deepspeed():
        request.getfixturevalue("zero3_world")
    recipe = tiny_recipe(**{"trainer.batch_size": 2, "data.seq_len": 16})
    rows = run_bench(recipe, vocab_size=128, stores=["zero3"], steps=4, warmup=1, out=tmp_path / "rows.json")
    assert [r["store"] for r in rows] == [None, "zero3"] and rows[0]["tokens_per_s"] > 0
    assert rows[1].get("tokens_per_s") or "deepspeed" in rows[1]["error"].lower(), rows[1]

