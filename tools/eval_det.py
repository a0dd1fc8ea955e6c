#!/usr/bin/env python
"""COCO mAP of a trained detector: AP, AP50, AP75, APs/m/l, AR and per-class AP (pycocotools).

    python tools/eval_det.py runs/frcnn_demo                       # the run's config and last checkpoint
    python tools/eval_det.py runs/frcnn_r101_coco checkpoint=best data.coco.val_annotations=...
    python tools/eval_det.py runs/A eval.box_refinement=true eval.flip=true eval.test_scales=[200,400,600,800,1000]
    python tools/eval_det.py runs/A --ensemble runs/B runs/C         # the paper's ensemble of detectors
    python tools/eval_det.py runs/A --ladder --context runs/A_ctx --ensemble runs/B
    torchrun --nproc_per_node=8 tools/eval_det.py runs/frcnn_r101_coco

Writes coco_results.json, coco_metrics.json and per_class_ap.txt into <run>/eval_<checkpoint>/.

``--ladder`` evaluates the paper's additions one on top of the other (its Table 9) and prints a table:
baseline -> +box refinement -> +global context (the ``--context`` run: a detector trained with
``model.roi_heads.global_context=true``) -> +multi-scale testing (``eval.test_scales``, or the paper's
{200..1000} rescaled to the run's test scale) -> +flip -> +ensemble (with the ``--ensemble`` runs).
It writes ladder.md and ladder.json into <run>/eval_<checkpoint>/.
"""
import argparse
import json
from dataclasses import replace
import os
import sys
import time

import _bootstrap  # noqa: F401
import torch

from backbones.engine.cli import exit_tool, split_checkpoint
from backbones.engine.config import load_config
from backbones.engine.errors import CheckpointError, ConfigError, ResdetError
from backbones.engine.dist import cleanup, init_distributed, is_main_process
from backbones.engine.precision import AMP_DTYPES
from backbones.engine.run import write_json_atomic
from detection.config import DetConfig
from detection.data.build import build_datasets, build_evaluators, data_source, prepare_data_paths, val_loader
from detection.evaluation.loop import evaluate
from detection.evaluation.tables import format_metrics_table
from detection.evaluation.report import write_report
from detection.modeling.test_time import for_testing, options_from_config, paper_test_scales
from detection.predictor import load_trained_detector


def load_member(run_dir: str, overrides: list[str], checkpoint: str, device, val_set):
    """A run's detector, checked against the validation set's classes."""
    cfg = load_config(DetConfig, os.path.join(run_dir, "config.yaml"), overrides)
    model, path, class_names = load_trained_detector(run_dir, cfg, checkpoint, device, cfg.eval.compile)
    if class_names != val_set.class_names:
        raise CheckpointError(f"{path} was trained on classes {class_names[:5]}..., but "
                         f"{data_source(cfg, 'val')} has {val_set.class_names[:5]}...")
    return model, path


def ladder_rows(cfg, base, context, ensemble):
    """(name, members, test-time options) for each rung, each adding one thing to the one above."""
    # the run's refinement NMS / voting settings, with every switch off: the rungs turn them on one by one
    base_options = replace(options_from_config(cfg.eval), box_refinement=False, flip=False, scales=())
    scales = tuple(int(s) for s in cfg.eval.test_scales) or paper_test_scales(cfg.data.min_size_test)
    main = context if context is not None else base
    steps = [("baseline", [base], {}), ("+ box refinement", [base], {"box_refinement": True})]
    if context is not None:
        steps.append(("+ global context", [context], {"box_refinement": True}))
    steps.append((f"+ multi-scale testing {list(scales)}", [main], {"box_refinement": True, "scales": scales}))
    steps.append(("+ horizontal flip", [main], {"box_refinement": True, "scales": scales, "flip": True}))
    if ensemble:
        steps.append((f"+ ensemble of {1 + len(ensemble)}", [main, *ensemble],
                      {"box_refinement": True, "scales": scales, "flip": True}))
    return [(name, members, replace(base_options, **changes)) for name, members, changes in steps]


