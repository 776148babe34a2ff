"""A trained meta-model as an MLflow Model: ``mlflow.pyfunc.load_model("runs:/<id>/meta_model")``.

The model directory holds the meta run's checkpoint and config and the rows that fix its
architecture (family, input encoder, task heads), so loading needs MLflow and the installed
dynamo_dist package, not the population root. ``predict`` takes a DataFrame, one row per
example:

    model_id  str           which base model to emulate (its theta_n, V_n and task head)
    x         list[float]   the example's input, flattened row-major (token inputs: token ids)
    theta     list[float]   optional: a point of theta-space to use instead of the model's own
                            (averaging, extrapolation; V_n and the head stay the model's)

and returns one row per example: ``model_id``, ``prediction`` (argmax of the final output),
``logits`` (the final output, list[float]) and ``hidden`` (V_n of the meta-model's last state:
the base model's final hidden state as the meta-model emulates it, flattened).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from .. import family as families
from ..zoo import ArchSpec
from . import checkpoint, outputs

MODEL_DIR = "meta_model"  # artifact path of the model in a meta run
ROWS_FILE = "models.json"
_ROW_KEYS = ("model_id", "group", "task", "arch", "hidden_size", "num_classes", "input_kind", "input_shape",
             "vocab_size")


class DynamoMetaModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of a meta run (module docstring)."""

    def load_context(self, context) -> None:
        self.load(Path(context.artifacts["meta_run"]))

    def load(self, directory: Path) -> "DynamoMetaModel":
        cfg = outputs.run_config(directory)  # fields a run predates at what trained it
        rows = json.loads((directory / ROWS_FILE).read_text())
        meta_state, per_model = checkpoint.read_model_state(outputs.run_checkpoint(directory))
        ids = sorted(per_model)
        by_id = {r["model_id"]: r for r in rows}
        self.meta, self.emb = outputs.build_loaded([by_id[m] for m in ids], cfg, meta_state, per_model)
        self.rows = {m: by_id[m] for m in ids}
        self.spec = ArchSpec.from_row(self.rows[ids[0]])
        return self

    # The DataFrame hint is what MLflow asks of a PythonModel subclass (without one it warns at class
    # definition, under its own warning filter); it is one of the hints MLflow validates nothing against,
    # so the signature stays the one save() infers from the input example, ``theta`` optional.
    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        unknown = sorted(set(df["model_id"]) - set(self.rows))
        if unknown:
            raise ValueError(f"model_id {unknown[:5]} not in this meta-model (it embeds {len(self.rows)} models)")
        shape = tuple(self.spec.input_shape)
        dtype = torch.long if self.spec.input_kind == "tokens" else torch.float32
        out = [None] * len(df)
        for mid, idx in df.groupby("model_id").indices.items():
            row = self.emb.index[mid]
            x = torch.as_tensor(np.stack([np.asarray(v, dtype=np.float64) for v in df["x"].iloc[idx]])
                                .reshape((len(idx),) + shape)).to(dtype)
            theta = self.emb.theta[row].detach()[None].expand(len(idx), -1).clone()
            if "theta" in df.columns:
                for j, k in enumerate(idx):
                    v = df["theta"].iloc[k]
                    if v is not None and len(v):
                        theta[j] = torch.as_tensor(np.asarray(v, dtype=np.float32))
            hs, outs = self.meta(x, theta)
            logits = outs[self.rows[mid]["task"]][:, -1]
            # the base model's last hidden state (a CNN's last tap; an RNN's one tap at its last step),
            # V_n applied only where it is read
            last = families.get(self.emb.family).last_state(self.emb.maps[row], hs)
            for j, k in enumerate(idx):
                out[k] = {"model_id": mid, "prediction": int(logits[j].argmax()),
                          "logits": logits[j].tolist(), "hidden": last[j].reshape(-1).tolist()}
        return pd.DataFrame(out)


def _optional_theta(signature):
    """The inferred signature with its ``theta`` column optional (a model's own theta by default)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    cols = [ColSpec(c.type, c.name, required=False) if c.name == "theta" else c for c in signature.inputs.inputs]
    return ModelSignature(inputs=Schema(cols), outputs=signature.outputs)


def save(output_dir: str | Path, manifest: list[dict], dest: str | Path) -> Path:
    """Write the MLflow Model of the meta run in ``output_dir`` to ``dest`` (signature and an input
    example of the first model included); returns ``dest``."""
    from mlflow.models import infer_signature

    out, dest = Path(output_dir), Path(dest)
    with tempfile.TemporaryDirectory(prefix="dynamo-pyfunc-") as tmp:
        staged = Path(tmp) / "meta_run"
        staged.mkdir()
        shutil.copy2(out / outputs.CONFIG_FILE, staged / outputs.CONFIG_FILE)
        # theta, V and the shared weights, without optimiser state, one shard file at a time
        checkpoint.write_inference_copy(outputs.run_checkpoint(out), staged / outputs.CHECKPOINT_DIR)
        # the rows of the run's population; load() takes those of the models the checkpoint embeds
        rows = [{k: r.get(k) for k in _ROW_KEYS} for r in manifest]
        (staged / ROWS_FILE).write_text(json.dumps(rows))
        model = DynamoMetaModel().load(staged)
        size, dim = int(np.prod(model.spec.input_shape)), model.emb.theta[0].numel()
        example = pd.DataFrame({"model_id": [model.emb.model_ids[0]] * 2, "x": [[0.0] * size, [0.1] * size],
                                "theta": [[0.0] * dim, [0.1] * dim]})
        with _quiet_mlflow():
            signature = _optional_theta(infer_signature(example, model.predict(None, example)))
        with _quiet_mlflow():
            mlflow.pyfunc.save_model(
                path=str(dest), python_model=DynamoMetaModel(), artifacts={"meta_run": str(staged)},
                signature=signature, input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                  "dynamo_dist"])
    return dest


def log(run, output_dir: str | Path, manifest: list[dict]) -> str:
    """Log the meta run in ``output_dir`` as this MLflow Model at artifact path ``MODEL_DIR`` of
    ``run`` (a ``tracking.Run``); returns its URI (``runs:/<run id>/meta_model``) for
    ``mlflow.pyfunc.load_model``."""
    with tempfile.TemporaryDirectory(prefix="dynamo-model-") as tmp:
        path = save(output_dir, manifest, Path(tmp) / MODEL_DIR)
        run.log_artifact(path, MODEL_DIR)
    return f"runs:/{run.run_id}/{MODEL_DIR}"


@contextlib.contextmanager
def _quiet_mlflow():
    """Saving a model is part of a stage, not news: MLflow's advice about cloudpickle,
    its schema hints and its artifact-copy progress bar stay off the console."""
    import logging
    import os
    import warnings

    logger = logging.getLogger("mlflow")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


__all__ = ["DynamoMetaModel", "save", "log", "MODEL_DIR"]
