"""The one pass a scan needs from Point-MAE, as a graph that runs without torch.

A run reads a scan, registers it and scores its patches; torch is needed only to train the backbone, and
importing it is most of a cold start (`import torch` alone takes 2-3 s on 2 cores). So a fit exports the
backbone's inference - the features of every patch and the masked-reconstruction rounds - to ONNX once, and
every later pass runs it with onnxruntime (detector.pointmae_runtime).

:class:`ScanPass` is that inference, written with the model's own parts (embed, run_encoder, predict_masked),
so training and inference cannot drift apart. Its inputs are one scan's patches, already grouped by
detector.grouping: neighbourhoods (G,K,3) and centres (G,3), and for R reconstruction rounds the indices of
the visible (R,V) and the masked (R,M) patches. Outputs: features (G,D) and the Chamfer-L2 (R,M) of each
masked patch. Asking onnxruntime for the features alone skips the rounds.
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from detector.pointmae import PointMAE, chamfer_l2_per_patch
from detector.pointmae_config import GRAPH_INPUTS, GRAPH_OUTPUTS

OPSET = 18


class ScanPass(nn.Module):
    """Features of all patches (M3DM's concatenated, normed blocks) and the reconstruction error of the
    masked patches of each round."""

    def __init__(self, model: PointMAE):
        super().__init__()
        self.model = model

    def forward(
        self, neighborhood: torch.Tensor, centers: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        tokens = model.embed(neighborhood.unsqueeze(0))[0]  # (G,C)
        layers = tuple(model.config.feature_layers)
        _, kept = model.run_encoder(tokens.unsqueeze(0), centers.unsqueeze(0), layers)
        features = torch.cat(kept, dim=-1)[0]
        rounds, m = masked.shape
        pred = model.predict_masked(tokens[visible], centers[visible], centers[masked])
        target = neighborhood[masked].reshape(rounds * m, -1, 3)
        errors = chamfer_l2_per_patch(pred.reshape(rounds * m, -1, 3), target).reshape(rounds, m)
        return features, errors


def export_scan_pass(model: PointMAE) -> bytes:
    """The ONNX graph (weights inside) of the model's :class:`ScanPass`, with patch and round counts left
    free."""
    g, k = 8, model.config.group_size
    example = (
        torch.zeros(g, k, 3),
        torch.zeros(g, 3),
        torch.arange(2 * 5).reshape(2, 5) % g,
        torch.arange(2 * 3).reshape(2, 3) % g,
    )
    free = {
        "neighborhood": {0: "patches"},
        "centers": {0: "patches"},
        "visible": {0: "rounds", 1: "shown"},
        "masked": {0: "rounds", 1: "hidden"},
        "features": {0: "patches"},
        "errors": {0: "rounds", 1: "hidden"},
    }
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter is deprecated in favour of torch.export, which takes ~25 s a graph
            # here against ~2 s and writes the weights to a second file
            warnings.simplefilter("ignore")
            torch.onnx.export(
                ScanPass(model),
                example,
                buffer,
                input_names=list(GRAPH_INPUTS),
                output_names=list(GRAPH_OUTPUTS),
                dynamic_axes=free,
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    return buffer.getvalue()

