"""Text data: the built-in corpus's two splits share no work, tokens are deterministic and
sized as asked, and a user's file is read or refused in one line."""
from __future__ import annotations

import pytest
import torch

from moyu import MoyuError, data


def _one_line(e):
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_splits_are_disjoint_and_cover_the_corpus():
    calib = {p.name for p in data._works("calib")}
    evals = {p.name for p in data._works("eval")}
    assert evals == {f"{w}_gut.txt" for w in data.EVAL_WORKS}
    assert not calib & evals
    assert calib | evals == {p.name for p in data.corpus_dir().glob("*_gut.txt")}
    assert len(calib) >= 30 and not any("_gut_f" in n for n in calib | evals)


def test_split_texts_do_not_overlap():
    ev = data.corpus_text("eval")
    ca = data.corpus_text("calib")
    assert "To be, or not to be" in ev and "To be, or not to be" not in ca
    assert "Out, damned spot" in ev and "Out, damned spot" not in ca
    assert "Now is the winter of our discontent" in ca and "winter of our discontent" not in ev
    assert "\n\n\n" not in ev and not ev.startswith((" ", "\n"))   # normalised layout
    cut = data.corpus_text("eval", max_chars=5_000)
    assert len(cut) == 5_000 and ev.startswith(cut)


def test_tokens_are_deterministic_sized_and_split_specific(smollm):
    _, tok = smollm
    a = data.tokens(tok, "eval", 3_000)
    b = data.tokens(tok, "eval", 3_000)
    c = data.tokens(tok, "calib", 3_000)
    assert a.dtype == torch.long and a.dim() == 1 and len(a) == 3_000
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the first tokens are exactly the tokenised start of the split
    head = tok(data.corpus_text("eval", 2_000), add_special_tokens=False).input_ids
    assert a[:100].tolist() == head[:100]


def test_tokens_from_user_file(smollm, tmp_path):
    _, tok = smollm
    f = tmp_path / "prose.txt"
    f.write_text("The cat sat on the mat. " * 50, encoding="utf-8")
    ids = data.tokens(tok, "eval", None, text_file=str(f))
    assert ids.tolist() == tok(f.read_text(), add_special_tokens=False).input_ids
    assert len(data.tokens(tok, "eval", 20, text_file=str(f))) == 20


@pytest.mark.parametrize("kind", ["missing", "empty", "blank", "latin1", "folder"])
def test_bad_text_file_is_one_line(tmp_path, kind):
    f = tmp_path / "t.txt"
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "blank":
        f.write_text(" \n\t\n\n")
    elif kind == "latin1":
        f.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    elif kind == "folder":
        f.mkdir()
    with pytest.raises(MoyuError) as e:
        data.read_text_file(f)
    msg = _one_line(e)
    assert str(f) in msg
    assert {"missing": "not found", "empty": "empty", "blank": "empty", "latin1": "UTF-8",
            "folder": "not found"}[kind] in msg


def test_unreadable_text_file_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    f = tmp_path / "locked.txt"
    f.write_text("some prose")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(MoyuError) as e:
        data.read_text_file(f)
    assert "Permission denied" in _one_line(e) and str(f) in str(e.value)


def test_unknown_split_and_missing_corpus(temp_cache):
    with pytest.raises(MoyuError) as e:
        data.corpus_text("train")
    assert "calib" in _one_line(e) and "eval" in str(e.value)
    with pytest.raises(MoyuError) as e:       # empty MOYU_CACHE: corpus not fetched there
        data.corpus_text("eval")
    assert "moyu.data fetch" in _one_line(e)


def test_hub_dataset_without_datasets_package_is_one_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(MoyuError) as e:
        data.dataset_text("wikitext:wikitext-2-raw-v1:test")
    assert "datasets" in _one_line(e) and "--text" in str(e.value)


def test_spread_sample_draws_pieces_from_all_over_the_text(smollm, tmp_path):
    _, tok = smollm
    # 100 numbered sections of ~420 characters: the section numbers a piece holds say
    # where in the text it came from
    f = tmp_path / "sections.txt"
    f.write_text("\n".join(f"section {i:02d} " + "the quick brown fox jumps. " * 15 for i in range(100)))
    n = 8 * data.SPREAD_PIECE
    head = data.tokens(tok, n_tokens=n, text_file=str(f))
    spread = data.tokens(tok, n_tokens=n, text_file=str(f), sample="spread")
    assert len(spread) == len(head) == n
    assert torch.equal(head, data.tokens(tok, n_tokens=n, text_file=str(f), sample="head"))
    assert torch.equal(spread, data.tokens(tok, n_tokens=n, text_file=str(f), sample="spread"))

    def sections(ids):
        return [int(s[:2]) for s in tok.decode(ids).split("section ")[1:]]
    assert max(sections(head)) < 30
    for j in range(8):   # piece j starts van_der_corput(j) of the way in: 0, 1/2, 1/4, 3/4, ...
        first = sections(spread[j * data.SPREAD_PIECE:(j + 1) * data.SPREAD_PIECE])[0]
        assert abs(first - 100 * data.van_der_corput(j)) <= 6, (j, first)


def test_spread_sample_of_a_short_text_is_its_head(smollm, tmp_path):
    _, tok = smollm
    f = tmp_path / "short.txt"
    f.write_text("A short text of a few words. " * 100)
    n = 4 * data.SPREAD_PIECE
    assert torch.equal(data.tokens(tok, n_tokens=n, text_file=str(f), sample="spread"),
                       data.tokens(tok, n_tokens=n, text_file=str(f)))


def test_unknown_sample_is_one_line(smollm):
    _, tok = smollm
    with pytest.raises(MoyuError) as e:
        data.tokens(tok, "calib", 1000, sample="random")
    assert "head, spread" in _one_line(e)


def test_tda_calibrates_on_the_spread_sample_and_others_on_the_head(smollm):
    from moyu.methods import calibration_ids, calibration_source
    _, tok = smollm
    head = data.tokens(tok, "calib", 2048)
    spread = data.tokens(tok, "calib", 2048, sample="spread")
    assert not torch.equal(head, spread)
    assert torch.equal(calibration_ids(tok, 2048, method="tda"), spread)
    assert torch.equal(calibration_ids(tok, 2048, method="cats"), head)
    assert torch.equal(calibration_ids(tok, 2048), head)
    source = calibration_source(tok, 2048)
    assert torch.equal(source("tda"), spread) and torch.equal(source("oracle"), head)
    assert source("cats") is source("oracle")   # one read per sample kind
