"""Generation (hmlm.generate, hmlm.api, `hmlm generate`): the cached decoder gives the tokens of full recomputation
(openlm and a tiny random Llama, with memory, greedy and seeded sampling), stop strings end the streamed text,
blocked nodes are never fetched, the lm-eval adapter decodes the same text, and the CLI streams text and reports
bad input in one line (exit 2)."""
from __future__ import annotations

import pytest
import torch

from hmlm.generate import (GenerateError, RowDecoder, Sampling, generate_ids, generate_rows, generate_text,
                           generate_texts, pads_prompts, sampling_from, stream_text)

from test_anchor_cache import ANCHORS, VOCAB, _with_memory

SAMPLINGS = [Sampling(max_new_tokens=12), Sampling(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=3)]


@pytest.mark.parametrize("name,kind", [("openlm", "ffn"), ("openlm", "kv"), ("hf-llama", "ffn"), ("hf-llama", None)])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
def test_cached_and_uncached_decoding_give_the_same_tokens(name, kind, sampling):
    anchor = ANCHORS[name]()
    memory = _with_memory(anchor, kind).memory_context(torch.tensor([[1, 2]]), "fetched") if kind else None
    prompt = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    cached = list(generate_ids(anchor, prompt, memory=memory, sampling=sampling))
    plain = list(generate_ids(anchor, prompt, memory=memory, sampling=sampling, use_cache=False))
    assert cached == plain
    assert len(cached) == sampling.max_new_tokens


@pytest.mark.parametrize("name,kind", [("openlm", "ffn"), ("openlm", "kv"), ("hf-llama", "ffn")])
def test_a_batch_of_prompts_decodes_each_row_as_alone(name, kind):
    # rows of one batch on different tree paths: each row gets its own blocks and the greedy tokens it gets alone
    anchor = ANCHORS[name]()
    model = _with_memory(anchor, kind)
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, VOCAB, (4, 5), generator=g).tolist()
    paths = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 1]])
    memory = model.memory_context(paths, "fetched")
    s = Sampling(max_new_tokens=9)
    batched = list(zip(*generate_rows(anchor, prompts, memory=memory, sampling=s)))
    for row, prompt in enumerate(prompts):
        alone = list(generate_ids(anchor, prompt, memory=model.memory_context(paths[row:row + 1], "fetched"),
                                  sampling=s))
        assert list(batched[row]) == alone
    for use_cache in (True, False):   # the uncached loop runs the same batch
        assert list(zip(*generate_rows(anchor, prompts, memory=memory, sampling=s, use_cache=use_cache))) == batched
    if not pads_prompts(anchor):   # hf: no document ids in its cache, so no left padding
        with pytest.raises(ValueError, match="one length"):
            next(generate_rows(anchor, [[1, 2], [3]], memory=None, sampling=s))


@pytest.mark.parametrize("kind", ["ffn", "kv", None])
@pytest.mark.parametrize("sampling", SAMPLINGS[:1], ids=["greedy"])
def test_prompts_of_different_lengths_decode_left_padded_as_alone(kind, sampling):
    # openlm's cache takes document ids: one batch of ragged prompts, padding masked out, each row at its own
    # positions, gives every row the tokens it gets alone
    anchor = ANCHORS["openlm"]()
    assert pads_prompts(anchor)
    model = _with_memory(anchor, kind) if kind else None
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 2, 5, 1, 7)]
    paths = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 1], [0, 0]])
    memory = model.memory_context(paths, "fetched") if kind else None
    batched = list(zip(*generate_rows(anchor, prompts, memory=memory, sampling=sampling)))
    for row, prompt in enumerate(prompts):
        alone = list(generate_ids(anchor, prompt, memory=model.memory_context(paths[row:row + 1], "fetched")
                                  if kind else None, sampling=sampling))
        assert list(batched[row]) == alone, row


