"""The training step shared by `hmlm fit` and `hmlm bench train`: it reproduces the plain step it replaced, its
compiled form gives the same losses, the bench and the fit-overhead bench run it, and fit stays quiet."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from hmlm.bench.train_step import run_bench, synthetic_batches
from hmlm.model import build_model
from hmlm.train.schedule import cosine_lr
from hmlm.train.step import BankOptimizer, PlainEngine, TrainStep, build_anchor_optimizer, clip_gradients

VOCAB = 512


def _batches(recipe, n: int) -> list[dict[str, torch.Tensor]]:
    data = synthetic_batches(recipe, VOCAB, torch.device("cpu"), seed=4)
    return [next(data) for _ in range(n)]


def _shared_step_run(recipe, batches, *, compile: bool = False, autocast: bool = False):
    model = build_model(recipe, VOCAB)
    # aot_eager: dynamo's graph capture and AOTAutograd as with inductor, without its code generation, which takes
    # minutes on a 2-core CPU (the GPU script benchmarks/gpu_speed.sh runs inductor)
    step_fn = TrainStep(model, recipe, compile=compile, compile_backend="aot_eager")
    anchor_opt = build_anchor_optimizer(model.anchor, recipe.optim.anchor)
    bank_opt = BankOptimizer(model.store, recipe.optim.memory)
    losses = []
    for i, b in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses.append(float(step_fn(b, step=i, anchor_opt=anchor_opt, bank_opt=bank_opt, engine=PlainEngine())))
    return model, losses


def _plain_reference_run(recipe, batches):
    """The step as fit and the bench ran it before it was shared: logits, float32 cross-entropy, clip, AdamW."""
    model = build_model(recipe, VOCAB)
    step_fn = TrainStep(model, recipe)          # only for the generic draws, which the old module made the same way
    a, m = recipe.optim.anchor, recipe.optim.memory
    decay = [p for p in model.anchor.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.anchor.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps)
    losses = []
    for i, b in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(i, a, recipe.trainer.max_steps)
        opt.zero_grad(set_to_none=True)
        logits = model(b["input_ids"], paths=b["path"], memory="fetched", doc_ids=b["doc_ids"],
                       generic_mask=step_fn.generic_mask(i, b["input_ids"].shape[0]), grad_memory=True)
        loss = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.anchor.parameters(), a.grad_clip)
        opt.step()
        model.store.step(lr=cosine_lr(i, m, recipe.trainer.max_steps), weight_decay=m.weight_decay, beta1=m.beta1,
                         beta2=m.beta2, eps=m.eps, grad_clip=m.grad_clip)
        losses.append(loss.item())
    return model, losses


def _assert_same_state(a, b, atol: float) -> None:
    for (name, p), q in zip(a.anchor.state_dict().items(), b.anchor.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)
    for key, name, t in a.store.iter_blocks():
        torch.testing.assert_close(t, b.store.tensors[key][name], rtol=0, atol=atol, msg=f"{key}.{name}")


def test_shared_step_reproduces_the_plain_step(tiny_recipe):
    recipe = tiny_recipe(**{"trainer.mode": "cotrain", "trainer.max_steps": 4})
    batches = _batches(recipe, 4)
    shared, got = _shared_step_run(recipe, batches)
    plain, want = _plain_reference_run(recipe, batches)
    assert got == pytest.approx(want, rel=1e-5)
    # Adam divides by the gradient's own scale, so float-rounding differences of the loss show up to ~lr·1e-3
    _assert_same_state(shared, plain, atol=1e-4)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])   # clipping active / the norm below the limit (no-op)
def test_clip_inside_fused_adamw_equals_clip_grad_norm(max_norm):
    """clip_gradients hands the clip to the fused AdamW as its gradient divisor: same weights as clip_grad_norm_
    followed by the same optimizer, over steps whose norms differ, and the gradients end up clipped as well."""
    def run(fold: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        for step in range(4):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)) * (step + 1)
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).sum().backward()
            if fold:
                clip_gradients(opt, max_norm)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
        grads = [p.grad.clone() for p in model.parameters()]
        return [p.detach().clone() for p in model.parameters()], grads

    (folded, folded_grads), (plain, plain_grads) = run(True), run(False)
    for a, b in zip(folded + folded_grads, plain + plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if max_norm < 1:
        assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in folded_grads]))) \
            == pytest.approx(max_norm, rel=1e-4)


def test_clip_without_fused_adamw_uses_clip_grad_norm():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 10.0)
    opt = torch.optim.SGD([p], lr=0.1)
    clip_gradients(opt, 1.0)
    assert not hasattr(opt, "grad_scale")
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_compiled_step_matches_eager(tiny_recipe):
    """trainer.compile: forward, memory deltas, fused loss and backward in one graph; same losses and weights, no
    graph break and no recompilation from step to step (each step's fetch is a new MemoryContext)."""
    from torch._dynamo.utils import counters

    recipe = tiny_recipe(**{"trainer.mode": "cotrain", "trainer.max_steps": 3, "trainer.compile": True})
    batches = _batches(recipe, 3)
    torch._dynamo.reset()
    counters.clear()
    compiled, got = _shared_step_run(recipe, batches, compile=True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    eager, want = _shared_step_run(recipe, batches, compile=False)
    assert got == pytest.approx(want, rel=1e-4)
    _assert_same_state(compiled, eager, atol=1e-4)
    # under bf16 autocast (what bf16-mixed does on CUDA) the compiled step stays close to float32
    _, low = _shared_step_run(recipe, batches, compile=True, autocast=True)
    assert low == pytest.approx(want, rel=2e-2)


def test_inductor_is_the_default_compile_backend(tiny_recipe):
    recipe = tiny_recipe(**{"trainer.compile": True, "trainer.compile_mode": "reduce-overhead"})
    step_fn = TrainStep(build_model(recipe, VOCAB), recipe)
    assert step_fn.compiled and step_fn._nll is not step_fn._forward_nll
    with pytest.raises(ValueError, match="compile_mode"):
        TrainStep(build_model(recipe, VOCAB), recipe, compile_mode="fastest")


def test_cuda_graph_modes_mark_each_step(tiny_recipe, monkeypatch):
    """Under reduce-overhead each step starts a new CUDA-graph iteration (so the graphs may reuse their buffers);
    the steps compute what the default mode computes."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    batches = _batches(tiny_recipe(), 2)
    _, want = _shared_step_run(tiny_recipe(**{"trainer.compile_mode": "default"}), batches, compile=True)
    assert marks == []
    torch._dynamo.reset()
    _, got = _shared_step_run(tiny_recipe(**{"trainer.compile_mode": "reduce-overhead"}), batches, compile=True)
    assert len(marks) == 2 and got == pytest.approx(want, rel=1e-6)


def test_flex_attention_under_compile_matches_the_dense_mask(tiny_recipe, monkeypatch):
    """The compiled forward of packed documents takes flex attention (forward-only on CPU): same logits."""
    import hmlm.anchors.openlm as openlm

    recipe = tiny_recipe()
    anchor = build_model(recipe, VOCAB).anchor.eval()
    batch = _batches(recipe, 1)[0]
    assert (batch["doc_ids"][:, -1] > 0).all()   # the synthetic batches do hold several documents
    calls = []
    original = openlm.document_block_mask
    monkeypatch.setattr(openlm, "document_block_mask", lambda doc_ids: calls.append(1) or original(doc_ids))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = anchor(batch["input_ids"], doc_ids=batch["doc_ids"])
        assert calls == []
        compiled = torch.compile(anchor, backend="aot_eager")(batch["input_ids"], doc_ids=batch["doc_ids"])
    assert calls
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_bench_runs_the_shared_step_with_documents(tiny_recipe, tmp_path):
    recipe = tiny_recipe(**{"trainer.batch_size": 2})
    out = tmp_path / "bench.json"
    rows = run_bench(recipe, vocab_size=VOCAB, stores=["device"], steps=2, warmup=1, out=out)
    assert [r["config"] for r in rows] == ["anchor only", "anchor + memory (device store)"]
    assert all(r["doc_mask"] and r["tokens_per_s"] > 0 and r["final_loss"] > 0 for r in rows)
    assert json.loads(out.read_text()) == rows


def test_fit_overhead_bench_times_fit_and_bench(tiny_recipe, tmp_path):
    from hmlm.bench.fit_overhead import run_fit_overhead

    recipe = tiny_recipe(**{"index.dir": str(tmp_path / "index")})
    rows = run_fit_overhead(recipe, vocab_size=VOCAB, steps=3, warmup=1, progress=False)
    assert rows[0]["config"].startswith("hmlm bench train") and rows[1]["config"].startswith("hmlm fit")
    assert rows[0]["ratio_vs_bench"] == 1.0 and rows[1]["tokens_per_s"] > 0


def test_fit_logs_on_logging_steps_only_and_prints_no_lightning_noise(tiny_recipe, tmp_path):
    from conftest import read_metrics
    from hmlm.train.fit import fit

    recipe = tiny_recipe(**{"trainer.log_every": 2, "trainer.max_steps": 5, "index.dir": str(tmp_path / "index")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(recipe, progress=False, final_eval=False)
    noisy = [str(w.message)[:80] for w in caught if "LeafSpec" in str(w.message) or "ModelCheckpoint" in str(w.message)]
    assert noisy == []
    steps = sorted(int(r["step"]) for r in read_metrics(recipe.out_dir) if r.get("train/loss"))
    assert steps == [1, 3]   # (step + 1) % log_every == 0: the steps Lightning writes to its loggers
    rows = [r for r in read_metrics(recipe.out_dir) if r.get("train/loss")]
    assert all(float(r["train/ppl"]) == pytest.approx(2.718281828 ** float(r["train/loss"]), rel=1e-5) for r in rows)


def test_quiet_lightning_filters_only_its_two_messages():
    from hmlm.train.progress import quiet_lightning_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no ...")
        warnings.warn("some other future change", FutureWarning)
        warnings.warn("a user warning that matters")
    assert [str(w.message) for w in caught] == ["some other future change", "a user warning that matters"]


def test_memory_mode_freezes_the_anchor_in_the_shared_step(tiny_recipe):
    recipe = tiny_recipe(**{"trainer.mode": "memory"})
    model = build_model(recipe, VOCAB)
    before = copy.deepcopy(model.anchor.state_dict())
    step_fn = TrainStep(model, recipe)
    assert not step_fn.train_anchor and step_fn.train_memory
    assert not any(p.requires_grad for p in model.anchor.parameters())
    bank_opt = BankOptimizer(model.store, recipe.optim.memory)
    step_fn(_batches(recipe, 1)[0], step=0, anchor_opt=None, bank_opt=bank_opt, engine=PlainEngine())
    for key, value in model.anchor.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert bank_opt.last_stats["blocks_updated"] > 0


def test_fit_keeps_tree_paths_on_the_host(tiny_recipe):
    """Lightning moves batches to the accelerator; the paths stay where the store reads them (no GPU round trip)."""
    from hmlm.train.module import HMLMModule

    recipe = tiny_recipe()
    module = HMLMModule(recipe, build_model(recipe, VOCAB))
    batch = _batches(recipe, 1)[0]
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["input_ids"].device.type == "meta" and moved["doc_ids"].device.type == "meta"
    assert moved["path"] is batch["path"] and moved["path"].device.type == "cpu"


class _DroppingEngine(PlainEngine):
    """An engine whose non-finite guard rejects every batch after backward (fit's skip mode, without Lightning)."""

    def drop_update(self) -> bool:
        return True


def test_a_dropped_update_steps_no_optimizer_and_releases_the_fetched_blocks(tiny_recipe):
    recipe = tiny_recipe()
    model = build_model(recipe, VOCAB)
    before = copy.deepcopy(model.state_dict())
    step_fn = TrainStep(model, recipe)
    anchor_opt = build_anchor_optimizer(model.anchor, recipe.optim.anchor)
    bank_opt = BankOptimizer(model.store, recipe.optim.memory)
    out = step_fn(_batches(recipe, 1)[0], step=0, anchor_opt=anchor_opt, bank_opt=bank_opt, engine=_DroppingEngine())
    assert out is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not anchor_opt.state and bank_opt.last_stats == {}
    assert list(model.store.fetched_grads()) == []  # nothing fetched is left for a later step to apply


def test_bench_announces_each_batch_one_step_ahead():
    from hmlm.bench.train_step import announced_ahead

    seen: list[int] = []
    batches = announced_ahead(iter({"path": torch.tensor([i])} for i in range(10)), lambda p: seen.append(int(p)))
    drawn = [int(next(batches)["path"]) for _ in range(3)]
    assert drawn == [0, 1, 2] and seen == [0, 1, 2, 3]  # batch n+1 was announced before batch n is used
