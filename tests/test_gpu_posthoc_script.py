"""benchmarks/gpu_posthoc.sh's three GPU calls, rehearsed on the CPU with the -tiny recipe on a tiny GGUF written in
the test: prepare (index here, GGUF split over calls 1 and 2), call 1 stages, call 2 reassembles, converts and trains
the memories, call 3 evaluates before/after, generates, blocks Hafnium's node and times decoding. A call whose
predecessor's files are gone fails with exit status 3 and says to start again."""
from __future__ import annotations

import importlib.util
import json
import shutil
import tarfile

import pytest

from conftest import REPO, load_benchmark

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate")
                                is None, reason="the GGUF conversion needs the optional packages gguf and accelerate "
                                "(pip install 'hmlm[gguf]'); CI does not install them")


def tiny_overrides(conv, tmp_path) -> list[str]:
    """The -tiny recipe on the fixture GGUF's shape and tokenizer (tests/gguf_fixture.py)."""
    return [f"anchor.init_from={conv}", f"out_dir={tmp_path / 'run'}", "data.tokenizer.kind=file",
            f"data.tokenizer.path={conv}", "data.tokenizer.eos_token=<|endoftext|>", "anchor.hf_config.vocab_size=320",
            "anchor.hf_config.hidden_size=32", "anchor.hf_config.intermediate_size=64",
            "anchor.hf_config.num_hidden_layers=2", "anchor.hf_config.num_attention_heads=4",
            "anchor.hf_config.num_key_value_heads=2", "anchor.hf_config.head_dim=8",
            "anchor.hf_config.rms_norm_eps=1e-5", "anchor.hf_config.tie_word_embeddings=false",
            "data.max_docs=400", "trainer.max_steps=2", "trainer.val_every=2", "trainer.ckpt_every=2"]


@needs_gguf
def test_three_calls_train_and_evaluate_and_a_lost_machine_is_named(tmp_path, monkeypatch):
    from gguf_fixture import write_tiny_gguf

    script = load_benchmark("gpu_posthoc")
    monkeypatch.chdir(REPO)
    write_tiny_gguf(tmp_path / "tiny.gguf", vocab_multiple=64)
    smol, stage, conv = tmp_path / ".smol", tmp_path / "stage", tmp_path / "converted"
    assert script.main(["prepare", "--gguf", str(tmp_path / "tiny.gguf"), "--smol", str(smol),
                        "--recipe", "recipes/posthoc/smollm2-135m-tiny.yaml", "--first-part-mib", "0.001",
                        *tiny_overrides(conv, tmp_path)]) == 0
    manifest = json.loads((smol / "a" / "MANIFEST.json").read_text())
    assert [p["call"] for p in manifest["gguf"]["parts"]] == [1, 2]
    assert (smol / "b" / "index" / "index.json").is_file()
    shutil.rmtree(conv)   # the GPU machine starts without the converted checkpoint
    common = ["--smol", str(smol), "--stage", str(stage)]

    # call 2 on a machine that did not keep call 1's part: named, exit 3
    assert script.main(["call", "2", "--out", str(tmp_path / "o2"), *common]) == script.MISSING_EXIT
    assert "run calls 1, 2, 3 again" in (tmp_path / "o2" / "missing.txt").read_text()

    assert script.main(["call", "1", "--out", str(tmp_path / "o1"), *common]) == 0
    # a corrupt part is refused before anything is converted
    good = (smol / "b" / "gguf.part2").read_bytes()
    (smol / "b" / "gguf.part2").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert script.main(["call", "2", "--out", str(tmp_path / "o2"), *common]) == script.MISSING_EXIT
    assert not conv.exists()
    (smol / "b" / "gguf.part2").write_bytes(good)
    assert script.main(["call", "2", "--out", str(tmp_path / "o2"), *common]) == 0
    fit = json.loads((tmp_path / "o2" / "fit.json").read_text())
    assert fit["convert"]["parameters"] > 0 and (conv / "model.safetensors").is_file()

    assert script.main(["call", "3", "--out", str(tmp_path / "o3"), *common, "--eval-limit", "2",
                        "--eval-tasks", "hmlm_atomic_number,hmlm_heldout_lastword", "--bench-tokens", "2",
                        "--budget-s", "3600"]) == 0
    summary = json.loads((tmp_path / "o3" / "summary.json").read_text())
    assert summary["steps"]["generate_fetched"]["rc"] == 0 and "path (level:node)" in \
        summary["steps"]["generate_fetched"]["output"]
    assert all(summary["steps"][f"eval_{m}"]["rc"] == 0 for m in ("none", "fetched", "generic"))
    block = summary["removal"]["block"]
    assert set(summary["eval"]) == {"fetched", "generic", "none"}
    blocked = [r for r in summary["removal"]["rows"] if r["memory"] == block]
    level, node = int(block.split(":")[1]), int(block.split(":")[2])
    assert blocked and all(r["path"][level - 1] != node for r in blocked)   # never fetched once blocked
    rem = summary["removal"]
    for spec in rem["blocks"]:   # the Hafnium leaf too, where the corpus names Hafnium: each block never fetched
        rows = [r for r in rem["rows"] if r["memory"] == spec]
        assert len(rows) == 6 and all(r["path"][int(spec.split(":")[1]) - 1] != int(spec.split(":")[2])
                                      for r in rows)
    if "leaf_block" in rem:
        assert rem["leaf_block"] == f"blocked:{rem['leaf']['level']}:{rem['leaf']['node']}"
    # the tiny tree's level-2 blocks can mask every child of a node (the router refuses): named, not fatal
    removal = summary["steps"]["eval_removal"]
    assert removal["rc"] == 0 or "are blocked; unblock at least one" in removal["output"]
    assert {r["device"] for r in summary["latency"]} == {"cpu"} and not summary["skipped"]
    with tarfile.open(tmp_path / "o3" / "eval.tar.xz") as tar:
        assert {"eval/none/report.json", "eval/fetched/report.json"} <= set(tar.getnames())
    table = (tmp_path / "o3" / "table.md").read_text()
    assert "| none |" in table and f"| prompt | fetched | {' | '.join(rem['blocks'])} | none |" in table
    assert ("hmlm eval --removal over every element" in table) == (removal["rc"] == 0)

    # call 3 on a machine without call 2's model: named, exit 3
    shutil.rmtree(tmp_path / "run")
    assert script.main(["call", "3", "--out", str(tmp_path / "o4"), *common]) == script.MISSING_EXIT
    assert "call 2's trained model" in (tmp_path / "o4" / "missing.txt").read_text()


