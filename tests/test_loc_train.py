"""ImageNet localization entry end to end through tools/train_loc.py and tools/eval_loc.py: learning beats the
centre-box baseline, the R-CNN stage, kill-and-resume in both stages, DDP, bad input, the real imagenette sample."""
import json
import os
import subprocess
import sys

import pytest
import torch

from backbones import backbone_checkpoint, build_resnet
from backbones.engine.config import load_config
from backbones.pretraining.config import PretrainConfig
from conftest import ROOT, SHARED_DATA, assert_same_weights
from detection.localization.synthetic import make_synthetic_loc

IMAGENETTE = SHARED_DATA / "imagenette-loc"
SHAPES4 = ("circle", "square", "triangle", "cross")


# -- tools, end to end ---------------------------------------------------------------------------

def run_tool(tool, args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def synthetic_loc(tmp_path_factory):
    """4 shape classes x 60 images of 64 px with boxes, and a ResNet-18 w8 classifier pretrained on 80% of
    them (the pretraining's holdout, seed 0). 60 per class, not fewer: with 40 the learning test below
    had 32 val images and its margin over the baseline swung by 0.1-0.15 between CPU capabilities
    (ATEN_CPU_CAPABILITY=default vs avx512) and seeds."""
    from backbones.pretraining.trainer import train as pretrain
    root = tmp_path_factory.mktemp("loc")
    paths = make_synthetic_loc(str(root / "data"), per_class=60, image_size=64, seed=0, classes=SHAPES4)
    cfg = load_config(PretrainConfig, None, [
        f"data.train_dir={paths['images']}", "data.val_dir=", "data.val_fraction=0.2", "data.synthetic=false",
        "data.scale_range=[64,80]", "data.crop_size=56", "data.test_resize=64", "data.workers=0",
        "model.base_width=8", "solver.batch_size=32", "solver.epochs=30", "solver.steps=[25]", "eval.period=30",
        "solver.warmup_epochs=0",
        "eval.ten_crop=false", "eval.multiscale_sizes=[]", f"output_dir={root}/pretrain", "log_period=50"])
    torch.set_num_threads(1)
    summary = pretrain(cfg, "pretrain")
    return dict(paths, classifier=summary["backbone_checkpoint"], root=root)


def loc_args(data, out, *extra):
    return ["data.layout=imagefolder", f"data.train_images={data['images']}", f"data.train_annotations={data['annotations']}",
            f"model.classifier={data['classifier']}", "data.workers=0",
            "eval.dense_scales=[56,64,80]", "log_period=10", f"output_dir={out}", *extra]


def test_trained_rpn_beats_the_centre_box_baseline_and_eval_loc_agrees(synthetic_loc, tmp_path):
    out = tmp_path / "run"
    # 500 iterations: at 250 the dense oracle error ended 0.66-0.75 against the baseline's 0.84 depending on
    # the CPU's instruction set; at 500 it ends 0.31-0.58 against 0.69-0.81 (seeds 0-1, default and avx512).
    run_tool("train_loc.py", loc_args(synthetic_loc, out, "solver.max_iter=500", "solver.steps=[400]",
                                      "checkpoint_period=250"))
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "summary.json", "checkpoints/last.pth"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 192 and summary["val_images"] == 48
    for mode in ("center", "dense"):
        m = summary["val"][mode]
        assert m["images"] == 48 and 0 <= m["oracle_err"] <= 1 and "baseline_center_box" in m
        assert m["loc_top1_err"] >= m["loc_top5_err"] and m["cls_top5_err"] <= m["loc_top5_err"]
    # The centred box of the best size for the training boxes, with the same class guesses, is the baseline.
    # (48 val images: 0.1 is 5 images; the runs above beat it by 0.23-0.37.)
    for mode in ("center", "dense"):
        m, base = summary["val"][mode], summary["val"][mode]["baseline_center_box"]
        assert m["oracle_err"] <= base["oracle_err"] - 0.1, (mode, m)
        assert m["loc_top5_err"] <= base["loc_top5_err"] - 0.1, (mode, m)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_cls" in r for r in records) and any("val_dense/loc_top5_err" in r for r in records)

    run_tool("eval_loc.py", [out, "eval.modes=[center]"])
    again = json.loads((out / "eval_last" / "summary.json").read_text())["val"]["center"]
    flat = {k: v for k, v in summary["val"]["center"].items() if not isinstance(v, dict)}
    assert {k: again[k] for k in flat} == pytest.approx(flat)  # same weights, same images
    assert again["baseline_center_box"] == summary["val"]["center"]["baseline_center_box"]


def test_rcnn_stage_trains_on_proposals_and_rescores(synthetic_loc, tmp_path):
    out = tmp_path / "rcnn"
    run_tool("train_loc.py", loc_args(synthetic_loc, out, "solver.batch_size=8", "solver.max_iter=4", "eval.modes=[center]",
                                      "rcnn.enabled=true", "rcnn.max_iter=3", "rcnn.batch_size=8",
                                      "rcnn.proposals_per_image=5", "rcnn.crop_size=32", "rcnn.proposal_scale=64"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rcnn"]["iterations"] == 3 and summary["rcnn"]["rois"] <= 192 * (5 + 1)
    assert set(summary["val"]["center"]["rcnn"]) >= {"loc_top1_err", "loc_top5_err", "oracle_err"}
    assert (out / "checkpoints/rcnn_last.pth").is_file()
    assert (out / "checkpoints/rcnn_rois/complete.json").is_file() and (out / "checkpoints/rcnn_rois/box.npy").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train_rcnn/loss_rcnn_cls" in r for r in records)


def test_killed_and_resumed_run_matches_uninterrupted(synthetic_loc, tmp_path):
    # 192 images at batch 8: 24 iterations per epoch; checkpoints every 4; killed at 7; 10 in all.
    common = ["solver.batch_size=8", "solver.max_iter=10", "checkpoint_period=4", "eval.modes=[]"]
    run_tool("train_loc.py", loc_args(synthetic_loc, tmp_path / "straight", *common))
    killed = run_tool("train_loc.py", loc_args(synthetic_loc, tmp_path / "resumed", *common, "debug_stop_at_iter=7"),
                      check=False)
    assert killed.returncode == 3
    log = run_tool("train_loc.py", loc_args(synthetic_loc, tmp_path / "resumed", *common, "resume=true")).stdout
    assert "resumed from" in log and "at iteration 4" in log
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_run_killed_in_the_rcnn_stage_resumes_there_and_matches_uninterrupted(synthetic_loc, tmp_path):
    # RPN: 4 iterations; R-CNN stage: 6, checkpoints every 2; killed at its 3rd (global 7), so the
    # resumed run must skip the finished RPN, reuse the saved proposals and continue from R-CNN iteration 2.
    common = ["solver.batch_size=8", "solver.max_iter=4", "checkpoint_period=2", "eval.modes=[]",
              "rcnn.enabled=true", "rcnn.max_iter=6", "rcnn.steps=[4]", "rcnn.batch_size=8",
              "rcnn.proposals_per_image=5", "rcnn.crop_size=32", "rcnn.proposal_scale=64"]
    run_tool("train_loc.py", loc_args(synthetic_loc, tmp_path / "straight", *common))
    killed = run_tool("train_loc.py", loc_args(synthetic_loc, tmp_path / "resumed", *common, "debug_stop_at_iter=7"),
                      check=False)
    assert killed.returncode == 3
    killed_output = killed.stdout + killed.stderr
    assert "rcnn proposals" in killed_output  # the progress bar of the proposal pass
    resumed = run_tool("train_loc.py", loc_args(synthetic_loc, tmp_path / "resumed", *common, "resume=true"))
    log = resumed.stdout
    assert "finished training earlier" in log and "R-CNN stage resumed from" in log and "at iteration 2" in log
    # the RoI table is read back from checkpoints/rcnn_rois, not proposed again
    assert "rcnn proposals" not in resumed.stdout + resumed.stderr
    a = torch.load(tmp_path / "straight/checkpoints/rcnn_last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/rcnn_last.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 6
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=0, rtol=0, msg=key)
    # the stored RoI table no longer matches the settings: a clear error, not a silent reuse
    changed = run_tool("train_loc.py", loc_args(synthetic_loc, tmp_path / "resumed", *common, "resume=true",
                                                "rcnn.fg_iou_thresh=0.6"), check=False)
    assert changed.returncode == 2 and "rcnn.fg_iou_thresh: 0.5 -> 0.6" in changed.stderr
    assert "rcnn_rois" in changed.stderr


def test_ddp_two_processes_with_the_rcnn_stage(synthetic_loc, tmp_path):
    """Under torchrun both stages train and every val image is evaluated once, gathered on rank 0."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           str(ROOT / "tools" / "train_loc.py"),
           *loc_args(synthetic_loc, out, "solver.batch_size=8", "solver.max_iter=2", "eval.modes=[center]",
                     "rcnn.enabled=true", "rcnn.max_iter=2", "rcnn.batch_size=8", "rcnn.proposals_per_image=3",
                     "rcnn.crop_size=32", "rcnn.proposal_scale=64")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val"]["center"]["images"] == 48 and summary["rcnn"]["iterations"] == 2
    assert "2 ranks" in (out / "log.txt").read_text()


def test_tool_reports_bad_input_before_training(synthetic_loc, tmp_path):
    proc = run_tool("train_loc.py", loc_args(synthetic_loc, tmp_path / "a", "data.val_fraction=0.3"), check=False)
    assert proc.returncode == 2 and "data.val_fraction=0.2 data.holdout_seed=0" in proc.stderr
    proc = run_tool("train_loc.py", loc_args(synthetic_loc, tmp_path / "b", f"model.classifier={tmp_path}/none.pth"),
                    check=False)
    assert proc.returncode == 2 and "none.pth" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.skipif(not (IMAGENETTE / "images").is_dir(), reason="needs ../shared/data/imagenette-loc")
def test_real_imagenette_sample_loads_and_trains_a_few_iterations(tmp_path):
    wnids = sorted(os.listdir(IMAGENETTE / "images"))
    net = build_resnet(18, num_classes=len(wnids), base_width=8)
    torch.save(backbone_checkpoint(net, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], wnids), tmp_path / "clf.pth")
    out = tmp_path / "run"
    run_tool("train_loc.py", ["configs/loc_r18_imagenette.yaml", f"model.classifier={tmp_path}/clf.pth",
                              f"data.train_images={IMAGENETTE}/images", f"data.train_annotations={IMAGENETTE}/annotations",
                              "data.scale_range=[64,80]", "data.crop_size=64", "data.workers=0", "solver.max_iter=3",
                              "solver.batch_size=8", "eval.modes=[center]", "eval.test_resize=64", f"output_dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 400 and summary["val_images"] == 100 and len(summary["class_names"]) == 10
    assert summary["train_unannotated_skipped"] == 0 and summary["val"]["center"]["images"] == 100
