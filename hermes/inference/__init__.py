"""Inference: Gaussian sliding window, the predictor (model dir -> masks on the input grid), API."""

from hermes.inference.api import predict, predict_files
from hermes.inference.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor", "predict", "predict_files"]
