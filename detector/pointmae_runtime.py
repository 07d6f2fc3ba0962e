"""Point-MAE's inference without torch: the fit's exported ScanPass (detector.pointmae_graph) on onnxruntime.

A saved backbone folder holds the weights (model.safetensors + config.json, for training on from it) and the
exported graph (scan_pass.onnx + scan_pass.json: the backbone hash it was exported from and the graph's
sha256). Loading checks both against the hash the bank was built with. A folder from before the graph existed
is exported on loading (this needs torch, once per process), so old fits keep working. Importing this module
does not import torch; only training, exporting and the legacy path do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from detector.pointmae_config import (
    CONFIG_FILE,
    GRAPH_OUTPUTS,
    WEIGHTS_FILE,
    PointMAEConfig,
    read_backbone_meta,
)
from scans import strict_json

GRAPH_FILE = "scan_pass.onnx"
GRAPH_META = "scan_pass.json"
GRAPH_FORMAT = "scanagent-pointmae-scan-pass"
GRAPH_VERSION = 1
# One thread: a pass is many small ops, and a team of threads stalls whenever another process holds a core
# (docs/design.md); a fixed count also keeps features independent of the machine.
INFERENCE_THREADS = 1


class OnnxBackbone:
    """A Point-MAE backbone as inference runs it. ``weights`` is the torch model when the fit has it in
    memory; ``source`` is the folder it was read from (to train on from it, or to save it again)."""

    def __init__(
        self,
        config: PointMAEConfig,
        identity: str,
        graph: bytes,
        *,
        weights: Any = None,
        source: Path | None = None,
    ) -> None:
        import onnxruntime

        self.config = config
        self.identity = identity
        self.graph = graph
        self.weights = weights
        self.source = source
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = INFERENCE_THREADS
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initialisers are not the user's concern
        self._session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(
        self,
        neighborhood: np.ndarray,
        centers: np.ndarray,
        visible: np.ndarray | None = None,
        masked: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(features (G,D), errors (R,M) or None): the features of every patch and, given the visible (R,V)
        and masked (R,M) patch indices of R rounds, the masked patches' reconstruction error."""
        rounds = visible is not None and masked is not None
        none = np.zeros((1, 1), dtype=np.int64)  # not computed: only the features are asked for
        feeds = {
            "neighborhood": np.ascontiguousarray(neighborhood, dtype=np.float32),
            "centers": np.ascontiguousarray(centers, dtype=np.float32),
            "visible": np.ascontiguousarray(visible, dtype=np.int64) if rounds else none,
            "masked": np.ascontiguousarray(masked, dtype=np.int64) if rounds else none,
        }
        wanted = list(GRAPH_OUTPUTS) if rounds else ["features"]
        outputs = self._session.run(wanted, feeds)
        return outputs[0], outputs[1] if rounds else None

    def torch_model(self) -> Any:
        """The torch PointMAE (for training on from this backbone); read from ``source`` when not in
        memory."""
        if self.weights is None:
            from detector.pointmae import load_backbone

            if self.source is None:
                raise ValueError("this backbone has neither its weights in memory nor a folder to read them")
            self.weights = load_backbone(self.source, expect=self.config)
        return self.weights

    def save(self, directory: Path) -> None:
        """Write the backbone folder: weights and config (saved from memory or copied from ``source``), then
        the graph and its record."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.weights is not None:
            from detector.pointmae import save_backbone

            save_backbone(self.weights, directory)
        elif self.source is not None:
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(self.source / name, directory / name)
        else:
            raise ValueError("this backbone has neither its weights in memory nor a folder to copy them from")
        (directory / GRAPH_FILE).write_bytes(self.graph)
        record = {
            "format": GRAPH_FORMAT,
            "version": GRAPH_VERSION,
            "backbone_hash": self.identity,
            "sha256": hashlib.sha256(self.graph).hexdigest(),
        }
        (directory / GRAPH_META).write_text(
            strict_json.dumps(record, what=str(directory / GRAPH_META), indent=2, sort_keys=True)
        )


def read_backbone(directory: Path, expect: PointMAEConfig, expect_hash: str) -> OnnxBackbone:
    """The backbone in ``directory``, checked: its config is ``expect``, and both the weights' recorded hash
    and the graph's are ``expect_hash`` (the bank's). ValueError names the file and the problem."""
    config, recorded = read_backbone_meta(directory / CONFIG_FILE, expect)
    if recorded != expect_hash:
        raise ValueError(
            f"{directory / CONFIG_FILE}: backbone hash {recorded[:12]} differs from the one the bank was "
            f"built with ({expect_hash[:12]}); the bank belongs to another backbone"
        )
    if not (directory / GRAPH_FILE).is_file():  # a fit from before the graph was stored: export it now
        from detector.pointmae import load_backbone  # checks the weights against the recorded hash

        loaded = onnx_backbone(load_backbone(directory, expect=config))
        loaded.source = directory
        return loaded
    graph = (directory / GRAPH_FILE).read_bytes()
    try:
        record = json.loads((directory / GRAPH_META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory / GRAPH_META}: unreadable ({exc})") from None
    if not isinstance(record, dict) or (record.get("format"), record.get("version")) != (
        GRAPH_FORMAT,
        GRAPH_VERSION,
    ):
        raise ValueError(f"{directory / GRAPH_META}: not a {GRAPH_FORMAT} record of version {GRAPH_VERSION}")
    if record.get("backbone_hash") != expect_hash:
        raise ValueError(f"{directory / GRAPH_FILE}: exported from another backbone than the bank's")
    if record.get("sha256") != hashlib.sha256(graph).hexdigest():
        raise ValueError(f"{directory / GRAPH_FILE}: contents differ from the sha256 in {GRAPH_META}")
    try:
        return OnnxBackbone(config, expect_hash, graph, source=directory)
    except Exception as exc:  # onnxruntime raises its own exception types for a graph it cannot load
        raise ValueError(f"{directory / GRAPH_FILE}: onnxruntime cannot load it ({exc})") from None


def onnx_backbone(model: Any) -> OnnxBackbone:
    """A torch PointMAE as inference runs it: its exported ScanPass, its hash, and the model for saving."""
    from detector.pointmae import backbone_hash
    from detector.pointmae_graph import export_scan_pass

    return OnnxBackbone(model.config, backbone_hash(model), export_scan_pass(model), weights=model)

