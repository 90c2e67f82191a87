"""`hmlm bench scaling` on CPU (gloo, 2 processes): rows for both modes, no bank bytes in subtree mode, the dense
bank all-reduce in replicated mode, anchor bytes equal to the anchor's gradient, each rank holding half the bank."""
from __future__ import annotations

from hmlm.bench.scaling import _owned_rows, run_scaling


def test_owned_rows_follow_level1_ancestors():
    rows = _owned_rows([3, 9, 27], 3, [1])
    assert rows["l0"].tolist() == [1]
    assert rows["l1"].tolist() == [3, 4, 5]
    assert rows["l2"].tolist() == list(range(9, 18))


def test_scaling_bench_on_two_cpu_processes(tiny_recipe, tmp_path):
    recipe = tiny_recipe(**{"index.router.branching": 2, "trainer.batch_size": 2, "data.seq_len": 16})
    rows = run_scaling(recipe, vocab_size=128, worlds=[1, 2], modes=["subtree", "replicated"], steps=2, warmup=1,
                       out=tmp_path / "rows.json")
    by = {(r["mode"], r["world"]): r for r in rows}
    assert set(by) == {("subtree", 1), ("subtree", 2), ("replicated", 1), ("replicated", 2)}
    sub, rep = by[("subtree", 2)], by[("replicated", 2)]
    anchor_bytes = sub["anchor_bytes_per_step"]
    assert anchor_bytes > 0 and rep["anchor_bytes_per_step"] == anchor_bytes
    assert sub["bank_bytes_per_step"] == 0
    assert rep["bank_bytes_per_step"] == rep["bank_params"] * 4
    assert sub["bank_params_per_rank"] * 2 == sub["bank_params"] == rep["bank_params_per_rank"]
    assert (tmp_path / "rows.json").is_file()
