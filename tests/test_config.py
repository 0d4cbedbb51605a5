import pytest

from mtnlg.config import Config, dump_toml, load_config
from mtnlg.errors import UserError
from mtnlg.model.flops import param_count
from mtnlg.model.gpt import build_model


@pytest.mark.parametrize("name", ["tiny", "gpt-125m", "gpt-1.3b", "mtnlg-530b"])
def test_presets_load_and_build_on_meta(name):
    cfg = load_config(f"configs/{name}.toml")
    model = build_model(cfg.model, "meta")
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg.model)


def test_530b_preset_is_the_paper_architecture():
    cfg = load_config("configs/mtnlg-530b.toml")
    m = cfg.model
    assert (m.n_layers, m.hidden, m.n_heads, m.seq_len, m.ffn) == (105, 20480, 128, 2048, 81920)
    assert m.padded_vocab(8) == 51200 and m.padded_vocab(8) % (8 * 128) == 0
    assert 525e9 < param_count(m, m.padded_vocab(8)) < 535e9
    assert (cfg.parallel.tp, cfg.parallel.pp) == (8, 35)
    assert m.activation == "gelu"  # Megatron-LM's exact erf GeLU, not GPT-2's tanh form


def test_overrides_parse_toml_literals():
    cfg = load_config("configs/tiny.toml", ["optim.lr=3e-4", "model.n_layers=3", "train.precision=fp32",
                                           'data.blend=[[0.5, "a"], [0.5, "b"]]', "logging.tensorboard=true"])
    assert cfg.optim.lr == 3e-4 and cfg.model.n_layers == 3 and cfg.train.precision == "fp32"
    assert cfg.data.blend == [[0.5, "a"], [0.5, "b"]] and cfg.logging.tensorboard is True


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosuch.x=1", "unknown config key 'nosuch'"),
    ("model.n_layers=2.5", "'model.n_layers' expects int"),
    ("model.n_heads=3", "model.n_heads=3 must divide model.hidden=256"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("parallel.tp=8", "parallel.tp=8 must divide model.n_heads=4"),
    ("train.global_batch=12", "must be a multiple of train.micro_batch"),
    ("data.blend=[[1.0]]", "data.blend[0] must be [weight"),
    ("optim.lr", "must look like section.key=value"),
    ('train.batch_rampup=["a", 8, 16]', "train.batch_rampup must be [start, increment, samples]"),
    ('data.split=["a", 1, 1]', "data.split must be three non-negative ratios"),
    ("logging.log_interval=0", "logging.log_interval must be >= 1"),
    ("train.save_interval=-1", "train.save_interval must be >= 0"),
    ("parallel.timeout_s=0", "parallel.timeout_s must be positive"),
    ("model.activation=relu", "model.activation must be one of gelu_tanh, gelu, got 'relu'"),
    ("model.activation=gelu_new", "model.activation must be one of gelu_tanh, gelu, got 'gelu_new'"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("configs/tiny.toml", [override])


def test_unknown_key_in_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nlayers = 3\n")
    with pytest.raises(UserError, match="unknown config key 'model.layers'"):
        load_config(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)


def test_dump_round_trips(tmp_path):
    cfg = load_config("configs/mtnlg-530b.toml", ['data.blend=[[0.3, "x y"], [0.7, "q\\"z"]]'])
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg
    assert Config().validate() == Config()


def test_530b_schedule_counts_tokens_as_the_paper_with_batch_rampup():
    """Warm-up over 1B tokens, batch 32 -> 1920 over 12B, cosine to 340B, stop at 270B tokens."""
    from mtnlg.train.schedule import global_batch_at
    cfg = load_config("configs/mtnlg-530b.toml")
    s, consumed, tokens_at = cfg.model.seq_len, 0, {}
    marks = {cfg.optim.warmup_steps: "warmup", cfg.train.steps: "end",
             cfg.optim.warmup_steps + cfg.optim.decay_steps: "decay"}
    for step in range(1, max(marks) + 1):
        consumed += global_batch_at(consumed, cfg.train)
        if step in marks:
            tokens_at[marks[step]] = consumed * s
    assert global_batch_at(0, cfg.train) == 32 and global_batch_at(12_000_000_000 // s, cfg.train) == 1920
    assert tokens_at["warmup"] == pytest.approx(1e9, rel=0.01)
    assert tokens_at["end"] == pytest.approx(270e9, rel=0.01)
    assert tokens_at["decay"] == pytest.approx(340e9, rel=0.01)


def test_activation_defaults_to_gpt2_tanh_and_old_configs_keep_their_digest(tmp_path):
    """Configs written before model.activation existed load as gelu_tanh, and a run keeps
    the checkpoint digest it had (resume compares it): the key is left out of the digest
    at its default, so only an explicit erf choice makes a different run."""
    from mtnlg.train.trainer import config_digest
    for name in ("tiny", "gpt-125m", "gpt-760m", "gpt-1.3b"):
        assert load_config(f"configs/{name}.toml").model.activation == "gelu_tanh"
    old = tmp_path / "config.toml"
    old.write_text("\n".join(line for line in dump_toml(load_config("configs/tiny.toml")).splitlines()
                             if not line.startswith("activation")))
    assert "activation" not in old.read_text() and "[model]" in old.read_text()
    cfg = load_config(old)
    assert cfg.model.activation == "gelu_tanh"
    assert config_digest(Config()) == "342a9dcb5da90903"  # computed before the key existed (main at 30ea5f2)
    assert config_digest(cfg) == config_digest(load_config("configs/tiny.toml", ["model.activation=gelu_tanh"]))
    assert config_digest(cfg) != config_digest(load_config("configs/tiny.toml", ["model.activation=gelu"]))
    assert load_config("configs/tiny.toml", ["model.activation=gelu"]).model.activation == "gelu"
