import pytest

from lmdistill.data.readers import read_sts
from lmdistill.eval.sts import sts_spearman


def test_mteb_on_a_local_file_matches_our_spearman(tiny_st, sts_file):
    pytest.importorskip("mteb")
    from lmdistill.eval.mteb_local import mteb_sts
    from lmdistill.models import load_sentence_model

    model = load_sentence_model(str(tiny_st))
    ours = sts_spearman(model, read_sts(sts_file), progress=False)
    theirs = mteb_sts(model, sts_file)
    assert theirs["n"] == ours["n"] == 6
    assert theirs["spearman"] == pytest.approx(ours["spearman"], abs=0.01)
