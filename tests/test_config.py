"""Config files and overrides (smaf/config.py) on YAML files written here: overrides take the type of the value
they replace, unknown keys and values of the wrong type are one-line ConfigErrors naming the key, ``base:``
merges a child over its base key by key, and invalid YAML names the file. Expected values are spelled out."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from smaf.config import ConfigError, load_config, parse_cli

PARENT = """\
work_dir: runs/x
seed: 7
lr: 0.01
flag: true
scales: [0.5, 1.0]
sizes: [256, 512]
names: [a, b]
nothing: null
name: demo
outer:
  inner:
    depth: 3
    label: deep
  width: 2
"""

#: PARENT as Python values (written out by hand, not parsed by the code under test).
PARENT_VALUES = {
    "work_dir": "runs/x", "seed": 7, "lr": 0.01, "flag": True, "scales": [0.5, 1.0], "sizes": [256, 512],
    "names": ["a", "b"], "nothing": None, "name": "demo",
    "outer": {"inner": {"depth": 3, "label": "deep"}, "width": 2},
}


@pytest.fixture
def parent(tmp_path) -> Path:
    path = tmp_path / "parent.yaml"
    path.write_text(PARENT)
    return path


def _with(changes: dict) -> dict:
    """PARENT_VALUES with dotted keys replaced."""
    import copy

    out = copy.deepcopy(PARENT_VALUES)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = out
        for part in path:
            node = node[part]
        node[last] = value
    return out


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _same_typed(a, b) -> bool:
    """Equal and of the same types, elementwise for lists (2 == 2.0 but an int is not a float here)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_typed(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# -------------------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("override, key, expected", [
    ("seed=12", "seed", 12),
    ("seed=3.0", "seed", 3),                       # an integer-valued number is accepted for an int
    ("seed=-4", "seed", -4),
    ("lr=1e-3", "lr", 0.001),
    ("lr=2", "lr", 2.0),                           # a float key stays a float
    ("flag=no", "flag", False),
    ("flag=ON", "flag", True),
    ("flag=0", "flag", False),
    ("flag= yes ", "flag", True),
    ("scales=[1,2]", "scales", [1.0, 2.0]),         # a list of floats stays floats
    ("scales=0.25", "scales", [0.25]),             # brackets are optional
    ("scales=0.5,1.5", "scales", [0.5, 1.5]),
    ("sizes=[128, 64]", "sizes", [128, 64]),
    ("sizes=[]", "sizes", []),
    ("names=[x,y,z]", "names", ["x", "y", "z"]),
    ("nothing=null", "nothing", None),
    ("nothing=[1,2]", "nothing", [1, 2]),          # a null key takes any YAML value
    ("nothing=5", "nothing", 5),
    ("nothing=text", "nothing", "text"),
    ("name=123", "name", "123"),                   # a string key stays a string
    ("name=null", "name", "null"),
    ("name=", "name", ""),
    ("work_dir=a=b", "work_dir", "a=b"),           # split on the first '=' only
    ("outer.inner.depth=9", "outer.inner.depth", 9),
    ("outer.inner.label=shallow", "outer.inner.label", "shallow"),
    (" outer.width =5", "outer.width", 5),         # spaces around the key are ignored
])
def test_overrides_take_the_type_of_the_value_they_replace(parent, override, key, expected):
    got = _get(load_config(parent, [override]), key)
    assert _same_typed(got, expected), (override, got)


def test_an_override_changes_its_key_only_and_later_overrides_win(parent):
    cfg = load_config(parent, ["outer.inner.depth=9", "seed=1", "seed=2"])
    assert cfg.to_dict() == _with({"outer.inner.depth": 9, "seed": 2})
    assert cfg.outer.inner.depth == 9 and cfg.outer.inner.label == "deep"   # attribute access, nested
    assert load_config(parent).to_dict() == PARENT_VALUES                   # the file itself is unchanged


