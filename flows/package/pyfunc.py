"""The served generator: an MLflow ``PythonModel`` over the weights-only package.

MLflow loads it from code (``pyfunc_model.py`` next to this file, shipped with every logged
model), so ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and ``ganflow generate``
run the same class on the same artifacts, and no model object is ever unpickled. Models
registered before this class moved here load it through flows.registry.pyfunc, which
re-exports it.

Requests (``{"inputs": {...}, "params": {"format": "png"}}`` on ``/invocations``):

- gan: ``{"n": N, "seed": S}`` -> N images;
- cgan: ``{"labels": [...], "seed": S}`` -> one image per label;
- cyclegan: ``{"images": [...], "direction": "G" | "F"}`` -> the translations, images given
  as base64 PNG strings or ``[C, S, S]`` arrays in [-1, 1] of the model's exact size.

Answers: ``{"images": [N, C, S, S] floats in [-1, 1]}`` (cgan adds ``labels``), or with
``format=png`` a list of base64 PNG strings. Every problem with a request is an
``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which the scoring server answers with
HTTP 400 and the one-line message, never a 500 or a traceback.

How many requests a server takes at once is decided in front of MLflow's app
(flows.registry.serve_app), not here: the answer's encoding costs more than predict. An
answer as JSON arrays holds at most ``MAX_ARRAY_VALUES`` numbers (MLflow encodes JSON in
pure Python: seconds and tens of MB per million numbers); larger answers are asked for as
PNG.
"""

import base64
import binascii
import io
import math
from collections.abc import Iterable

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from flows.package.format import MAX_SAMPLES, PACKAGE_ARTIFACT, load_package

FORMATS = ("array", "png")
DIRECTIONS = {"G": "G", "F": "F", "x2y": "G", "y2x": "F"}
# 1,024 RGB images of 32 px. MLflow's scoring server writes JSON with Python's pure-Python
# encoder: measured here, 1,024 x 3 x 32 x 32 floats took 7.9 s and a 71 MB answer, the
# same images as PNG 1.2 s and 1.9 MB. Bigger answers as arrays would take minutes and GBs.
MAX_ARRAY_VALUES = 1024 * 3 * 32 * 32


class BadRequest(MlflowException):
    """A request the model cannot answer; the scoring server turns it into HTTP 400."""

    def __init__(self, message: str, error_code=INVALID_PARAMETER_VALUE, **kwargs) -> None:
        super().__init__(message, error_code=error_code, **kwargs)


