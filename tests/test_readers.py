import json

import pytest

from lmdistill.data.readers import read_instructions, read_sentences, read_sts
from lmdistill.errors import LmdistillError


def test_sts_formats(tmp_path):
    stsb = tmp_path / "stsb.csv"
    stsb.write_text('A girl,"A girl, brushing",2.5\nx,y,\n"Men, play",Boys play,3.6\n')
    pairs = read_sts(stsb)
    assert [(p.s1, p.s2, p.score) for p in pairs] == [("A girl", "A girl, brushing", 2.5), ("Men, play", "Boys play", 3.6)]
    sick = tmp_path / "sick.txt"
    sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                    "1\ta b\tc d\t4.2\tNEUTRAL\n2\te\tf\t\tNEUTRAL\n")
    assert [(p.s1, p.score) for p in read_sts(sick)] == [("a b", 4.2)]
    tsv = tmp_path / "plain.tsv"
    tsv.write_text("1.5\tone\ttwo\nnone\tthree\tfour\n")
    assert [(p.s1, p.s2, p.score) for p in read_sts(tsv)] == [("one", "two", 1.5)]


def test_sts_without_scores_is_refused(tmp_path):
    f = tmp_path / "bad.tsv"
    f.write_text("x\ty\tz\n")
    with pytest.raises(LmdistillError, match="no scored rows"):
        read_sts(f)


def test_sentences_dedup_and_quota(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("one\ntwo\n\none\nthree\n")
    b = tmp_path / "b.csv"
    b.write_text("s1,s2,3.0\nfour,five,1\n")
    assert read_sentences([a]) == ["one", "two", "three"]
    both = read_sentences([a, b], max_sentences=4)
    assert len(both) == 4 and "s1" in both  # each source gets a share
    with pytest.raises(LmdistillError, match="no sentences"):
        (tmp_path / "e.txt").write_text("\n")
        read_sentences([tmp_path / "e.txt"])


def test_instructions(tmp_path):
    f = tmp_path / "i.jsonl"
    rows = [{"prompt": "p", "output": ["r1", "r2"]}, {"prompt": "q", "output": "s"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = read_instructions(f)
    assert rows[0].response == "r1" and rows[0].references == ("r1", "r2") and rows[1].response == "s"
    f.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(LmdistillError, match="no 'prompt' or no 'output'"):
        read_instructions(f)
    f.write_text("")
    with pytest.raises(LmdistillError, match="no rows"):
        read_instructions(f)