@pytest.mark.parametrize("override, message", [
    ("sed=1", "unknown config key 'sed': valid keys at top level: flag, lr, name, names, nothing, outer, "
              "scales, seed, sizes, work_dir"),
    ("outer.inner.dept=1", "unknown config key 'outer.inner.dept': valid keys at outer.inner: depth, label"),
    ("outer.wide.depth=1", "unknown config key 'outer.wide.depth': valid keys at outer: inner, width"),
    ("seed.low=1", "unknown config key 'seed.low': valid keys at seed: (none: not a section)"),
])
def test_unknown_keys_are_one_line_errors_listing_the_valid_keys(parent, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(parent, [override])
    assert str(info.value) == message


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "seed=abc: expected an integer"),
    ("seed=2.5", "seed=2.5: expected an integer"),
    ("lr=fast", "lr=fast: expected a number"),
    ("flag=maybe", "flag=maybe: expected a boolean (true/false)"),
    ("sizes=[a,b]", "sizes=[a,b]: expected a list of numbers"),
    ("scales=[true]", "scales=[true]: expected a list of numbers"),
    ("scales={a: 1}", "scales={a: 1}: expected a list of numbers"),
    ("outer=3", "outer is a section; set one of its keys: inner, width"),
    ("seed", "override 'seed' is not of the form key.sub=value"),
])
def test_values_of_the_wrong_type_are_refused_naming_the_key(parent, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(parent, [override])
    assert str(info.value) == message


@pytest.mark.parametrize("override, expected", [
    ("scales=[1,", "scales=[1,: expected a list such as [0.5,1.0] ("),
    ("nothing=[1,", "nothing=[1,: expected a YAML value ("),
    ("nothing={a: [", "nothing={a: [: expected a YAML value ("),
])
def test_malformed_yaml_values_are_one_line_config_errors(parent, override, expected):
    """A malformed YAML value used to escape as a multi-line yaml ParserError (a traceback at the command line)."""
    with pytest.raises(ConfigError) as info:
        load_config(parent, [override])
    text = str(info.value)
    assert text.startswith(expected) and "\n" not in text


def test_parse_cli_reads_config_and_overrides(parent, monkeypatch):
    assert parse_cli(["--config", str(parent), "seed=3", "outer.width=4"]).to_dict() == \
        _with({"seed": 3, "outer.width": 4})
    monkeypatch.setenv("CONFIG", str(parent))                     # the default --config comes from $CONFIG
    assert parse_cli(["flag=false"]).flag is False


# ----------------------------------------------------------------------------------------------- base:
def test_base_child_overrides_only_what_it_sets_and_merges_nested_sections(parent, tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nseed: 8\nsizes: [64]\nouter:\n  inner:\n    depth: 5\n")
    assert load_config(child).to_dict() == _with({"seed": 8, "sizes": [64], "outer.inner.depth": 5})

    grandchild = tmp_path / "sub" / "grandchild.yaml"   # base: is relative to the file that names it
    grandchild.parent.mkdir()
    grandchild.write_text("base: ../child.yaml\nouter:\n  width: 9\n  inner:\n    label: mid\n")
    cfg = load_config(grandchild, ["outer.inner.depth=6"])       # overrides apply after the merge
    assert cfg.to_dict() == _with({"seed": 8, "sizes": [64], "outer.inner.depth": 6, "outer.inner.label": "mid",
                                   "outer.width": 9})
    assert "base" not in cfg


def test_base_may_be_a_packaged_config(tmp_path):
    child = tmp_path / "mine.yaml"
    child.write_text("base: demo\nseed: 5\ndata:\n  saliency_dir: Sal2\n")
    demo = load_config("demo").to_dict()
    mine = load_config(child).to_dict()
    assert mine["seed"] == 5 and mine["data"]["saliency_dir"] == "Sal2"
    demo["seed"], demo["data"]["saliency_dir"] = 5, "Sal2"
    assert mine == demo


def test_a_child_key_the_base_lacks_is_refused_naming_the_child(parent, tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nouter:\n  inner:\n    colour: red\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert str(info.value) == (f"{child}: unknown config key 'outer.inner.colour': valid keys at outer.inner: "
                               f"depth, label")


# ------------------------------------------------------------------------------------------ bad files
def test_invalid_yaml_is_one_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\nlr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert re.fullmatch(rf"{re.escape(str(bad))}: not valid YAML \([^\n]+\)", str(info.value)), str(info.value)


def test_invalid_yaml_in_a_base_names_the_base_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("a: {b: 1\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\na: {b: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert str(info.value).startswith(f"{base}: not valid YAML (") and "\n" not in str(info.value)


def test_a_file_that_is_not_a_mapping_or_not_found_is_named(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- seed\n- lr\n")
    with pytest.raises(ConfigError) as info:
        load_config(listed)
    assert str(info.value) == f"{listed}: the top level must be a mapping of keys"
    child = tmp_path / "child.yaml"
    child.write_text("base: nowhere.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"^config 'nowhere\.yaml' not found: give a YAML path or one of: .*demo"):
        load_config(child)


def test_derive_switching_a_fragment_brings_the_configs_own_settings_of_it(tmp_path):
    """A config may set keys of a fragment it does not select (demo.yaml: a2gnn.box.epochs 20); deriving that
    selection later (the runner's box row) must bring those settings, not only the fragment file's defaults, and
    switching back restores the first one's; the stash never shows in the resolved config."""
    import copy

    import yaml

    from smaf.config import derive, save_config

    cfg = load_config("demo")
    assert "box" not in cfg.a2gnn and cfg.a2gnn.image.epochs == 15
    box = derive(cfg, a2gnn__preset="box")
    assert box.a2gnn.box.epochs == 20 and box.a2gnn.box.lr == 0.035 and "image" not in box.a2gnn
    assert derive(box, a2gnn__preset="image").a2gnn.image.epochs == 15
    assert cfg.a2gnn.image.epochs == 15 and "box" not in cfg.a2gnn            # derive leaves its input alone
    # a fragment no config file touched: the file's defaults (voc12: box 150 epochs)
    assert derive(load_config("voc12"), a2gnn__preset="box").a2gnn.box.epochs == 150
    # an override of the unselected fragment's keys on the command line travels the same way
    own = load_config("demo", ["a2gnn.box.epochs=7"])
    assert derive(copy.deepcopy(own), a2gnn__preset="box").a2gnn.box.epochs == 7
    saved = yaml.safe_load(save_config(box, tmp_path).read_text())
    assert saved == box.to_dict() and "_unselected_fragments" not in str(saved)


def test_the_vit_configs_differ_from_their_sets_by_the_backbone_only_and_agree_with_each_other():
    """pets_vit / msrc_vit are the issue-18 comparison (SMAF on ViT-S/14 vs EfficientNet-Lite0): each must be its
    set's config with the same ViT changes, so msrc_vit (which cannot inherit from pets_vit) may not drift."""
    from smaf.config import _flatten

    flat = {name: _flatten(load_config(name)) for name in ("pets", "pets_vit", "msrc", "msrc_vit")}
    vit_changes = {k: v for k, v in flat["pets_vit"].items() if flat["pets"].get(k, "(absent)") != v and k != "work_dir"}
    assert vit_changes["model.backbone"] == "vit_s14_focus" and vit_changes["model.output_stride"] == 14
    assert vit_changes["train_cls.optimizer"] == vit_changes["train_fusion.optimizer"] == "adamw"
    assert flat["pets_vit"]["train_cls.crop"] % 14 == 0 and flat["pets_vit"]["train_fusion.crop"] % 14 == 0
    msrc_changes = {k: v for k, v in flat["msrc_vit"].items() if flat["msrc"].get(k, "(absent)") != v and k != "work_dir"}
    assert msrc_changes == vit_changes
    assert load_config("pets_vit").work_dir != load_config("pets").work_dir