def _records(model_input) -> list[dict]:
    """The request as records: MLflow hands over a DataFrame (one row per record, from
    ``inputs`` or ``dataframe_records``), a dict, or a list of dicts."""
    if hasattr(model_input, "columns") and hasattr(model_input, "to_dict"):  # a DataFrame
        return [
            {k: v for k, v in row.items() if not _missing(v)}
            for row in model_input.to_dict(orient="records")
        ]
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return model_input
    raise BadRequest(
        f"expected a JSON object such as {{'inputs': {{...}}}}, got {type(model_input).__name__}"
    )


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _int(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise BadRequest(f"{what} must be an integer, got {value!r}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise BadRequest(f"{what} must be an integer, got {value!r}")
    v = int(value)
    if not low <= v <= high:
        raise BadRequest(f"{what} must be in [{low}, {high}], got {v}")
    return v


def _list(value, what: str) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BadRequest(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def to_png(images: torch.Tensor) -> list[str]:
    """[N, C, S, S] in [-1, 1] -> base64 PNG strings (8-bit grey or RGB)."""
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    out = []
    for img in pixels:
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


class GanflowGenerator(PythonModel):
    """A registered ganflow generator (any family), loaded from its package."""

    # The signature is explicit (flows.package.serving_signature), so MLflow need not infer
    # one from type hints on predict (nor warn that there are none).
    _skip_type_hint_validation = True

    cfg = None
    nets: dict
    meta: dict

    def load_context(self, context) -> None:
        self.load_package(context.artifacts[PACKAGE_ARTIFACT])

    def load_package(self, path: str) -> "GanflowGenerator":
        self.cfg, self.nets, self.meta = load_package(path)
        return self

    # --- what `ganflow generate` and predict share ------------------------------------------

    @property
    def family(self) -> str:
        return self.cfg.family

    def check_count(self, n: int, what: str = "n") -> None:
        if not 1 <= n <= MAX_SAMPLES:
            raise BadRequest(f"{what} must be between 1 and {MAX_SAMPLES} per request, got {n}")

    def check_answer(self, n: int, fmt: str) -> None:
        """A JSON-array answer of n images stays within MAX_ARRAY_VALUES numbers."""
        s, ch = self.cfg.data.image_size, self.cfg.data.channels
        values = n * ch * s * s
        if fmt == "array" and values > MAX_ARRAY_VALUES:
            most = max(1, MAX_ARRAY_VALUES // (ch * s * s))
            raise BadRequest(
                f"{n} images of {ch} x {s} x {s} as JSON arrays are {values:,} numbers, over "
                f"the {MAX_ARRAY_VALUES:,} one answer may hold; ask for at most {most} images "
                "or for PNG (params.format = 'png', up to 1,024 images)"
            )

    def check_labels(self, labels: Iterable[int]) -> None:
        allowed = set(self.meta["labels"])
        bad = sorted({int(y) for y in labels if int(y) not in allowed})
        if bad:
            raise BadRequest(
                f"unknown label(s) {bad}; this model knows {min(allowed)}..{max(allowed)}"
            )

    def generate(self, n: int, seed: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
        from gan_core.evaluate import sample

        self.check_count(len(labels) if labels is not None else n)
        if labels is not None:
            self.check_labels(labels.tolist())
        return sample(self.cfg, self.nets["G"], n, seed=seed, labels=labels)

    @torch.no_grad()
    def translate(self, x: torch.Tensor, direction: str = "G") -> torch.Tensor:
        self.check_count(len(x), "images")
        s, ch = self.cfg.data.image_size, self.cfg.data.channels
        if tuple(x.shape[1:]) != (ch, s, s):
            raise BadRequest(f"images must be {ch} x {s} x {s}, got {tuple(x.shape[1:])}")
        return torch.cat([self.nets[direction](x[i : i + 256]) for i in range(0, len(x), 256)])

    # --- MLflow ---------------------------------------------------------------------------

    def predict(self, context, model_input, params: dict | None = None):
        try:
            return self._predict(model_input, params or {})
        except MlflowException:
            raise
        except Exception as exc:  # never a 500 with a traceback: name the problem
            raise BadRequest(f"cannot answer this request ({type(exc).__name__}: {exc})") from None

    def _predict(self, model_input, params: dict) -> dict:
        fmt = params.get("format") or "array"
        if fmt not in FORMATS:
            raise BadRequest(f"params.format must be one of {list(FORMATS)}, got {fmt!r}")
        records = _records(model_input)
        if not records:
            raise BadRequest("the request holds no inputs")
        images, labels, directions = [], [], []
        for rec in records:
            if self.family == "cyclegan":
                direction = rec.get("direction") or "G"
                if direction not in DIRECTIONS:
                    raise BadRequest(
                        f"direction must be 'G' (X->Y) or 'F' (Y->X), got {direction!r}"
                    )
                direction = DIRECTIONS[direction]
                images.append(self.translate(self._decode(rec), direction))
                directions.append(direction)
                continue
            unknown = sorted(set(rec) - {"n", "seed", "labels"})
            if unknown:
                raise BadRequest(f"unknown input field(s) {unknown} for a {self.family} model")
            seed = _int(rec.get("seed", 0), "seed", 0, 2**63 - 1)
            if self.family == "cgan":
                if "labels" not in rec:
                    raise BadRequest("a cgan request needs 'labels': [label, ...]")
                ys = [
                    _int(y, "each label", -(2**63), 2**63 - 1)
                    for y in _list(rec["labels"], "labels")
                ]
                self.check_count(len(ys), "len(labels)")
                self.check_answer(len(ys), fmt)
                self.check_labels(ys)
                y = torch.tensor(ys, dtype=torch.int64)
                images.append(self.generate(len(ys), seed, y))
                labels += ys
            else:
                if "n" not in rec:
                    raise BadRequest("a gan request needs 'n': the number of images")
                n = _int(rec["n"], "n", 1, MAX_SAMPLES)
                self.check_answer(n, fmt)
                images.append(self.generate(n, seed))
        out = torch.cat(images)
        self.check_count(len(out), "images in one request")
        self.check_answer(len(out), fmt)
        answer: dict = {"images": to_png(out) if fmt == "png" else out.numpy()}
        if self.family == "cgan":
            answer["labels"] = labels
        if directions:
            answer["direction"] = directions[0] if len(set(directions)) == 1 else directions
        return answer

    def _decode(self, rec: dict) -> torch.Tensor:
        """The record's images as [N, C, S, S] in [-1, 1]: base64 PNG or arrays, exact size."""
        unknown = sorted(set(rec) - {"images", "direction"})
        if unknown:
            raise BadRequest(f"unknown input field(s) {unknown} for a cyclegan model")
        if "images" not in rec:
            raise BadRequest("a cyclegan request needs 'images': base64 PNG strings or arrays")
        s, ch = self.cfg.data.image_size, self.cfg.data.channels
        items = self._items(rec["images"], ch)
        self.check_count(len(items), "images")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                arr = self._png(item, i, ch)
            else:
                try:
                    arr = np.asarray(item, dtype=np.float32)
                except (ValueError, TypeError):
                    raise BadRequest(f"images[{i}] is neither a base64 PNG nor an array") from None
                if arr.ndim == 2 and ch == 1:
                    arr = arr[None]
                if arr.ndim != 3:
                    raise BadRequest(f"images[{i}] must be C x H x W, got shape {arr.shape}")
                if not np.isfinite(arr).all() or arr.min() < -1 or arr.max() > 1:
                    raise BadRequest(f"images[{i}] values must be finite and in [-1, 1]")
            if arr.shape != (ch, s, s):
                raise BadRequest(
                    f"images[{i}] must be {ch} x {s} x {s} (channels x height x width), "
                    f"got {' x '.join(map(str, arr.shape))}"
                )
            out.append(torch.from_numpy(np.ascontiguousarray(arr)))
        return torch.stack(out)

    @staticmethod
    def _items(raw, channels: int) -> list:
        """One image or a list of them. MLflow may hand over one image per DataFrame row (it
        splits a list under `inputs` into rows), so a row's value can be a single image."""
        if isinstance(raw, np.ndarray):
            raw = raw.tolist()
        if isinstance(raw, str):
            return [raw]
        if not isinstance(raw, (list, tuple)) or not raw:
            raise BadRequest("images must be base64 PNG strings or C x H x W arrays")
        if all(isinstance(item, str) for item in raw):
            return list(raw)
        try:
            arr = np.asarray(raw, dtype=np.float32)
        except (ValueError, TypeError):  # ragged, or strings and arrays mixed in one list
            return list(raw)
        if arr.ndim == 3 and (arr.shape[0] in (1, 3) or channels != 1):
            return [arr]  # one C x H x W image
        if arr.ndim == 2 and channels == 1:
            return [arr]  # one grey H x W image
        if arr.ndim in (3, 4):
            return list(arr)
        raise BadRequest(f"images must be C x H x W arrays, got shape {arr.shape}")

    def _png(self, text: str, i: int, channels: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            raw = base64.b64decode(text, validate=True)
            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > 4096 * 4096:
                    raise BadRequest(f"images[{i}] is too large ({im.width} x {im.height})")
                mode = im.mode
                if (channels == 1 and mode not in ("L", "1", "P")) or (
                    channels == 3 and mode not in ("RGB", "P")
                ):
                    raise BadRequest(
                        f"images[{i}] has mode {mode}; this model takes "
                        f"{'greyscale (L)' if channels == 1 else 'RGB'} images"
                    )
                pixels = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
        except (binascii.Error, ValueError):
            raise BadRequest(f"images[{i}] is not valid base64") from None
        except (UnidentifiedImageError, OSError):
            raise BadRequest(f"images[{i}] is not a PNG (or another image PIL reads)") from None
        pixels = pixels / 127.5 - 1.0
        return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
