"""End-to-end checks of the detection tools: train_det, eval_det, infer, resume, DDP, real COCO data."""
import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from backbones.engine.config import load_config
from backbones.engine.imageio import read_image_rgb
from backbones.resnet import is_channels_last
from conftest import ROOT, SHARED_DATA, assert_same_weights
from det_helpers import SLIM, data_overrides, unmatched_detections
from detection.config import DetConfig
from detection.data.coco import CocoDetection
from detection.data.synthetic import make_synthetic_coco
from detection.evaluation.coco_eval import COCOEvaluator
from detection.export import DeployableDetector, load_exported
from detection.predictor import Predictor, load_trained_detector

COCO128 = SHARED_DATA / "coco128"


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth") / "coco", num_train=12, num_val=6, image_size=96,
                               seed=3, min_obj=16, max_obj=48, objects_per_image=(1, 3))


def run(tool, args, check=True, env=None):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_missing_coco_stops_at_once_with_layout_and_demo(tmp_path):
    proc = run("train_det.py", ["configs/frcnn_r101_coco.yaml", f"data.coco.train_images={tmp_path}/coco/train2017",
                                f"output_dir={tmp_path}/run"], check=False)
    assert proc.returncode == 2
    assert f"{tmp_path}/coco/train2017" in proc.stderr
    assert "expected layout" in proc.stderr and "configs/frcnn_demo.yaml" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_bad_annotation_is_reported_before_training(tiny_coco, tmp_path):
    data = json.loads(open(tiny_coco["train_annotations"]).read())
    data["annotations"][0]["category_id"] = 999
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    args = ["configs/frcnn_demo.yaml", *data_overrides(tiny_coco), f"data.coco.train_annotations={bad}",
            "data.synthetic.enabled=false", *SLIM, f"output_dir={tmp_path}/run"]
    proc = run("train_det.py", args, check=False)
    assert proc.returncode == 2 and "bad.json" in proc.stderr and "999" in proc.stderr