def test_rows_leave_the_batch_when_they_finish():
    # RowDecoder drops finished rows from the cache and the memory once a quarter of the batch is done; the rows
    # that stay decode on as before
    anchor = ANCHORS["openlm"]()
    model = _with_memory(anchor, "ffn")
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 6, 4, 6, 2, 5, 3, 4)]
    paths = torch.tensor([[i % 2, (i // 2) % 2] for i in range(len(prompts))])
    s = Sampling(max_new_tokens=8)
    full = list(zip(*generate_rows(anchor, prompts, memory=model.memory_context(paths, "fetched"), sampling=s)))
    decoder = RowDecoder(anchor, prompts, memory=model.memory_context(paths, "fetched"), sampling=s)
    got: dict[int, list[int]] = {row: [] for row in range(len(prompts))}
    widths = []
    for step in range(s.max_new_tokens):
        for row, tok in zip(decoder.rows, decoder.step()):
            if not decoder.finished(row):
                got[row].append(tok)
        decoder.drop([row for row in decoder.rows if len(got[row]) >= 2 + row])   # row r wants 2 + r tokens
        widths.append(len(decoder.rows))
        assert decoder.memory.tensors["w1"].shape[0] == len(decoder.rows)
    assert widths[0] == len(prompts) and widths[-1] < len(prompts) // 2
    for row in range(len(prompts)):
        assert got[row] == list(full[row][:min(2 + row, s.max_new_tokens)]), row


def test_batched_texts_stop_per_row_as_generate_text_does():
    anchor = ANCHORS["openlm"]()
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    s = Sampling(max_new_tokens=10)
    # the tiny random model repeats one token; a position-dependent decoding gives each row distinct characters
    decode = lambda toks: "".join(chr(97 + (t + i) % 26) for i, t in enumerate(toks))  # noqa: E731
    alone = [generate_text(anchor, p, memory=None, sampling=s, decode=decode) for p in prompts]
    # each row's stop strings from its own text, hit at different steps; row 1 ends at its end-of-sequence id
    stops = [(alone[0][4:6],), (), (alone[2][1], "never")]
    eos = list(generate_ids(anchor, prompts[1], memory=None, sampling=s))[0]
    want = [generate_text(anchor, p, memory=None, sampling=Sampling(max_new_tokens=10, stop=tuple(st)),
                          decode=decode, eos_id=eos) for p, st in zip(prompts, stops)]
    assert want == [alone[0][:4], "", alone[2][:1]]
    assert generate_texts(anchor, prompts, memory=None, sampling=s, decode=decode, stops=stops, eos_id=eos) == want


def test_memory_changes_the_decoded_tokens():
    anchor = ANCHORS["openlm"]()
    model = _with_memory(anchor, "ffn")
    prompt = [3, 5, 7, 11]
    s = Sampling(max_new_tokens=10)
    with_memory = list(generate_ids(anchor, prompt, memory=model.memory_context(torch.tensor([[1, 2]]), "fetched"),
                                    sampling=s))
    assert with_memory != list(generate_ids(anchor, prompt, memory=None, sampling=s))


def test_seeded_sampling_repeats_and_top_p_near_zero_is_greedy():
    anchor = ANCHORS["openlm"]()
    prompt = [1, 2, 3]
    s = Sampling(max_new_tokens=15, temperature=1.5, seed=7)
    first = list(generate_ids(anchor, prompt, memory=None, sampling=s))
    assert first == list(generate_ids(anchor, prompt, memory=None, sampling=s))
    greedy = list(generate_ids(anchor, prompt, memory=None, sampling=Sampling(max_new_tokens=15)))
    assert list(generate_ids(anchor, prompt, memory=None,
                             sampling=Sampling(max_new_tokens=15, temperature=1.5, top_p=1e-6, seed=1))) == greedy


def test_eos_ends_decoding_and_is_not_yielded():
    anchor = ANCHORS["openlm"]()
    greedy = list(generate_ids(anchor, [1, 2, 3], memory=None, sampling=Sampling(max_new_tokens=8)))
    eos = greedy[3]
    got = list(generate_ids(anchor, [1, 2, 3], memory=None, sampling=Sampling(max_new_tokens=8), eos_id=eos))
    assert got == greedy[:greedy.index(eos)]


def test_stream_text_cuts_at_a_stop_string_spanning_tokens():
    pieces = ["The", " answer", " is 7", "2.", " Next", " line"]
    decode = lambda toks: "".join(pieces[t] for t in toks)  # noqa: E731
    out = list(stream_text(range(len(pieces)), decode, stop=["2. N"]))
    assert "".join(out) == "The answer is 7"
    # nothing that could start the stop string is sent before it is known not to
    assert all("2" not in p for p in out)
    assert "".join(stream_text(range(len(pieces)), decode, stop=["\n"])) == "".join(pieces)
    assert "".join(stream_text(range(len(pieces)), decode, stop=["The"])) == ""


@pytest.mark.parametrize("bad,match", [({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"),
                                       ({"max_new_tokens": -2}, "max_new_tokens"), ({"beams": 2}, "beams")])
def test_bad_sampling_arguments_are_named(bad, match):
    with pytest.raises(GenerateError, match=match):
        sampling_from(bad)


# ---- a trained model directory ---------------------------------------------------------------------------------

PROMPT = "The atomic number of Hafnium is"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    import hmlm

    return hmlm.load(tiny_model_dir, device="cpu")


def test_blocked_nodes_are_never_fetched(loaded):
    store = loaded.model.store
    path = loaded.route(PROMPT)
    seen: list[torch.Tensor] = []
    original = store.fetch

    def spy(paths, **kw):
        seen.append(paths.clone())
        return original(paths, **kw)

    store.fetch = spy
    try:
        for level in (1, 2, 3):   # 3: a leaf block (the paper-like, targeted removal): the sibling leaf serves
            seen.clear()
            spec = f"blocked:{level}:{path[level - 1]}"
            text = loaded.generate(PROMPT, memory=spec, max_new_tokens=3)
            assert isinstance(text, str) and seen
            assert all((p[:, level - 1] != path[level - 1]).all() for p in seen)
            assert loaded.route(PROMPT, memory=spec)[level - 1] != path[level - 1]
            # the adapter's scorer routes the same way
            seen.clear()
            loaded.loglikelihood(PROMPT, " 72", memory=spec)
            assert seen and all((p[:, level - 1] != path[level - 1]).all() for p in seen)
    finally:
        store.fetch = original


def test_api_adapter_and_uncached_decoding_agree(loaded):
    from hmlm.eval.adapter import HMLMEvalLM

    text = loaded.generate(PROMPT, max_new_tokens=8)
    assert text == loaded.generate(PROMPT, max_new_tokens=8, use_cache=False)
    lm = HMLMEvalLM(loaded=loaded.loaded, memory="fetched")
    assert lm.generate_until([(PROMPT, {"until": [], "max_gen_toks": 8})]) == [text]
    assert loaded.loglikelihood(PROMPT, " 72") == lm.loglikelihood([(PROMPT, " 72")])[0]
    assert loaded.loglikelihood([(PROMPT, " 72"), (PROMPT, " 12")]) == lm.loglikelihood(
        [(PROMPT, " 72"), (PROMPT, " 12")])
    assert loaded.generate(PROMPT, max_new_tokens=0) == ""


def test_cli_streams_text_and_shows_the_path(tiny_model_dir, capsys):
    from hmlm.cli import main

    rc = main(["generate", "--model", str(tiny_model_dir), PROMPT, "Paris is", "--max-new-tokens", "6",
               "--show-path", "--timing", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert len(out.splitlines()) == 2
    assert out.splitlines()[0] == __import__("hmlm").load(tiny_model_dir).generate(PROMPT, max_new_tokens=6)
    assert "path" in err and "level:node" in err and "route" in err and "fetch" in err
    assert "leaf document" in err and "decode:" in err
    rc = main(["generate", "--model", str(tiny_model_dir), PROMPT, "--memory", "none", "--show-path",
               "--max-new-tokens", "2"])
    assert rc == 0 and "does not route" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--memory", "blocked:9:0"], "level 9 is outside the tree"),
    (["--memory", "sometimes"], "memory='sometimes'"),
    (["--top-p", "0"], "top_p=0"),
])
def test_cli_errors_are_one_line_with_exit_2(tiny_model_dir, capsys, args, match):
    from hmlm.cli import main

    assert main(["generate", "--model", str(tiny_model_dir), PROMPT, *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_cli_names_a_missing_model_directory(tmp_path, capsys):
    from hmlm.cli import main

    assert main(["generate", "--model", str(tmp_path / "nope"), PROMPT]) == 2
    assert "model.json" in capsys.readouterr().err


def test_bench_generate_rows(tiny_model_dir, tmp_path, capsys):
    import json

    from hmlm.cli import main

    assert main(["bench", "generate", "--model", str(tiny_model_dir), "--tokens", "2", "--memory", "fetched,none",
                 "--out", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["memory"], r["kv_cache"]) for r in rows] == [("fetched", True), ("fetched", False), ("none", True),
                                                           ("none", False)]
    assert all(r["ms_per_token"] > 0 and r["tokens"] == 2 for r in rows)
    assert "ms_per_token" in capsys.readouterr().out