def format_ladder(results: list[dict]) -> str:
    """Markdown table, percent; "n/a" where the metric does not exist (VOC data has no APs/APm/APl)."""
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def pct(m: dict, key: str) -> str:
        v = m.get(key, -1)
        return f"{100 * v:.1f}" if v >= 0 else "n/a"

    lines = ["| test-time setting | " + " | ".join(keys) + " | s/img |", "|---" * (len(keys) + 2) + "|"]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(pct(r["metrics"], k) for k in keys)
                     + f" | {r['sec_per_image']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder written by tools/train_det.py")
    parser.add_argument("overrides", nargs="*", help="checkpoint=last|best|PATH and config key=value overrides")
    parser.add_argument("--ensemble", nargs="+", default=[], metavar="RUN",
                        help="more run folders: their proposals join the union and every head scores them")
    parser.add_argument("--ladder", action="store_true", help="evaluate the appendix-B additions step by step")
    parser.add_argument("--context", metavar="RUN", help="with --ladder: a run trained with global context")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags
    checkpoint, overrides = split_checkpoint(args.overrides)
    if args.context and not args.ladder:
        parser.error("--context is a rung of --ladder; evaluate that run on its own otherwise")
    try:
        cfg = load_config(DetConfig, os.path.join(args.run, "config.yaml"), overrides)
        if cfg.eval.cuda_graphs and (args.ladder or args.ensemble):
            raise ConfigError("eval.cuda_graphs replays the plain detector: --ladder and --ensemble run eagerly")
        _, _, device = init_distributed()
        if cfg.device == "cpu":
            device = torch.device("cpu")
        prepare_data_paths(cfg)
        _, val_set = build_datasets(cfg, train=False)
        model, ckpt_path = load_member(args.run, overrides, checkpoint, device, val_set)
        ensemble = [load_member(r, overrides, checkpoint, device, val_set)[0] for r in args.ensemble]
        context = load_member(args.context, overrides, checkpoint, device, val_set)[0] if args.context else None
        out_dir = os.path.join(args.run, f"eval_{os.path.splitext(os.path.basename(ckpt_path))[0]}")
        if is_main_process():
            os.makedirs(out_dir, exist_ok=True)
        loader = val_loader(cfg, val_set)
        amp = AMP_DTYPES[cfg.solver.amp]
        d = cfg.data

        def run_eval(members, options, output_dir):
            start = time.time()
            tester = for_testing(members, options, d.min_size_test, d.size_divisibility,
                                 cuda_graphs=cfg.eval.cuda_graphs)
            evaluators = build_evaluators(cfg, val_set, output_dir if is_main_process() else None)
            metrics = evaluate(tester, loader, evaluators, device, amp)
            return metrics, (time.time() - start) / max(len(val_set), 1)

        if args.ladder:
            results = []
            for name, members, options in ladder_rows(cfg, model, context, ensemble):
                print(f"\n=== {name}", flush=True)
                metrics, sec = run_eval(members, options, None)
                results.append({"name": name, "options": dict(options.__dict__, scales=list(options.scales)),
                                "members": len(members), "metrics": metrics, "sec_per_image": sec})
        else:
            metrics, _ = run_eval([model, *ensemble], options_from_config(cfg.eval), out_dir)
    except ResdetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if not is_main_process():
        return 0
    if args.ladder:
        table = format_ladder(results)
        print("\n" + table)
        with open(os.path.join(out_dir, "ladder.md"), "w") as f:
            f.write(table + "\n")
        write_json_atomic(os.path.join(out_dir, "ladder.json"), {
            "checkpoint": ckpt_path, "context_run": args.context, "ensemble_runs": args.ensemble, "rows": results})
        print(f"results in {out_dir}")
        return 0
    print(format_metrics_table(metrics))
    results_file = os.path.join(out_dir, "coco_results.json")
    if cfg.data.format == "coco" and os.path.isfile(results_file):  # the page a person looks at
        with open(results_file) as f:
            page = write_report(out_dir, val_set, json.load(f), metrics)
        print(f"report: {page} (PR curves, per-class AP, best and worst val images)")
    write_json_atomic(os.path.join(out_dir, "summary.json"), {
        "checkpoint": ckpt_path, "ensemble_runs": args.ensemble, "val": metrics,
        "test_time": dict(options_from_config(cfg.eval).__dict__)})
    print(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    exit_tool(main())