def test_the_wrapper_refuses_a_call_without_its_number(tmp_path):
    import subprocess

    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_posthoc.sh"), str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "--call 1|2|3" in done.stderr


def test_call3_table_lists_each_block_beside_fetched_and_none_and_the_removal_summary():
    script = load_benchmark("gpu_posthoc")
    rows = [{"prompt": p, "memory": m, "path": None if m == "none" else [0, 2, 10 if m == "fetched" else 11],
             "text": t} for p in ("Hafnium was discovered in", "The capital of France is")
            for m, t in (("fetched", " 1923"), ("blocked:1:0", " 1821"), ("blocked:3:10", " 1900"), ("none", " 1987"))]
    group = {"n": 104, "acc_fetched": 0.5, "acc_blocked": 0.25, "acc_none": 0.1, "rerouted": 1.0, "known": 52,
             "known_kept": 0.5}
    table = script.table_md({"device": "H100", "model_dir": "m", "manifest": "x", "removal": {
        "block": "blocked:1:0", "blocks": ["blocked:1:0", "blocked:3:10"], "leaf_block": "blocked:3:10", "rows": rows},
        "removal_eval": {"3": {"removed": group, "others": group}},
        "removal_eval_counts": {"seconds": 41.0, "block_sets": 116, "scored_pairs": 936, "levels_skipped": []}})
    assert "| prompt | fetched | blocked:1:0 | blocked:3:10 | none |" in table
    assert "| Hafnium was discovered in | ' 1923' (0,2,10) | ' 1821' (0,2,11) | ' 1900' (0,2,11) | ' 1987' |" in table
    assert "(41.0 s; 116 block sets, 936 (item, path) pairs scored; levels not measured: none)" in table
    assert "| 3 | removed | 104 | 50.0 | 25.0 | 10.0 | 100.0 | 50.0 of 52 |" in table
