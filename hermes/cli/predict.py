"""``hermes predict``: segment an image, a DICOM series or a folder of images with a saved model."""

from __future__ import annotations

import argparse

from hermes.cli.args import FRACTION, POSITIVE_FLOAT, POSITIVE_INT, UNIT_OPEN
from hermes.config import InferenceConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = InferenceConfig()
    parser.add_argument("-m", "--model", required=True, help="saved model directory (hermes train output)")
    parser.add_argument(
        "-i", "--input", required=True,
        help="image file (.nii/.nii.gz/.nrrd/.mha), DICOM series folder, or folder of images (CASE_0000.nii.gz ...; "
        "one file per channel, CASE_0000, CASE_0001, ...: a channel number left out is a missing channel, "
        "predicted without by a model trained with model.channel_fusion: mean)",
    )
    parser.add_argument(
        "-o", "--out", dest="output_path", metavar="OUTPUT", required=True,
        help="multi-label: output file (e.g. seg.nii.gz) or folder; binary: folder (one mask per task)",
    )
    parser.add_argument(
        "--tasks", nargs="+", metavar="NAME",
        help="tasks to segment ('Dataset/label' or an unambiguous short name); default: every task trained "
        "for the image's modality",
    )
    parser.add_argument("--modality", help="image modality (e.g. CT, T1); default: predicted by the model")
    parser.add_argument(
        "--dataset",
        help="prompt as this training dataset (its tasks, modality and preprocessing: the paper's oracle "
        "prompt); default: tasks grouped by the datasets that trained them",
    )
    parser.add_argument(
        "--output", dest="output_type", choices=["multilabel", "binary"], default=None,
        help=f"one label map + JSON of label names (overlaps: the most probable task wins), or one binary "
        f"mask per task (default: {defaults.output})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--continue", dest="resume", action="store_true",
        help="resume an interrupted run: skip cases whose outputs are complete, predict the others",
    )
    parser.add_argument(
        "--tta", action="store_true",
        help="mirroring test-time augmentation over the axes training mirrored, and left-right when the catalog "
        "declares the datasets' mirror_pairs (swapped); refused when no mirror is safe",
    )
    parser.add_argument(
        "--no-postprocess", action="store_true",
        help="do not apply the model's postprocessing.json (per-task largest component)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--overlap", type=FRACTION, default=None, help=f"window overlap, {FRACTION} (default {defaults.overlap})"
    )
    parser.add_argument(
        "--window-batch-size", type=POSITIVE_INT, default=None,
        help=f"windows per forward pass, {POSITIVE_INT} (default {defaults.window_batch_size})",
    )
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
        help=f"autocast precision (default {defaults.precision})",
    )
    parser.add_argument(
        "--threshold", type=UNIT_OPEN, default=None,
        help=f"sigmoid threshold, {UNIT_OPEN} (default {defaults.threshold})",
    )
    parser.add_argument(
        "--max-memory", type=POSITIVE_FLOAT, default=None, metavar="GB",
        help=f"memory budget of the process in GiB, {POSITIVE_FLOAT}: many tasks are predicted in chunks that fit it "
        f"(same masks, the backbone runs once per chunk; default {defaults.max_memory_gb:g})",
    )
    parser.add_argument(
        "--allow-irregular", action="store_true",
        help="accept a DICOM series with uneven slice gaps (e.g. a missing slice) by resampling it onto a regular "
        "grid from its true slice positions (default: refuse it)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-case messages")
    parser.add_argument(
        "--format", dest="output_format", choices=["nifti", "dicom-seg", "rtstruct"], default="nifti",
        help="nifti (default), dicom-seg (one segment per task) or rtstruct (one ROI per task); the DICOM "
        "formats need a DICOM series input or --reference-series; -o is a .dcm file or a folder",
    )
    parser.add_argument(
        "--reference-series", metavar="DICOM_DIR",
        help="the DICOM series a NIfTI input was converted from (same voxels), referenced by --format dicom-seg/rtstruct",
    )
    parser.add_argument(
        "--engine", choices=["torch", "onnxruntime"], default="torch",
        help="torch (default) or onnxruntime (-m is a `hermes export` folder, or a model folder holding one)",
    )


def run(args: argparse.Namespace) -> int:
    from hermes.inference.api import predict_files

    config = InferenceConfig.model_validate(
        {
            k: v
            for k, v in {
                "overlap": args.overlap,
                "window_batch_size": args.window_batch_size,
                "precision": args.precision,
                "threshold": args.threshold,
                "max_memory_gb": args.max_memory,
                "allow_irregular_dicom": args.allow_irregular or None,
                "postprocess": False if args.no_postprocess else None,
            }.items()
            if v is not None
        }
    )
    predict_files(
        args.model,
        args.input,
        args.output_path,
        tasks=args.tasks,
        modality=args.modality,
        dataset=args.dataset,
        output_mode=args.output_type,
        overwrite=args.overwrite,
        resume=args.resume,
        device=None if args.device == "auto" else args.device,
        tta=True if args.tta else None,
        config=config,
        progress=not args.quiet,
        verbose=not args.quiet,
        output_format=args.output_format,
        reference_series=args.reference_series,
        engine=args.engine,
    )
    return 0
