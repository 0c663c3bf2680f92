import pytest

from lmlab.cli import main
from lmlab.config import RunConfig, apply_overrides, dump_yaml, from_dict, load_config, to_dict
from lmlab.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "train.steps=7", "model.tie_embeddings=false", "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7
    assert cfg.model.tie_embeddings is False
    assert cfg.optim.betas == (0.8, 0.9)


def test_unknown_key_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "optim:\n  lrr: 0.1\n"))
    msg = str(err.value)
    assert "optim.lrr" in msg and "did you mean optim.lr" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key 'modle'.*model"):
        load_config(None, ["modle.d_model=3"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.steps=abc", "train.steps='abc' has the wrong type: expected int"),
        ("model.tie_embeddings=3", "expected bool"),
        ("schedule.name=exp", "valid choices: constant, linear, cosine, wsd"),
        ("model.n_heads=5", "model.n_heads=5 must divide model.d_model=256"),
        ("model.n_kv_heads=3", "model.n_kv_heads=3 must divide model.n_heads=4"),
        ("optim.lr=-1", "optim.lr=-1.0 must be >= 0"),
        ("train.seq_len=4096", "exceeds model.max_seq_len"),
        ("model.size=gigantic", "valid choices: nano"),
    ],
)
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    assert err.value.exit_code == 2


def test_named_size_fills_dims_and_explicit_keys_win():
    cfg = load_config(None, ["model.size=mini", "model.n_layers=3"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (512, 3, 8)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_from_dict_nested_type_error():
    with pytest.raises(ConfigError, match="data.synthetic.n_docs"):
        from_dict(RunConfig, {"data": {"synthetic": {"n_docs": "many"}}})


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["a.b=1"]) == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["nonsense"])


def test_cli_config_show_and_validate(tmp_path, capsys):
    p = write(tmp_path, "train:\n  steps: 5\n")
    assert main(["config", "show", str(p), "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "lr: 0.5" in out
    assert main(["config", "validate", str(p)]) == 0
    bad = write(tmp_path, "train:\n  stepz: 5\n")
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "Traceback" not in err


def test_shipped_configs_build():
    from pathlib import Path

    import yaml

    from lmlab.science.sweep import load_sweep

    root = Path(__file__).resolve().parents[2]
    configs = sorted([*root.glob("configs/**/*.yaml"), *root.glob("examples/**/*.yaml")])
    assert configs, "no shipped configs found"
    for path in configs:
        if "sweeps" in path.parts or "runs" in path.parts:
            continue  # recorded run data (examples/**/sweeps, examples/**/runs), not recipes
        top = yaml.safe_load(path.read_text()) or {}
        if "base" in top:
            spec = load_sweep(path)  # a sweep file: every planned run must build
            for run in spec.runs:
                load_config(spec.base, [*spec.overrides, *run.overrides])
        else:
            load_config(path)


def test_command_line_size_beats_yaml_dims_but_not_explicit_overrides(tmp_path):
    p = write(tmp_path, "model:\n  d_model: 192\n  n_layers: 4\n  n_heads: 6\n")
    cfg = load_config(p, ["model.size=tiny"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (256, 8, 8)
    cfg = load_config(p, ["model.size=tiny", "model.n_layers=2"])
    assert (cfg.model.d_model, cfg.model.n_layers) == (256, 2)
    assert load_config(p).model.d_model == 192


def test_override_list_items_by_index():
    data = {"data": {"mixture": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}}
    apply_overrides(data, ["data.mixture.1.weight=4"])
    assert data["data"]["mixture"][1]["weight"] == 4
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(data, ["data.mixture.5.weight=1"])
