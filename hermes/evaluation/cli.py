"""``hermes evaluate``: score a prediction folder, or a model on a catalog's test cases."""

from __future__ import annotations

import argparse
from pathlib import Path

from hermes.config import EvaluationConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EvaluationConfig()
    folders = parser.add_argument_group("(a) score a folder of predictions (nnU-Net layout: CASE.nii.gz)")
    folders.add_argument("--pred", type=Path, help="folder of multi-label predictions")
    folders.add_argument("--ref", type=Path, help="folder of reference label maps (e.g. labelsTs)")
    folders.add_argument(
        "--labels", type=Path,
        help="dataset.json with the reference label names (default: REF/../dataset.json, else label values)",
    )
    folders.add_argument(
        "--pred-labels", type=Path,
        help="label names -> values of the predictions when they differ from the reference's, matched by name "
        "(default: PRED/dataset.json if present, else the reference's values)",
    )
    folders.add_argument("--images", type=Path, help="images for the report overlays (default: REF's imagesXx sibling)")
    folders.add_argument("--dataset", help="dataset name in the tables (default: the reference's dataset folder)")

    model = parser.add_argument_group("(b) predict and score a catalog's cases with a model")
    model.add_argument("-m", "--model", type=Path, help="saved model directory")
    model.add_argument("--catalog", type=Path, help="catalog YAML (default: the model's own catalog)")
    model.add_argument(
        "--split", default=None, choices=["test", "train", "all", "val"],
        help="cases to score (default test; val: the training cases the model held out for validation)",
    )
    model.add_argument("--datasets", nargs="+", metavar="NAME", help="only these catalog datasets")
    model.add_argument("--detect-modality", action="store_true",
                       help="let the modality head choose the modality (default: the dataset's, as in the paper)")
    model.add_argument("--output", dest="output_type", choices=["multilabel", "binary"], default=None,
                       help="score the multi-label map (default; overlaps: most probable wins) or each task's own mask")
    model.add_argument("--tta", action="store_true",
                       help="mirroring test-time augmentation (only mirrors that are safe; see hermes predict --help)")
    model.add_argument("--device", default="auto", help="cpu, cuda or auto")
    model.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                       help="autocast precision of the sliding window (default auto: bf16 where native)")
    model.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default 0.5)")
    model.add_argument("--save-predictions", action="store_true", help="also write OUT/predictions/<dataset>/CASE.nii.gz")
    model.add_argument("--max-cases", type=int, default=None, help="at most this many cases per dataset (quick checks)")
    model.add_argument(
        "--choose-postprocessing", action="store_true",
        help="on the validation cases (--split val, the default here), keep each task's largest connected "
        "component where that raises the task's mean Dice; writes MODEL/postprocessing.json, which "
        "hermes predict applies",
    )
    model.add_argument("--no-postprocess", action="store_true", help="score without the model's postprocessing.json")
    model.add_argument("--overwrite", action="store_true", help="replace an existing MODEL/postprocessing.json")

    common = parser.add_argument_group("output")
    common.add_argument("-o", "--out", type=Path, help="output folder (default: PRED/evaluation or MODEL/evaluation_SPLIT)")
    common.add_argument("--report", action="store_true", help="also write a self-contained report.html")
    common.add_argument("--nsd-tolerance", type=float, default=None,
                        help=f"NSD tolerance in mm (default {defaults.nsd_tolerance_mm})")
    common.add_argument("--workers", type=int, default=None, help=f"scoring processes (default {defaults.workers})")
    common.add_argument("--bootstrap", type=int, default=None,
                        help=f"bootstrap resamples for the CIs (default {defaults.bootstrap_samples})")
    common.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from hermes.config import InferenceConfig
    from hermes.errors import ConfigError
    from hermes.evaluation.evaluate import evaluate_folders, evaluate_model, write_outputs

    overrides = {
        k: v
        for k, v in {
            "nsd_tolerance_mm": args.nsd_tolerance,
            "workers": args.workers,
            "bootstrap_samples": args.bootstrap,
        }.items()
        if v is not None
    }
    config = EvaluationConfig.model_validate(overrides)
    folder_mode = args.pred is not None or args.ref is not None
    if folder_mode == (args.model is not None):
        raise ConfigError("give either --pred and --ref (score a folder) or -m MODEL (predict and score)")
    if folder_mode:
        if args.pred is None or args.ref is None:
            raise ConfigError("folder mode needs both --pred and --ref")
        pred_labels = args.pred_labels
        if pred_labels is None and (args.pred / "dataset.json").is_file():
            pred_labels = args.pred / "dataset.json"
        result = evaluate_folders(
            args.pred, args.ref, labels=args.labels, pred_labels=pred_labels, dataset=args.dataset,
            images_dir=args.images, config=config, overlays=args.report, progress=not args.quiet,
        )
        out = args.out or args.pred / "evaluation"
        title = f"Evaluation of {args.pred}"
    else:
        from hermes.inference.postprocess import POSTPROCESSING_FILE, Chooser, save_postprocessing

        split = args.split or ("val" if args.choose_postprocessing else "test")
        if args.choose_postprocessing and split != "val":
            raise ConfigError(
                f"--choose-postprocessing decides on the validation cases (--split val); deciding on the {split} "
                "split would tune the model on the data it is scored on"
            )
        if args.choose_postprocessing and (args.model / POSTPROCESSING_FILE).exists() and not args.overwrite:
            raise ConfigError(f"{args.model / POSTPROCESSING_FILE} exists; pass --overwrite to decide it again")
        chosen = {"output": args.output_type, "precision": args.precision, "overlap": args.overlap}
        # the decision compares raw masks with their largest component: no stored step applied
        postprocess = not (args.no_postprocess or args.choose_postprocessing)
        inference = InferenceConfig(
            mirror_tta=args.tta, postprocess=postprocess, **{k: v for k, v in chosen.items() if v is not None}
        )
        chooser = Chooser() if args.choose_postprocessing else None
        out = args.out or args.model / f"evaluation_{split}"
        result = evaluate_model(
            args.model, args.catalog, split=split, datasets=args.datasets, inference=inference, config=config,
            device=None if args.device == "auto" else args.device, detect_modality=args.detect_modality,
            overlays=args.report, save_predictions=out / "predictions" if args.save_predictions else None,
            progress=not args.quiet, max_cases=args.max_cases, inspect=chooser,
        )
        title = f"Evaluation of {args.model} ({split} split)"
        if chooser is not None:
            source = {"split": split, "datasets": sorted({row["dataset"] for row in result.rows}),
                      "output": inference.output, "tta": inference.mirror_tta}
            plan = chooser.decide(source)
            path = save_postprocessing(args.model, plan, overwrite=args.overwrite)
            for task, decision in plan.decisions.items():
                print(f"{task}: Dice {_fmt(decision['dice_without'])} -> {_fmt(decision['dice_with'])} with the largest "
                      f"component ({decision['cases']} cases): {'keep' if decision['keep'] else 'not kept'}")
            print(f"postprocessing: largest component for {len(plan.largest_component)} task(s); wrote {path}")
    write_outputs(result, out, report=args.report, title=title, report_cases=config.report_cases)
    print(result.table())
    written = "metrics.csv, summary.json" + (", report.html" if args.report else "")
    print(f"\nwrote {written} to {out}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
