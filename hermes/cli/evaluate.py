"""``hermes evaluate``: score a prediction folder, or a model on a catalog's test cases."""

from __future__ import annotations

import argparse
from pathlib import Path

from hermes.cli.args import FRACTION, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT
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
    folders.add_argument(
        "--annotations", type=Path,
        help="TSV (columns case, annotated) of the labels each reference annotates; a REF/CASE.json sidecar wins",
    )
    folders.add_argument(
        "--absent-means", nargs="+", metavar="[LABEL=]RULE",
        help="background (default) or unannotated: what a label absent from a reference means, for every label "
        "or per label (Esophagus=unannotated); unannotated tasks are not scored on that case",
    )

    model = parser.add_argument_group("(b) predict and score a catalog's cases with a model")
    model.add_argument("-m", "--model", type=Path, help="saved model directory")
    model.add_argument("--catalog", type=Path, help="catalog YAML (default: the model's own catalog)")
    model.add_argument(
        "--split", default=None, choices=["test", "train", "all", "val"],
        help="cases to score (default test; val: the training cases the model held out for validation)",
    )
    model.add_argument("--datasets", nargs="+", metavar="NAME", help="only these catalog datasets")
    model.add_argument("--detect-modality", action="store_true",
                       help="let the modality head choose the modality (default: the dataset's, as in the paper) "
                       "and report its recognition: confusion matrix, Dice with inferred vs given modality "
                       "(each case is predicted twice)")
    model.add_argument("--output", dest="output_type", choices=["multilabel", "binary"], default=None,
                       help="score the multi-label map (default; overlaps: most probable wins) or each task's own mask")
    model.add_argument("--tta", action="store_true",
                       help="mirroring test-time augmentation (only mirrors that are safe; see hermes predict --help)")
    model.add_argument("--device", default="auto", help="cpu, cuda or auto")
    model.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                       help="autocast precision of the sliding window (default auto: bf16 where native)")
    model.add_argument("--overlap", type=FRACTION, default=None, help=f"sliding-window overlap, {FRACTION} (default 0.5)")
    model.add_argument(
        "--drop-channel", metavar="NAME_OR_INDEX", default=None,
        help="predict every case without this channel of its dataset (number from 0, dataset.json channel name "
        "or modality, e.g. T1c): the Dice with that channel missing, through hermes predict's missing-channel path; "
        "needs a model trained with model.channel_fusion: mean and multi-channel datasets (--datasets); "
        "default -o: MODEL/evaluation_SPLIT_without_NAME",
    )
    model.add_argument("--save-predictions", action="store_true", help="also write OUT/predictions/<dataset>/CASE.nii.gz")
    model.add_argument("--max-cases", type=POSITIVE_INT, default=None,
                       help=f"at most this many cases per dataset, {POSITIVE_INT} (quick checks)")
    model.add_argument(
        "--choose-postprocessing", action="store_true",
        help="on the validation cases (--split val, the default here), keep each task's largest connected "
        "component where that raises the task's mean Dice; writes MODEL/postprocessing.json, which "
        "hermes predict applies",
    )
    model.add_argument("--no-postprocess", action="store_true", help="score without the model's postprocessing.json")

    common = parser.add_argument_group("output")
    common.add_argument("-o", "--out", type=Path, help="output folder (default: PRED/evaluation or MODEL/evaluation_SPLIT)")
    common.add_argument("--report", action="store_true", help="also write a self-contained report.html")
    common.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier evaluation in OUT (and, with --choose-postprocessing, "
                        "MODEL/postprocessing.json)")
    common.add_argument("--nsd-tolerance", type=POSITIVE_FLOAT, default=None,
                        help=f"NSD tolerance in mm, {POSITIVE_FLOAT} (default {defaults.nsd_tolerance_mm})")
    common.add_argument("--workers", type=POSITIVE_INT, default=None,
                        help=f"scoring processes, {POSITIVE_INT} (default {defaults.workers})")
    common.add_argument("--bootstrap", type=NON_NEGATIVE_INT, default=None,
                        help=f"bootstrap resamples for the CIs, {NON_NEGATIVE_INT} (default {defaults.bootstrap_samples})")
    common.add_argument(
        "--ignore-undeclared", action="store_true",
        help="score label values that the label maps do not declare as background (default: refuse them)",
    )
    common.add_argument("--quiet", action="store_true", help="no progress bars")


def _absent_means(items: list[str] | None) -> str | dict[str, str] | None:
    """``["unannotated"]`` -> "unannotated"; ``["Esophagus=unannotated", ...]`` -> a mapping."""
    from hermes.errors import ConfigError

    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    out: dict[str, str] = {}
    for item in items:
        name, sep, rule = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--absent-means: {item!r}: give one RULE, or LABEL=RULE items")
        out[name] = rule
    return out


def run(args: argparse.Namespace) -> int:
    from hermes.config import InferenceConfig
    from hermes.errors import ConfigError
    from hermes.evaluation.evaluate import (
        check_results_absent,
        evaluate_folders,
        evaluate_model,
        write_outputs,
    )

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
        out = args.out or args.pred / "evaluation"
        check_results_absent(out, args.overwrite)
        result = evaluate_folders(
            args.pred, args.ref, labels=args.labels, pred_labels=pred_labels, dataset=args.dataset,
            images_dir=args.images, config=config, overlays=args.report, progress=not args.quiet,
            annotations=args.annotations, absent_means=_absent_means(args.absent_means),
            case_label_maps=args.pred_labels is None, ignore_undeclared=args.ignore_undeclared,
        )
        title = f"Evaluation of {args.pred}"
    else:
        from hermes.bundle import postprocessing_path
        from hermes.inference.postprocess import Chooser, save_postprocessing

        split = args.split or ("val" if args.choose_postprocessing else "test")
        if args.choose_postprocessing and split != "val":
            raise ConfigError(
                f"--choose-postprocessing decides on the validation cases (--split val); deciding on the {split} "
                "split would tune the model on the data it is scored on"
            )
        if args.choose_postprocessing and args.drop_channel is not None:
            raise ConfigError("--choose-postprocessing decides on complete inputs; leave out --drop-channel")
        if args.choose_postprocessing and postprocessing_path(args.model).exists() and not args.overwrite:
            raise ConfigError(f"{postprocessing_path(args.model)} exists; pass --overwrite to decide it again")
        chosen = {"output": args.output_type, "precision": args.precision, "overlap": args.overlap}
        # the decision compares raw masks with their largest component: no stored step applied
        postprocess = not (args.no_postprocess or args.choose_postprocessing)
        inference = InferenceConfig(
            mirror_tta=args.tta, postprocess=postprocess, **{k: v for k, v in chosen.items() if v is not None}
        )
        chooser = Chooser() if args.choose_postprocessing else None
        without = f"_without_{_safe(args.drop_channel)}" if args.drop_channel is not None else ""
        out = args.out or args.model / f"evaluation_{split}{without}"
        check_results_absent(out, args.overwrite)
        result = evaluate_model(
            args.model, args.catalog, split=split, datasets=args.datasets, inference=inference, config=config,
            device=None if args.device == "auto" else args.device, detect_modality=args.detect_modality,
            overlays=args.report, save_predictions=out / "predictions" if args.save_predictions else None,
            progress=not args.quiet, max_cases=args.max_cases, ignore_undeclared=args.ignore_undeclared,
            inspect=chooser, drop_channel=args.drop_channel,
        )
        missing = f", without channel {args.drop_channel}" if args.drop_channel is not None else ""
        title = f"Evaluation of {args.model} ({split} split{missing})"
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


def _safe(name: str) -> str:
    """A channel name as part of a folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
