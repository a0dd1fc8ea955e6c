from dataclasses import dataclass, field

import pytest

from backbones.engine.config import ConfigError, load_config


@dataclass
class Inner:
    lr: float = 0.1
    steps: list = field(default_factory=lambda: [30, 60])


@dataclass
class Schema:
    solver: Inner = field(default_factory=Inner)
    name: str = "x"


def test_defaults_base_inheritance_and_override_order(tmp_path):
    (tmp_path / "base.yaml").write_text("solver:\n  lr: 0.2\n  steps: [1, 2]\nname: base\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nsolver:\n  lr: 0.3\n")
    cfg = load_config(Schema, str(tmp_path / "child.yaml"), ["name=cli"])
    assert cfg.solver.lr == 0.3 and list(cfg.solver.steps) == [1, 2] and cfg.name == "cli"
    assert load_config(Schema, None, ["name="]).name == ""  # key= is the empty string
    assert load_config(Schema).solver.lr == 0.1


def test_unknown_key_in_file_names_file_key_and_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("solver:\n  lrr: 0.2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'solver\.lrr'; did you mean 'solver\.lr'"):
        load_config(Schema, str(path))


def test_unknown_override_and_bad_type():
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'solvr'; did you mean 'solver'"):
        load_config(Schema, None, ["solvr.lr=1"])
    with pytest.raises(ConfigError, match="command line"):
        load_config(Schema, None, ["solver.lr=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Schema, None, ["solver.lr"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Schema, str(tmp_path / "nope.yaml"))
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(Schema, str(tmp_path / "a.yaml"))


def test_every_shipped_pretrain_config_loads(repo_root):
    from backbones.pretraining.config import PretrainConfig

    paths = sorted((repo_root / "configs" / "pretrain").glob("*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        load_config(PretrainConfig, str(path))
    assert load_config(PretrainConfig, str(repo_root / "configs/pretrain/resnet101_imagenet.yaml")).model.depth == 101


def test_every_shipped_detection_config_loads(repo_root):
    from detection.config import DetConfig

    paths = sorted(repo_root.glob("configs/frcnn_*.yaml"))  # loc_*.yaml are localization configs
    assert {p.name for p in paths} >= {"frcnn_r101_coco.yaml", "frcnn_demo.yaml", "frcnn_r50_fpn_coco.yaml",
                                       "frcnn_r101_coco_full.yaml"}
    for path in paths:
        load_config(DetConfig, str(path))
    paper = load_config(DetConfig, str(repo_root / "configs/frcnn_r101_coco.yaml"))
    assert (paper.model.backbone.depth, paper.model.roi_heads.pooler_type, paper.solver.base_lr) == (101, "ROIPool", 0.001)
    assert load_config(DetConfig, str(repo_root / "configs/frcnn_r50_fpn_coco.yaml")).model.neck == "fpn"
    full = load_config(DetConfig, str(repo_root / "configs/frcnn_r101_coco_full.yaml"))
    assert full.model.roi_heads.global_context and full.eval.box_refinement
    assert list(full.eval.test_scales) == [200, 400, 600, 800, 1000] and full.model.backbone.depth == 101


def test_a_fixed_choice_fails_at_load_naming_the_key_and_the_valid_values(tmp_path, repo_root):
    from detection.config import DetConfig

    with pytest.raises(ConfigError, match=r"command line: solver.amp: Invalid value 'fp32', expected one of "
                                          r"\[none, bf16, fp16\]"):
        load_config(DetConfig, str(repo_root / "configs/frcnn_demo.yaml"), ["solver.amp=fp32"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: %s\nmodel:\n  roi_heads:\n    pooler_type: RoIAlign\n" % (repo_root / "configs/frcnn_demo.yaml"))
    with pytest.raises(ConfigError, match=r"bad.yaml: model.roi_heads.pooler_type: Invalid value 'RoIAlign', "
                                          r"expected one of \[ROIAlignV2, ROIAlign, ROIPool\]"):
        load_config(DetConfig, str(bad))
    cfg = load_config(DetConfig, str(repo_root / "configs/frcnn_demo.yaml"), ["solver.amp=bf16", "model.neck=fpn"])
    assert cfg.solver.amp == "bf16" and f"{cfg.model.neck}" == "fpn" and {"fpn": 1}[cfg.model.neck] == 1


def test_moved_keys_of_older_configs_are_read_at_their_new_place_with_a_warning(tmp_path, repo_root):
    """Detection's data keys moved into groups (data.coco / data.xml / data.synthetic): an older config file
    or run folder's config.yaml, and older overrides, still load, each moved key named in a warning; a key
    given both ways in one layer keeps the new one."""
    from detection.config import DetConfig

    old = tmp_path / "old.yaml"
    old.write_text("data:\n  synthetic: true\n  synthetic_num_train: 7\n  train_images: imgs\n"
                   "  train_sets: ['r:train']\n  coco:\n    val_images: new\n  val_images: old\n")
    with pytest.warns(FutureWarning) as record:
        cfg = load_config(DetConfig, str(old), ["data.synthetic=false", "data.class_names=[a,b]"])
    messages = " ".join(str(w.message) for w in record)
    assert "'data.synthetic_num_train' is now 'data.synthetic.num_train'" in messages and "old.yaml" in messages
    assert "command line: 'data.class_names' is now 'data.xml.class_names'" in messages
    assert cfg.data.synthetic.num_train == 7 and cfg.data.synthetic.enabled is False  # the command line came last
    assert cfg.data.coco.train_images == "imgs" and cfg.data.coco.val_images == "new"
    assert list(cfg.data.xml.train_sets) == ["r:train"] and list(cfg.data.xml.class_names) == ["a", "b"]
    with pytest.raises(ConfigError, match="unknown config key 'data.coco.train_sets'"):
        load_config(DetConfig, None, ["data.coco.train_sets=[x]"])
