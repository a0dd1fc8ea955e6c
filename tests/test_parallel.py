"""Work shared out over the ranks of a torchrun job (backbones.engine.parallel): every rank ends with what one
process finds, having done its share of it. The trainers' own torchrun runs are in test_det_train.py,
test_loc_train.py and test_pretrain.py."""
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from backbones.engine.parallel import map_over_ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("threads", [1, 3])
def test_map_over_ranks_in_one_process_keeps_the_order_and_raises_what_fn_raises(threads):
    items = list(range(1000))
    all_started = threading.Barrier(threads)  # broken (an error) unless `threads` threads run chunks at once
    local = threading.local()

    def square(i):
        if not getattr(local, "started", False):
            local.started = True
            all_started.wait(timeout=30)
        return i * i

    assert map_over_ranks(square, items, threads=threads) == [i * i for i in items]
    assert map_over_ranks(square, [], threads=threads) == []
    with pytest.raises(ZeroDivisionError):
        map_over_ranks(lambda i: 1 // (i - 500), items, threads=threads)


# One process or one rank of two: loads a VOC set and a localization ImageFolder, both with broken files,
# not strict, and writes what it kept, the problem reports, and how many files it opened itself.
WORKER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    data = sys.argv[2]
    import detection.data.problems as problems_module
    import detection.data.voc as voc
    import detection.localization.data as loc
    from backbones.engine.config import load_config
    from backbones.engine.dist import cleanup, get_rank, get_world_size, init_distributed
    from backbones.engine.parallel import map_over_ranks
    from detection.localization.config import LocConfig

    calls = {"image_size": 0, "parse_xml": 0, "make_record": 0}
    def counted(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    problems_module.image_size = counted("image_size", problems_module.image_size)
    voc._parse_xml = counted("parse_xml", voc._parse_xml)
    loc.make_record = counted("make_record", loc.make_record)

    init_distributed()
    out = {"rank": get_rank(), "world": get_world_size()}
    ds = voc.VocDetection([f"{data}/voc/VOC2007:train"], "voc", strict=False)
    out["voc"] = {"images": [im["file_name"] for im in ds.coco.dataset["images"]],
                  "boxes": len(ds.coco.dataset["annotations"]), "report": ds.problems.report()}
    cfg = load_config(LocConfig, None, ["data.layout=imagefolder", f"data.train_images={data}/loc/images",
                                        f"data.train_annotations={data}/loc/annotations", "data.val_fraction=0.3",
                                        "data.strict_train=false", "data.strict_val=false"])
    train, val, stats = loc.load_imagefolder(cfg.data, ["n01", "n02"])
    out["loc"] = {"train": [(r.path, r.label, r.boxes.tolist()) for r in train], "val": [r.path for r in val],
                  "problems": stats["problems"]}
    try:  # item 3 fails, on rank 1 of 2
        map_over_ranks(lambda i: 1 // (i - 3), list(range(6)))
    except Exception as exc:
        out["raised"] = f"{type(exc).__name__}: {exc}"
    out["calls"] = calls
    with open(os.path.join(data, f"out_{get_world_size()}_{get_rank()}.json"), "w") as f:
        json.dump(out, f)
    cleanup()
""")


def _broken_datasets(root: Path) -> None:
    import cv2
    import numpy as np

    from detection.data.synthetic import make_synthetic_voc
    from detection.localization.synthetic import annotation_xml

    voc = Path(make_synthetic_voc(root / "voc", num_train=14, num_val=2)["root"]) / "VOC2007"
    names = (voc / "ImageSets" / "Main" / "train.txt").read_text().split()
    (voc / "Annotations" / f"{names[1]}.xml").write_text("<annotation>")  # not XML
    (voc / "JPEGImages" / f"{names[4]}.jpg").write_bytes(b"not a jpeg")  # unreadable
    (voc / "JPEGImages" / f"{names[7]}.jpg").unlink()  # missing
    for c in ("n01", "n02"):
        (root / "loc" / "images" / c).mkdir(parents=True)
        (root / "loc" / "annotations").mkdir(parents=True, exist_ok=True)
        for i in range(6):
            cv2.imwrite(str(root / "loc" / "images" / c / f"{c}_{i}.JPEG"), np.full((64, 64, 3), 100, np.uint8))
            box = [4, 4, 80 if (c, i) == ("n01", 2) else 40, 40]  # n01_2: outside its image
            (root / "loc" / "annotations" / f"{c}_{i}.xml").write_text(
                annotation_xml(c, f"{c}_{i}", 64, 64, [(c, box)]))
    (root / "loc" / "images" / "n02" / "n02_5.JPEG").write_bytes(b"not a jpeg")
    (root / "loc" / "annotations" / "n01_4.xml").unlink()  # skipped and counted (train) or a problem (val)


def test_two_ranks_each_read_half_and_both_end_with_what_one_process_finds(tmp_path):
    _broken_datasets(tmp_path)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(worker), str(ROOT), str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
                          str(worker), str(ROOT), str(tmp_path)], capture_output=True, text=True, env=env, timeout=180)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    single = json.loads((tmp_path / "out_1_0.json").read_text())
    ranks = [json.loads((tmp_path / f"out_2_{r}.json").read_text()) for r in (0, 1)]

    # what one process found: the three broken VOC files and the four broken localization records
    report = single["voc"]["report"]
    for text in ("1 x bad XML annotation file", "1 x unreadable image", "is missing"):
        assert text in report, report
    assert len(single["voc"]["images"]) == 14 - 3 and single["loc"]["problems"]
    assert sum(single["loc"]["problems"]["train"].values()) + sum(single["loc"]["problems"]["val"].values()) >= 2
    assert single["raised"].startswith("ZeroDivisionError")
    for rank in ranks:
        assert rank["world"] == 2
        assert rank["voc"] == single["voc"] and rank["loc"] == single["loc"]
    # each file was opened by one rank: the two shares add up to the single process's work, neither is all of it
    for key, n in single["calls"].items():
        assert n > 0 and ranks[0]["calls"][key] + ranks[1]["calls"][key] == n, (key, single["calls"], ranks)
        assert 0 < ranks[0]["calls"][key] < n and 0 < ranks[1]["calls"][key] < n
    # the failure on rank 1 reached rank 0 too, named, instead of leaving it waiting
    assert ranks[1]["raised"].startswith("ZeroDivisionError")
    assert ranks[0]["raised"].startswith("RuntimeError") and "rank 1 failed" in ranks[0]["raised"]
