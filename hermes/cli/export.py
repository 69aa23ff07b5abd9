"""``hermes export``: write a saved model as an ONNX graph for onnxruntime (``predict --engine``)."""

from __future__ import annotations

import argparse
import sys

from hermes.cli.args import POSITIVE_FLOAT, POSITIVE_INT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="saved model directory (hermes train output)")
    parser.add_argument(
        "-o", "--out", dest="output_path", metavar="OUTPUT", required=True,
        help="export folder (model.onnx, the model's spec, hermes_onnx.json); MODEL/onnx lets "
        "`hermes predict --engine onnxruntime -m MODEL` find it",
    )
    parser.add_argument("--opset", type=POSITIVE_INT, default=None, help=f"ONNX opset, {POSITIVE_INT} (default: the exporter's)")
    parser.add_argument(
        "--tolerance", type=POSITIVE_FLOAT, default=1e-3,
        help=f"largest |logit difference| to PyTorch accepted by the verification, {POSITIVE_FLOAT} (default 1e-3)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")


def run(args: argparse.Namespace) -> int:
    from hermes.inference.onnx_engine import describe_export, export_onnx

    folder = export_onnx(args.model, args.output_path, opset=args.opset, overwrite=args.overwrite,
                         tolerance=args.tolerance)
    print(describe_export(folder), file=sys.stderr)
    return 0
