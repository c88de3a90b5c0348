"""The input contract: everything the weights expect of their input, as one object.

The contract travels with the weights (inside checkpoints and inside the exported
TorchScript file), so that training, evaluation and serving all rebuild the exact same
transform from it instead of re-typing constants. See OA-MEN (Frontiers in
Bioengineering, 2024) for the preprocessing it parameterises.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

CONTRACT_FORMAT = 1
KL_CLASS_NAMES = ("KL0", "KL1", "KL2", "KL3", "KL4")
KL_LABELS = (
    "KL0: no osteoarthritis",
    "KL1: doubtful",
    "KL2: minimal",
    "KL3: moderate",
    "KL4: severe",
)
DATA_CREDIT = (
    'Chen, Pingjun (2018), "Knee Osteoarthritis Severity Grading Dataset", Mendeley Data, '
    "v1, doi:10.17632/56rmx5bjcr.1, CC BY 4.0; knees from the Osteoarthritis Initiative (OAI)."
)
EQUALIZATIONS = ("global", "clahe", "none")
FITS = ("letterbox", "resize", "center_crop")
DECISIONS = ("argmax", "cutpoints")
GATES = ("none", "mahalanobis")


def _check_types(obj: object) -> None:
    """Reject values of the wrong type (JSON from outside is not trusted) and non-finite floats."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(str(f.type))
        if expected is None:
            continue
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{type(obj).__name__}.{f.name} must be {f.type}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(obj).__name__}.{f.name} must be finite, got {value!r}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of the OA-MEN preprocessing (`model.preprocess`), in model-input pixels.

    The paper names the steps (Gaussian denoising, Laplacian edges added back, histogram
    equalisation) but not their parameters; the defaults below are our choices, explained
    where the paper is silent.
    """

    # A 3x3 Gaussian with sigma 0.8 removes pixel noise of the 224 px crops while keeping
    # the osteophyte edges that a KL reader looks for; larger kernels blur the joint space.
    gaussian_ksize: int = 3
    gaussian_sigma: float = 0.8
    # The Laplacian the paper describes: the 4-neighbour kernel [[0,1,0],[1,-4,1],[0,1,0]]
    # (OpenCV's aperture 1). Apertures 3..31 are OpenCV's Sobel-based kernels; aperture 3 is the
    # diagonal [[2,0,2],[0,-8,0],[2,0,2]], twice as strong, which weights up to 0.1.0 used.
    laplacian_ksize: int = 1
    # Sharpening strength: out = blurred - weight * Laplacian(blurred). Weight 1 is the
    # textbook "Laplacian added back" (f - lap f), and with the 4-neighbour kernel it sharpens
    # as strongly as the old 0.5 x diagonal kernel, without ringing at the cortical edges.
    laplacian_weight: float = 1.0
    # "global" is the paper's histogram equalisation; "clahe" is offered because it
    # does not over-brighten the soft tissue around small joints.
    equalization: str = "global"
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    # How an image of any size and aspect ratio is fitted to the square input; see
    # model.preprocess.fit_to_square for why letterbox is the default.
    fit: str = "letterbox"
    pad_value: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("gaussian_ksize", "laplacian_ksize"):
            k = getattr(self, name)
            if not isinstance(k, int) or k < 1 or k % 2 == 0 or k > 31:
                raise ValueError(f"{name} must be an odd int in 1..31, got {k!r}")
        if self.gaussian_sigma < 0:
            raise ValueError(f"gaussian_sigma must be >= 0, got {self.gaussian_sigma}")
        if self.laplacian_weight < 0:
            raise ValueError(f"laplacian_weight must be >= 0, got {self.laplacian_weight}")
        if self.equalization not in EQUALIZATIONS:
            raise ValueError(f"equalization must be one of {EQUALIZATIONS}, got {self.equalization!r}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"pad_value must be in 0..255, got {self.pad_value}")
        if self.clahe_clip_limit <= 0 or self.clahe_tile_grid < 1:
            raise ValueError("clahe_clip_limit must be > 0 and clahe_tile_grid >= 1")


@dataclass(frozen=True)
class PostprocessConfig:
    """How logits become the answer (`model.postprocess`), fitted after training (`train.calibrate`).

    Attributes:
        temperature: logits are divided by it before the softmax (temperature scaling, fitted
            on the tune fold held out of train), so probabilities mean what they say.
        class_bias: K per-class offsets added to ``logits / temperature`` before the softmax
            (temperature scaling with a bias per class, a constrained vector scaling, Guo et al.
            2017); empty for none. `train.calibrate` chooses between the two on the tune fold.
        decision: ``argmax`` of the probabilities, or ``cutpoints`` on the expected grade
            sum_k k p_k (an ordinal decoding: grade g where cutpoints[g-1] <= E < cutpoints[g]).
        cutpoints: the K-1 increasing thresholds of ``cutpoints``, fitted on the tune fold.
        flip_tta: average the probabilities of the image and its mirror (left and right knees).
        uncertain_below: an answer whose confidence (the probability of its grade) is below
            this is flagged ``uncertain``; 0 flags nothing.
        gate: ``mahalanobis``: images whose feature distance to the knee classes
            (`model.gate.KneeGate`) exceeds ``gate_threshold`` are refused as not a knee.
        gate_threshold: the refusal threshold of the gate's score.
    """

    temperature: float = 1.0
    class_bias: tuple[float, ...] = ()
    decision: str = "argmax"
    cutpoints: tuple[float, ...] = ()
    flip_tta: bool = False
    uncertain_below: float = 0.0
    gate: str = "none"
    gate_threshold: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {self.decision!r}")
        if any(not isinstance(b, int | float) or not math.isfinite(b) for b in tuple(self.class_bias)):
            raise ValueError(f"class_bias must be finite numbers, got {tuple(self.class_bias)!r}")
        cuts = tuple(self.cutpoints)
        if any(not isinstance(c, int | float) or not math.isfinite(c) for c in cuts):
            raise ValueError(f"cutpoints must be finite numbers, got {cuts!r}")
        if any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"cutpoints must increase, got {cuts!r}")
        if self.decision == "cutpoints" and not cuts:
            raise ValueError("decision 'cutpoints' needs cutpoints")
        if not 0.0 <= self.uncertain_below <= 1.0:
            raise ValueError(f"uncertain_below must be in [0, 1], got {self.uncertain_below}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")


@dataclass(frozen=True)
class InputContract:
    """What a set of weights expects and what its outputs mean.

    Attributes:
        model_name: registry name of the architecture (``model.create_model``).
        model_version: version string of the trained weights.
        class_names: one short name per output logit, in order.
        class_labels: one human-readable label per output logit.
        input_size: side of the square model input, in pixels.
        channels: input channels; gray radiographs use 1.
        mean, std: per-channel normalisation after scaling pixels to [0, 1].
        preprocess: the deterministic preprocessing parameters.
        postprocess: how logits become probabilities, a grade, a flag or a refusal.
        max_pixels: decoded images with more pixels are refused (decompression bombs).
        data_credit: where the training data came from, to be shown with the model.
    """

    model_name: str = "oamen"
    model_version: str = "0.0.0"
    class_names: tuple[str, ...] = KL_CLASS_NAMES
    class_labels: tuple[str, ...] = KL_LABELS
    input_size: int = 224
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    max_pixels: int = 50_000_000
    data_credit: str = DATA_CREDIT
    format: int = CONTRACT_FORMAT

    def __post_init__(self) -> None:
        _check_types(self)
        if self.format != CONTRACT_FORMAT:
            raise ValueError(f"contract format {self.format!r} is not supported (expected {CONTRACT_FORMAT})")
        if any(not math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError(f"mean and std must be finite, got {self.mean}, {self.std}")
        if len(self.class_names) < 2 or len(self.class_labels) != len(self.class_names):
            raise ValueError("class_names needs >= 2 entries and one class_label for each")
        if not 16 <= self.input_size <= 2048:
            raise ValueError(f"input_size must be in 16..2048, got {self.input_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.max_pixels < self.input_size**2:
            raise ValueError("max_pixels must allow at least one input-sized image")
        cuts = self.postprocess.cutpoints
        if cuts and len(cuts) != len(self.class_names) - 1:
            raise ValueError(f"postprocess needs {len(self.class_names) - 1} cutpoints, got {len(cuts)}")
        bias = self.postprocess.class_bias
        if bias and len(bias) != len(self.class_names):
            raise ValueError(f"postprocess needs {len(self.class_names)} class_bias values, got {len(bias)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def replace(self, **changes: Any) -> InputContract:
        """A copy with some fields changed (``preprocess``, ``postprocess`` may be dicts of their fields)."""
        if isinstance(changes.get("preprocess"), dict):
            changes["preprocess"] = dataclasses.replace(self.preprocess, **changes["preprocess"])
        if isinstance(changes.get("postprocess"), dict):
            post = dict(changes["postprocess"])
            for name in ("cutpoints", "class_bias"):
                if name in post:
                    post[name] = tuple(float(c) for c in post[name])
            changes["postprocess"] = dataclasses.replace(self.postprocess, **post)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputContract:
        if not isinstance(data, dict):
            raise ValueError(f"contract must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != CONTRACT_FORMAT:
            raise ValueError(f"contract format {fmt!r} is not supported (expected {CONTRACT_FORMAT})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"contract has unknown fields {sorted(unknown)}")
        kw = dict(data)
        try:
            kw["preprocess"] = PreprocessConfig(**kw.get("preprocess", {}))
            post = dict(kw.get("postprocess", {}))
            for name in ("cutpoints", "class_bias"):
                if name in post:
                    post[name] = tuple(post[name])
            kw["postprocess"] = PostprocessConfig(**post)
            for name in ("class_names", "class_labels", "mean", "std"):
                if name in kw:
                    kw[name] = tuple(kw[name])
            return cls(**kw)
        except TypeError as exc:  # unknown preprocess field, a list where a number belongs, ...
            raise ValueError(f"invalid contract: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> InputContract:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"contract is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
