import pytest

from lmdistill.config import load_config, resolve_data_path
from lmdistill.errors import LmdistillError


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("method: talas\ntrain:\n  lr: 2e-4\n  batch_size: 8\nmethod_args:\n  k: 1\n")
    cfg = load_config(cfg_file, ["train.batch_size=4", "max_steps=3", "output_dir=/tmp/x", "method_args.k=2"])
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 4
    assert cfg.train.max_steps == 3  # routed to the only section that has it
    assert cfg.output_dir == "/tmp/x"
    assert cfg.method_args == {"k": 2}


def test_unknown_key_is_refused_with_known_keys(tmp_path):
    with pytest.raises(LmdistillError, match="unknown config key 'train.lrr'.*lr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(LmdistillError, match="unknown config key 'bogus'"):
        load_config(None, ["bogus=1"])


def test_bad_values(tmp_path):
    with pytest.raises(LmdistillError, match="must be a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(LmdistillError, match="optimizer"):
        load_config(None, ["train.optimizer=lion"])
    with pytest.raises(LmdistillError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(LmdistillError, match="key=value"):
        load_config(None, ["train.lr"])


def test_data_paths(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("x\n")
    monkeypatch.setenv("LMDISTILL_DATA", str(tmp_path))
    assert resolve_data_path("sub/f.txt") == tmp_path / "sub" / "f.txt"
    with pytest.raises(LmdistillError, match="not found"):
        resolve_data_path("sub/missing.txt")
    assert resolve_data_path("org/dataset") == "org/dataset"  # a hub name is passed through


def test_the_talas_authors_config_is_the_recipe_with_the_benchmarks_authors_settings():
    """configs/talas-authors-*.yaml is a whole file for users to train; it must stay the recipe
    with exactly the three settings the benchmark's "talas: authors' settings" row sets."""
    from pathlib import Path

    from lmdistill.bench.quality import TALAS_AUTHORS

    configs = Path(__file__).resolve().parents[1] / "configs"
    authors = load_config(configs / "talas-authors-mpnet-to-minilm-l3.yaml").to_dict()
    recipe = load_config(configs / "talas-mpnet-to-minilm-l3.yaml", TALAS_AUTHORS).to_dict()
    assert authors.pop("output_dir") != recipe.pop("output_dir")
    assert authors == recipe
    assert load_config(configs / "talas-mpnet-to-minilm-l3.yaml").to_dict() != recipe  # the three settings matter