def test_check_data_reports_the_sets_and_draws_augmented_samples(tiny_coco, tmp_path):
    data = json.loads(open(tiny_coco["train_annotations"]).read())
    data["annotations"][0]["category_id"] = 999  # one bad record: listed, dropped, and the exit code says so
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps(data))
    args = ["configs/frcnn_demo.yaml", "data.synthetic.enabled=false", *data_overrides(tiny_coco),
            f"data.coco.train_annotations={bad}", *SLIM, "--out", tmp_path / "check"]
    proc = run("check_data.py", args, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "1 x annotation of an unknown category" in proc.stdout and "category_id 999" in proc.stdout
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    boxes = sum(1 for a in data["annotations"] if not a.get("iscrowd")) - 1
    assert report["train"]["boxes"] == boxes and sum(report["train"]["classes"].values()) == boxes
    assert report["train"]["problems"] == {"annotation of an unknown category": 1}
    coverage = report["train"]["anchor_coverage"]
    assert coverage["boxes_checked"] == boxes and 0 <= coverage["below_0.5"] <= coverage["below_0.7"] <= boxes
    grid = cv2.imread(str(tmp_path / "check" / "train_grid.jpg"))
    assert grid is not None and grid.shape[0] >= 320 and grid.shape[1] == 4 * 320
    assert run("check_data.py", args + ["data.strict_train=false"]).returncode == 0


def test_train_eval_infer_write_their_files(tiny_coco, tmp_path):
    out = tmp_path / "run"
    run("train_det.py", ["configs/frcnn_demo.yaml", "data.synthetic.enabled=false", *data_overrides(tiny_coco), *SLIM,
                         "solver.max_iter=4", "checkpoint_period=2", "eval.period=2", f"output_dir={out}"])
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "summary.json", "checkpoints/last.pth",
                 "coco_results.json", "coco_metrics.json", "per_class_ap.txt"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 4 and {"AP", "AP50", "AP75", "APs", "AR100"} <= set(summary["val"])
    train_json = json.loads(open(tiny_coco["train_annotations"]).read())
    names = {c["id"]: c["name"] for c in train_json["categories"]}
    first = names[min(names)]
    n_first = sum(a["category_id"] == min(names) for a in train_json["annotations"] if not a.get("iscrowd"))
    log_text = (out / "log.txt").read_text()
    assert f"classes (training boxes): {first} ({n_first})" in log_text
    assert "effective batch 4 images = 1 rank x 4; lr 0.02 = base_lr 0.02 x 4 / 4" in log_text
    assert summary["data_problems"] == {"train": {}, "val": {}}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_rpn_cls" in r for r in records) and any("val/AP" in r for r in records)

    run("eval_det.py", [out])
    metrics = json.loads((out / "eval_last" / "coco_metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(summary["val"]["AP"], abs=1e-9)  # same weights, same data
    assert metrics["num_images"] == 6 and metrics["num_unprocessed"] == 0
    page = (out / "eval_last" / "index.html").read_text()  # the report a person looks at
    assert "pr_curves.png" in page and "per_class_ap.png" in page and "worst:" in page and "best:" in page
    for name in ("pr_curves.png", "per_class_ap.png"):
        assert cv2.imread(str(out / "eval_last" / name)) is not None, name
    shown = [line.split("src='")[1].split("'")[0] for line in page.splitlines() if "examples/" in line]
    assert shown and all(cv2.imread(str(out / "eval_last" / src)) is not None for src in shown)

    # A broken val image stops evaluation at load (strict val set), naming it ...
    broken = tmp_path / "val_images"
    shutil.copytree(tiny_coco["val_images"], broken)
    victim = sorted(broken.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])
    proc = run("eval_det.py", [out, f"data.coco.val_images={broken}"], check=False)
    assert proc.returncode == 2 and "1 x unreadable image" in proc.stderr and victim.name in proc.stderr
    # ... and one that is found unreadable only when read is scored as an image without detections, not
    # dropped with its objects
    proc = run("eval_det.py", [out, f"data.coco.val_images={broken}", "data.verify_images=none"])
    metrics = json.loads((out / "eval_last" / "coco_metrics.json").read_text())
    assert metrics["num_images"] == 6 and metrics["num_unprocessed"] == 1
    assert "1 not processed" in proc.stdout + proc.stderr
    run("eval_det.py", [out, f"data.coco.val_images={broken}", "data.verify_images=none", "eval.only_processed_images=true"])
    metrics = json.loads((out / "eval_last" / "coco_metrics.json").read_text())
    assert metrics["num_images"] == 5 and metrics["num_unprocessed"] == 0

    run("infer.py", [out, tiny_coco["val_images"], "--score-thresh", "0.0", "--limit", "3"])
    results = json.loads((out / "infer" / "detections.json").read_text())
    assert len(results) == 3 and len(list((out / "infer").glob("*_det.jpg"))) == 3
    for r in results:
        for d in r["detections"]:
            x1, y1, x2, y2 = d["box_xyxy"]
            assert 0 <= x1 <= x2 <= r["width"] and 0 <= y1 <= y2 <= r["height"]
    # the tools' one grammar: checkpoint= and key=value overrides after the positional arguments
    run("infer.py", [out, tiny_coco["val_images"], "checkpoint=last", "eval.flip=true", "--limit", "2",
                     "--out", tmp_path / "flip"])
    assert len(json.loads((tmp_path / "flip" / "detections.json").read_text())) == 2
    proc = run("infer.py", [out, tiny_coco["val_images"], "eval.flipp=true"], check=False)
    assert proc.returncode == 2 and "unknown config key 'eval.flipp'; did you mean 'eval.flip'" in proc.stderr


def test_small_data_config_counts_epochs_evaluates_each_and_keeps_the_best(tiny_coco, tmp_path):
    """configs/frcnn_r50_c4_finetune_small.yaml (slimmed): solver.epochs / step_epochs / eval.period_epochs
    become iterations from the training set's size, recorded in config.yaml; best.pth holds the best AP."""
    out = tmp_path / "small"
    proc = run("train_det.py", ["configs/frcnn_r50_c4_finetune_small.yaml", *data_overrides(tiny_coco), *SLIM,
                                "solver.epochs=3", "solver.step_epochs=[2]", "eval.period_epochs=1",
                                "solver.warmup_iters=0", f"output_dir={out}"])
    # 10 images with objects (empty ones are left out of training), batches of 4 grouped by orientation
    iters_per_epoch = int(re.search(r"schedule in epochs: 3 epochs x (\d+) iterations", proc.stdout).group(1))
    assert iters_per_epoch >= 1 and (f"= {3 * iters_per_epoch} iterations, lr steps at [{2 * iters_per_epoch}], "
                                     f"evaluation every {iters_per_epoch} iterations") in proc.stdout
    resolved = load_config(DetConfig, str(out / "config.yaml"))
    assert resolved.solver.max_iter == 3 * iters_per_epoch and list(resolved.solver.steps) == [2 * iters_per_epoch]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [(r["step"], r["val/AP"]) for r in records if "val/AP" in r]
    assert [step for step, _ in evaluated] == [iters_per_epoch * e for e in (1, 2, 3)]
    summary = json.loads((out / "summary.json").read_text())
    best = torch.load(out / "checkpoints" / "best.pth", weights_only=True)
    assert summary["best_AP"] == best["AP"] == max(ap for _, ap in evaluated)
    assert best["iteration"] == max(evaluated, key=lambda e: e[1])[0]
    # the config trains channels-last under bf16: reloaded for evaluation in that layout, the best checkpoint
    # gives exactly the AP it was kept for (the other layout rounds differently under bf16)
    assert resolved.solver.channels_last and resolved.solver.amp == "bf16"
    assert is_channels_last(load_trained_detector(str(out), resolved, "best", "cpu")[0].trunk)
    run("eval_det.py", [out, "checkpoint=best"])
    assert json.loads((out / "eval_best" / "coco_metrics.json").read_text())["AP"] == best["AP"]
    proc = run("train_det.py", ["configs/frcnn_r50_c4_finetune_small.yaml", *data_overrides(tiny_coco), *SLIM,
                                "solver.epochs=3", "solver.step_epochs=[4]", f"output_dir={tmp_path}/bad"], check=False)
    assert proc.returncode == 2 and "solver.step_epochs [4.0]: each must lie between 0 and solver.epochs" in proc.stderr


def test_ladder_of_the_papers_additions_prints_its_table(tiny_coco, tmp_path):
    common = ["configs/frcnn_demo.yaml", "data.synthetic.enabled=false", *data_overrides(tiny_coco), *SLIM,
              "solver.max_iter=6", "checkpoint_period=100", "eval.period=0"]
    run("train_det.py", [*common, f"output_dir={tmp_path}/base"])
    # the context run also evaluates with box refinement at the end of training (eval.* applies there too)
    run("train_det.py", [*common, "model.roi_heads.global_context=true", "eval.box_refinement=true", "seed=1",
                         f"output_dir={tmp_path}/ctx"])
    out = run("eval_det.py", [tmp_path / "base", "--ladder", "--context", tmp_path / "ctx",
                              "--ensemble", tmp_path / "base"]).stdout
    ladder = json.loads((tmp_path / "base/eval_last/ladder.json").read_text())
    names = [r["name"] for r in ladder["rows"]]
    assert names[:3] == ["baseline", "+ box refinement", "+ global context"]
    assert names[3].startswith("+ multi-scale testing [32, 64, 96, 128, 160]")  # the paper's pyramid at base 96
    assert names[4:] == ["+ horizontal flip", "+ ensemble of 2"]
    assert [r["members"] for r in ladder["rows"]] == [1, 1, 1, 1, 1, 2]
    # the baseline rung is the plain detector: the same AP as its own end-of-training evaluation
    summary = json.loads((tmp_path / "base/summary.json").read_text())
    assert ladder["rows"][0]["metrics"]["AP"] == pytest.approx(summary["val"]["AP"], abs=1e-9)
    ctx_summary = json.loads((tmp_path / "ctx/summary.json").read_text())
    assert ladder["rows"][2]["metrics"]["AP"] == pytest.approx(ctx_summary["val"]["AP"], abs=1e-9)
    table = (tmp_path / "base/eval_last/ladder.md").read_text()
    assert table.count("\n") == 8 and "| + ensemble of 2 |" in table and table.splitlines()[0] in out


def test_killed_and_resumed_detector_matches_uninterrupted(tiny_coco, tmp_path):
    """Killed mid-epoch (no cleanup), resumed from the last checkpoint: the same weights as a run never
    stopped. Mid-epoch matters: the resumed run builds its data loader where the straight one did not."""
    common = ["configs/frcnn_demo.yaml", "data.synthetic.enabled=false", *data_overrides(tiny_coco), *SLIM, "eval.period=0",
              "solver.max_iter=7"]
    straight = run("train_det.py", [*common, f"output_dir={tmp_path}/straight"]).stdout
    iters_per_epoch = int(re.search(r"training \S+ on (\d+) images", straight).group(1)) // 4
    assert iters_per_epoch >= 2
    resume_at = iters_per_epoch + 1  # epoch 1, one batch in
    killed = run("train_det.py", [*common, f"output_dir={tmp_path}/resumed", "checkpoint_period=1",
                                  f"debug_stop_at_iter={resume_at + 1}"], check=False)
    assert killed.returncode == 3
    log = run("train_det.py", [*common, f"output_dir={tmp_path}/resumed", "resume=true"]).stdout
    assert f"at iteration {resume_at}" in log
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_sigterm_writes_a_checkpoint_exits_75_and_resume_auto_matches_uninterrupted(tiny_coco, tmp_path):
    """What SLURM preemption sends: SIGTERM mid-run, to every process of the job, the loader's worker too.
    The run checkpoints at the next step boundary and exits with 75 (the worker ignores the signal: it
    used to die of it and take the run down without a checkpoint); the same command with resume=auto
    continues it (and on an empty folder simply starts), ending with the same weights as a run never
    interrupted."""
    import signal
    import time
    common = ["configs/frcnn_demo.yaml", "data.synthetic.enabled=false", *data_overrides(tiny_coco), *SLIM,
              "solver.max_iter=40", "checkpoint_period=1000", "eval.period=0", "log_period=1", "resume=auto",
              "data.workers=1"]
    run("train_det.py", [*common, f"output_dir={tmp_path}/straight"])  # resume=auto, nothing there: a fresh start
    out = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train_det.py"), *common, f"output_dir={out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # a few steps in, then the signal
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # its process group: the trainer and its loader worker
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    stopped_at = torch.load(out / "checkpoints/last.pth", weights_only=True)["iteration"]
    assert 3 <= stopped_at < 40 and f"stopped by SIGTERM at iteration {stopped_at}" in stderr
    log = run("train_det.py", [*common, f"output_dir={out}"]).stdout
    assert f"at iteration {stopped_at}" in log
    a = torch.load(tmp_path / "straight/checkpoints/last.pth", weights_only=True)
    b = torch.load(out / "checkpoints/last.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 40
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=0, rtol=0, msg=key)
    # resume=true insists on a checkpoint: a mistyped output_dir does not silently start over
    proc = run("train_det.py", [*common, "resume=true", f"output_dir={tmp_path}/typo"], check=False)
    assert proc.returncode == 2 and "resume=true but" in proc.stderr and "resume=auto" in proc.stderr


@pytest.fixture(scope="module")
def overfit_run(tiny_coco, tmp_path_factory):
    """A detector trained 300 iterations on the 6 val images (about a minute): its run folder."""
    six = {"train_images": tiny_coco["val_images"], "train_annotations": tiny_coco["val_annotations"]}
    out = tmp_path_factory.mktemp("overfit") / "run"
    run("train_det.py", ["configs/frcnn_demo.yaml", "data.synthetic.enabled=false", *data_overrides({**tiny_coco, **six}),
                         *SLIM, "model.backbone.base_width=16", "data.flip_prob=0", "data.min_size_train=[192]",
                         "data.max_size_train=192", "data.min_size_test=192", "data.max_size_test=192",
                         "solver.max_iter=300", "solver.steps=[250]", "solver.warmup_iters=20", "eval.period=0",
                         "checkpoint_period=1000", "log_period=40", f"output_dir={out}"], env={"OMP_NUM_THREADS": "1"})
    return out


# One worker trains overfit_run for these three tests (`make test` runs `pytest -n ... --dist loadgroup`); spread
# over workers, each would train it again.
SHARES_OVERFIT_RUN = pytest.mark.xdist_group("overfit_run")


@SHARES_OVERFIT_RUN
def test_overfits_a_few_synthetic_images(overfit_run):
    """Learning through the whole tool chain: AP50 >= 0.9 on the 6 images it trained on."""
    ap = json.loads((overfit_run / "summary.json").read_text())["val"]
    assert ap["AP50"] >= 0.9, ap


@SHARES_OVERFIT_RUN
def test_plot_curves_draws_a_detection_run(overfit_run, tmp_path):
    out = tmp_path / "curves.png"
    proc = run("plot_curves.py", [overfit_run, "--out", out])
    assert "wrote" in proc.stdout and cv2.imread(str(out)).shape[1] > 1000  # three panels
    pretrain = tmp_path / "pretrain"
    (pretrain).mkdir()
    (pretrain / "metrics.jsonl").write_text(json.dumps({"step": 1, "val/top1_err": 0.5}) + "\n")
    proc = run("plot_curves.py", [overfit_run, pretrain, "--out", out], check=False)
    assert proc.returncode == 2 and "not both" in proc.stderr


@SHARES_OVERFIT_RUN
def test_exported_onnx_and_program_match_pytorch_and_keep_the_ap(overfit_run, tiny_coco, tmp_path):
    """tools/export.py writes an ONNX file and a torch.export program that take an image of any size and
    return the PyTorch model's detections in that image's pixels; scored with pycocotools, the ONNX file
    keeps the AP that tools/train_det.py measured through the data pipeline."""
    onnx_file, pt2_file = tmp_path / "det.onnx", tmp_path / "det.pt2"
    proc = run("export.py", [overfit_run, "--out", onnx_file])
    assert "largest difference from PyTorch" in proc.stdout and "read back in" in proc.stdout, proc.stdout
    proc = run("export.py", [overfit_run, "--format", "torch_export", "--out", tmp_path / "other.onnx"], check=False)
    assert proc.returncode == 2 and "must end in .pt2" in proc.stderr and not (tmp_path / "other.onnx").exists()
    run("export.py", [overfit_run, "checkpoint=last", "--format", "torch_export", "--out", pt2_file, "--check", "1"])

    cfg = load_config(DetConfig, str(overfit_run / "config.yaml"))
    model, _, class_names = load_trained_detector(str(overfit_run), cfg, "last", "cpu")
    deployable = DeployableDetector.from_config(model, cfg)
    score_thresh = cfg.model.roi_heads.score_thresh
    val = CocoDetection(tiny_coco["val_images"], tiny_coco["val_annotations"])
    paths = [os.path.join(tiny_coco["val_images"], val.coco.imgs[i]["file_name"]) for i in sorted(val.coco.imgs)]
    photos = sorted((COCO128 / "train2017").glob("*.jpg"))[:3] if COCO128.is_dir() else []
    images = [read_image_rgb(str(p)) for p in [*paths, *photos]]
    images.append(np.ascontiguousarray(images[0][:, :70]))  # portrait, another size than any traced
    for name, path in (("onnx", onnx_file), ("torch_export", pt2_file)):
        run_file, metadata = load_exported(str(path))
        assert metadata["class_names"] == class_names
        for image in images:
            chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
            with torch.no_grad():
                expected = deployable(chw)
            got = run_file(chw.numpy())
            assert got[0].shape[1:] == (4,) and got[2].dtype == np.int64
            assert not unmatched_detections(got, expected, score_thresh), (name, image.shape)
            if len(got[0]):
                assert (got[0] >= 0).all() and (got[0][:, 2] <= image.shape[1]).all() and (
                    got[0][:, 3] <= image.shape[0]).all()

    run_onnx, _ = load_exported(str(onnx_file))
    evaluator = COCOEvaluator(val.coco, val.contiguous_to_cat_id, val.class_names)
    for image_id, image in zip(sorted(val.coco.imgs), images):
        boxes, scores, labels = run_onnx(np.ascontiguousarray(image.transpose(2, 0, 1)))
        evaluator.process([{"image_id": image_id}], [{"boxes": boxes, "scores": scores, "labels": labels}])
    exported = evaluator.evaluate()
    trained = json.loads((overfit_run / "summary.json").read_text())["val"]
    assert exported["AP50"] >= 0.9 and abs(exported["AP"] - trained["AP"]) <= 0.05, (exported, trained)

    # The Python API: a list of paths and arrays in one batch, the same detections as one at a time
    predictor = Predictor.from_run(str(overfit_run), score_thresh=0.05)
    together = predictor([paths[0], images[2]])  # images 1 and 3 hold objects
    assert together[0]["file"] == paths[0] and together[1]["file"] is None and predictor([]) == []
    assert together[1]["width"] == images[2].shape[1] and together[1]["height"] == images[2].shape[0]
    for result, alone in zip(together, (predictor(paths[0]), predictor(images[2]))):
        assert result["detections"] and len(result["detections"]) == len(alone["detections"])
        for a, b in zip(result["detections"], alone["detections"]):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 1e-3
            assert np.abs(np.subtract(a["box_xyxy"], b["box_xyxy"])).max() <= 0.2


def test_ddp_two_processes_gather_evaluation(tiny_coco, tmp_path):
    # One training image is unreadable and each rank takes one image per step (one epoch, 6 steps): at that
    # step one rank has no batch, and the ranks must skip it together or the next all-reduce pairs wrongly.
    train_images = tmp_path / "train_images"
    shutil.copytree(tiny_coco["train_images"], train_images)
    sorted(train_images.iterdir())[4].write_bytes(b"truncated")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(ROOT / "tools" / "train_det.py"), "configs/frcnn_demo.yaml", "data.synthetic.enabled=false",
           *data_overrides(tiny_coco), f"data.coco.train_images={train_images}", *SLIM, "solver.batch_size=2",
           "solver.max_iter=6", "eval.period=0", "data.verify_images=none",  # found mid-epoch, not at load
           f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 6 and summary["skipped_corrupt_train"] == 1
    results = json.loads((out / "coco_results.json").read_text())
    val = json.loads(open(tiny_coco["val_annotations"]).read())
    # Each rank saw half of the val images; rank 0 scored the union.
    assert {r["image_id"] for r in results} <= {im["id"] for im in val["images"]}
    assert "2 ranks" in (out / "log.txt").read_text()
    assert json.loads((out / "summary.json").read_text())["val"]["AP"] >= 0


@pytest.mark.skipif(not COCO128.is_dir(), reason="needs ../shared/data/coco128")
def test_coco128_trains_and_evaluates_with_pycocotools(tmp_path):
    images, ann = COCO128 / "train2017", COCO128 / "annotations" / "instances_train2017.json"
    out = tmp_path / "coco128"
    args = ["configs/frcnn_demo.yaml", "data.synthetic.enabled=false", f"data.coco.train_images={images}",
            f"data.coco.train_annotations={ann}", f"data.coco.val_images={images}", f"data.coco.val_annotations={ann}", *SLIM,
            "data.min_size_train=[160]", "data.max_size_train=256", "data.min_size_test=160",
            "data.max_size_test=256", "solver.max_iter=2", "eval.period=0", f"output_dir={out}",
            "model.roi_heads.score_thresh=0.0"]  # 2 iterations: scores are still near 1/81
    run("train_det.py", args)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["class_names"]) == 80
    assert 0 <= summary["val"]["AP"] <= 1 and len(summary["val"]["per_class_AP"]) == 80
    results = json.loads((out / "coco_results.json").read_text())
    coco_ids = {c["id"] for c in json.loads(ann.read_text())["categories"]}
    assert results and {r["category_id"] for r in results} <= coco_ids  # original (gapped) ids
