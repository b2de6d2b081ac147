"""One typed, validated config tree per run.

Names follow the papers, stated once: k (Algorithm 1's discriminator steps per generator
step) is ``train.d_steps``; CycleGAN's λ is ``loss.lambda_cyc``; m (the minibatch size) is
``train.batch_size``; G, F, D_X, D_Y are the model keys.

Every field is checked on construction, so a bad value fails before any work starts with
a message that names the field. ``to_flat_dict`` gives MLflow-style params
(``train.d_steps``) and ``from_flat_dict`` reads them back; ``apply_overrides`` takes the
command line's ``key=value`` pairs, where a leaf name alone (``d_steps``) is enough when it
is unambiguous.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

FAMILIES = ("gan", "cgan", "cyclegan")
ARCHS = {"gan": ("mlp", "conv"), "cgan": ("mlp", "conv"), "cyclegan": ("resnet",)}
DEFAULT_DATASET = {
    "gan": "builtin:digits",
    "cgan": "builtin:digits",
    "cyclegan": "builtin:digits-unpaired",
}


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the dotted field name."""


AUGMENTS = ("none", "flip", "jitter_flip")
DATA_KINDS = ("labelled", "unlabelled", "unpaired")
# What each family trains on: the cGAN needs labels y, CycleGAN two domains; the GAN takes
# any one-domain set (labels, when present, only serve evaluation).
FAMILY_DATA = {
    "gan": ("labelled", "unlabelled"),
    "cgan": ("labelled",),
    "cyclegan": ("unpaired",),
}


@dataclass(frozen=True)
class DataFacts:
    """What a dataset is, as its snapshot manifest says: the facts a config must agree with.

    kind: 'labelled' (class labels), 'unlabelled' (images only) or 'unpaired' (two domains X
    and Y); classes: label names in label order (labelled sets, and two-domain sets whose
    domains both carry labels); has_truth: ground truth T(x) is known (built-in pairs only).
    """

    kind: str
    image_size: int
    channels: int
    classes: tuple[str, ...] = ()
    has_truth: bool = False
    name: str = "dataset"

    def __post_init__(self) -> None:
        _check(self.kind in DATA_KINDS, "dataset kind", f"must be one of {DATA_KINDS}", self.kind)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _check(ok: bool, name: str, msg: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}, got {value!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "builtin:digits"
    """A built-in name (builtin:digits, builtin:digits-unpaired) or a snapshot id/name."""
    image_size: int = 16
    """Side of the square images; taken from the dataset snapshot (ingest decides it)."""
    channels: int = 1
    """1 (grayscale) or 3 (RGB); taken from the dataset snapshot."""
    augment: str = "none"
    """Training-time augmentation of every real minibatch: 'none', 'flip' (random horizontal
    flip) or 'jitter_flip' (CycleGAN's: enlarge by 286/256, random crop back, random flip)."""

    def __post_init__(self) -> None:
        _check(
            isinstance(self.dataset, str) and bool(self.dataset),
            "data.dataset",
            "must be a non-empty string",
            self.dataset,
        )
        _check(
            _is_int(self.image_size) and 8 <= self.image_size <= 512,
            "data.image_size",
            "must be an integer in [8, 512]",
            self.image_size,
        )
        _check(self.channels in (1, 3), "data.channels", "must be 1 or 3", self.channels)
        _check(
            self.augment in AUGMENTS,
            "data.augment",
            f"must be one of {', '.join(AUGMENTS)}",
            self.augment,
        )


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mlp"
    """gan/cgan: 'mlp' (the paper's multilayer perceptrons) or 'conv' (DCGAN-style);
    cyclegan: 'resnet' (ResNet-block generators, PatchGAN discriminators)."""
    z_dim: int = 64
    """Dimension of the noise z ~ N(0, I)."""
    hidden: int = 256
    """Width of the MLP hidden layers."""
    mlp_layers: int = 2
    """Number of hidden layers in each MLP."""
    ngf: int = 32
    """Base channel count of convolutional generators."""
    ndf: int = 32
    """Base channel count of convolutional discriminators."""
    n_res_blocks: int = 3
    """ResNet blocks in CycleGAN's generators (the paper: 6 at 128px, 9 at 256px)."""
    g_downsample: int = 2
    """Stride-2 down- (and up-) samplings in CycleGAN's generators (the paper: 2)."""
    patch_layers: int = 2
    """Stride-2 layers in the PatchGAN discriminator (sets its receptive field)."""
    num_classes: int = 10
    """Number of labels y for the conditional GAN."""
    embed_dim: int = 16
    """Size of the label embedding fed to G(z, y) and D(x, y)."""
    sync_batchnorm: bool = True
    """Under data parallelism on GPUs (workers > 1), BatchNorm layers normalise over the
    global minibatch (SyncBatchNorm), so N workers x m behave like 1 x N*m as the batch docs
    say. PyTorch's SyncBatchNorm is CUDA-only: CPU (gloo) workers normalise per rank."""

    def __post_init__(self) -> None:
        for name in (
            "z_dim",
            "hidden",
            "mlp_layers",
            "ngf",
            "ndf",
            "num_classes",
            "embed_dim",
            "patch_layers",
        ):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, f"model.{name}", "must be an integer >= 1", v)
        _check(
            isinstance(self.sync_batchnorm, bool),
            "model.sync_batchnorm",
            "must be true or false",
            self.sync_batchnorm,
        )
        for name in ("n_res_blocks", "g_downsample"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 0, f"model.{name}", "must be an integer >= 0", v)


@dataclass(frozen=True)
class LossConfig:
    gan_loss: str = "minimax"
    """'minimax' (Goodfellow's V(D, G), from logits) or 'lsgan' (least squares, CycleGAN's practice)."""
    g_loss: str = "non_saturating"
    """With minimax: 'non_saturating' (maximise log D(G(z)), the default) or 'saturating'."""
    lambda_cyc: float = 10.0
    """λ, the weight of CycleGAN's cycle-consistency loss (10 in the paper)."""
    lambda_id: float = 0.0
    """Identity-loss weight as a fraction of λ (the CycleGAN code uses 0.5; 0 disables it)."""

    def __post_init__(self) -> None:
        _check(
            self.gan_loss in ("minimax", "lsgan"),
            "loss.gan_loss",
            "must be 'minimax' or 'lsgan'",
            self.gan_loss,
        )
        _check(
            self.g_loss in ("non_saturating", "saturating"),
            "loss.g_loss",
            "must be 'non_saturating' or 'saturating'",
            self.g_loss,
        )
        _check(
            _is_num(self.lambda_cyc)
            and self.lambda_cyc >= 0
            and self.lambda_cyc == self.lambda_cyc
            and self.lambda_cyc != float("inf"),
            "loss.lambda_cyc",
            "must be a finite number >= 0",
            self.lambda_cyc,
        )
        _check(
            _is_num(self.lambda_id) and 0 <= self.lambda_id < float("inf"),
            "loss.lambda_id",
            "must be a finite number >= 0",
            self.lambda_id,
        )


@dataclass(frozen=True)
class OptimConfig:
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    decay_start: float = 1.0
    """Fraction of the steps after which learning rates decay linearly to 0 (CycleGAN: 0.5);
    1.0 keeps them constant."""

    def __post_init__(self) -> None:
        for name in ("lr_g", "lr_d"):
            v = getattr(self, name)
            _check(_is_num(v) and 0 < v < 1, f"optim.{name}", "must be a number in (0, 1)", v)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check(_is_num(v) and 0 <= v < 1, f"optim.{name}", "must be a number in [0, 1)", v)
        _check(
            _is_num(self.decay_start) and 0 <= self.decay_start <= 1,
            "optim.decay_start",
            "must be a number in [0, 1]",
            self.decay_start,
        )


@dataclass(frozen=True)
class TrainConfig:
    d_steps: int = 1
    """k: discriminator updates per generator update (Algorithm 1; k = 1 in the paper)."""
    batch_size: int = 64
    """m: minibatch size, per worker."""
    steps: int = 2000
    """Training iterations (generator updates)."""
    seed: int = 0
    log_every: int = 100
    """Metrics are synced to the host and reported every log_every iterations."""
    pool_size: int = 50
    """CycleGAN's history of generated images fed to the discriminators (0 disables)."""
    precision: str = "auto"
    """'fp32', 'bf16' (autocast of the forward passes; losses and monitored statistics stay
    in fp32) or 'auto': bf16 on CUDA, fp32 elsewhere. A value set anywhere (--set, --config,
    a pipeline or search config) is kept as it is on every device."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:N]'."""
    compile: bool = False
    """Run the networks through ``torch.compile``. Off by default: whether it pays is a GPU
    measurement (``ganflow bench --device cuda``, ``make gpu-check``) not yet made; on CPU
    the compile time (tens of seconds per network) outweighs short runs."""

    def __post_init__(self) -> None:
        _check(
            isinstance(self.compile, bool), "train.compile", "must be true or false", self.compile
        )
        _check(
            _is_int(self.d_steps) and self.d_steps >= 1,
            "train.d_steps",
            "k must be an integer >= 1",
            self.d_steps,
        )
        for name, low in (
            ("batch_size", 1),
            ("steps", 1),
            ("seed", 0),
            ("log_every", 1),
            ("pool_size", 0),
        ):
            v = getattr(self, name)
            _check(_is_int(v) and v >= low, f"train.{name}", f"must be an integer >= {low}", v)
        _check(
            self.precision in ("auto", "fp32", "bf16"),
            "train.precision",
            "must be 'auto', 'fp32' or 'bf16'",
            self.precision,
        )
        _check(
            isinstance(self.device, str)
            and (self.device in ("auto", "cpu") or self.device.startswith("cuda")),
            "train.device",
            "must be 'auto', 'cpu' or 'cuda[:N]'",
            self.device,
        )


@dataclass(frozen=True)
class EvalConfig:
    samples: int = 1000
    """Generated samples per evaluation (FD/KD, class accuracy, coverage)."""
    inception: bool = False
    """Also measure FID and KID in Inception-v3 features (needs the standard FID weights:
    GANFLOW_FID_WEIGHTS). When on, they become the unconditional GAN's and, without ground
    truth, CycleGAN's primary metric."""
    heldout: int = 10000
    """Held-out images measured per split (per domain for CycleGAN): all of a smaller split,
    else this many spaced evenly over it, so evaluation memory does not grow with the
    dataset (FD/FID estimates are stable at thousands of images)."""

    def __post_init__(self) -> None:
        _check(
            _is_int(self.heldout) and self.heldout >= 10,
            "eval.heldout",
            "must be an integer >= 10",
            self.heldout,
        )
        _check(
            _is_int(self.samples) and self.samples >= 10,
            "eval.samples",
            "must be an integer >= 10",
            self.samples,
        )
        _check(
            isinstance(self.inception, bool),
            "eval.inception",
            "must be true or false",
            self.inception,
        )


@dataclass(frozen=True)
class GanConfig:
    family: str = "gan"
    """'gan' (Goodfellow et al.), 'cgan' (Mirza & Osindero) or 'cyclegan' (Zhu et al.)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(
            self.family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}", self.family
        )
        archs = ARCHS[self.family]
        _check(
            self.model.arch in archs,
            "model.arch",
            f"must be one of {', '.join(archs)} for {self.family}",
            self.model.arch,
        )
        s = self.data.image_size
        if self.model.arch == "conv":
            # DCGAN-style nets double/halve the side from a 4x4 base.
            _check(
                s >= 8 and s & (s - 1) == 0,
                "data.image_size",
                "the conv architecture needs a power of two >= 8",
                s,
            )
        if self.model.arch == "resnet":
            # G's stride-2 downsamplings, then PatchGAN's strides and two 4x4 valid-ish convs.
            f = 2**self.model.g_downsample
            _check(
                s % f == 0,
                "data.image_size",
                f"the resnet generator with g_downsample={self.model.g_downsample} needs a multiple of {f}",
                s,
            )
            need = 3 * 2**self.model.patch_layers
            _check(
                s >= need,
                "data.image_size",
                f"PatchGAN with patch_layers={self.model.patch_layers} needs >= {need}",
                s,
            )

    # --- flat dict round trip -------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, object]:
        flat: dict[str, object] = {"family": self.family}
        for section in _SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                flat[f"{section}.{f.name}"] = getattr(getattr(self, section), f.name)
        return flat

    @classmethod
    def from_flat_dict(cls, flat: dict[str, object]) -> GanConfig:
        """Inverse of to_flat_dict; values may be strings (as MLflow returns params)."""
        return apply_overrides(cls(), dict(flat))


_SECTIONS = ("data", "model", "loss", "optim", "train", "eval")


def _field_type(section: str, name: str) -> type:
    hints = typing.get_type_hints(_field_type_owner(section))
    t = hints[name]
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _coerce(key: str, t: type, value: object) -> object:
    if not isinstance(value, str):
        if t is float and _is_int(value):
            return float(value)
        return value
    try:
        if t is int:
            return int(value)
        if t is float:
            return float(value)
        if t is bool:
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
    except ValueError:
        raise ConfigError(f"{key}: expected {t.__name__}, got {value!r}") from None
    return value


def resolve_key(key: str) -> tuple[str, str]:
    """'d_steps' or 'train.d_steps' -> ('train', 'd_steps'); unknown/ambiguous keys fail."""
    if "." in key:
        section, _, name = key.partition(".")
        if section in _SECTIONS and name in {
            f.name for f in dataclasses.fields(_field_type_owner(section))
        }:
            return section, name
        raise ConfigError(f"{key}: unknown config field")
    matches = [
        (s, key)
        for s in _SECTIONS
        if key in {f.name for f in dataclasses.fields(_field_type_owner(s))}
    ]
    if not matches:
        raise ConfigError(f"{key}: unknown config field")
    if len(matches) > 1:
        raise ConfigError(
            f"{key}: ambiguous, use one of {', '.join(f'{s}.{n}' for s, n in matches)}"
        )
    return matches[0]


def _field_type_owner(section: str) -> type:
    return {
        "data": DataConfig,
        "model": ModelConfig,
        "loss": LossConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
    }[section]


def apply_overrides(cfg: GanConfig, overrides: dict[str, object] | list[str]) -> GanConfig:
    """Return a new, re-validated config with overrides applied.

    overrides: {'train.d_steps': 3} or ['d_steps=3', 'lambda_cyc=10', 'family=cgan'].
    """
    if isinstance(overrides, list):
        overrides = parse_pairs(overrides)
    family = str(overrides.get("family", cfg.family))
    sections = {s: {} for s in _SECTIONS}
    for key, value in overrides.items():
        if key == "family":
            continue
        section, name = resolve_key(key)
        sections[section][name] = _coerce(f"{section}.{name}", _field_type(section, name), value)
    kwargs = {s: dataclasses.replace(getattr(cfg, s), **sections[s]) for s in _SECTIONS}
    return GanConfig(family=family, **kwargs)


# --- presets: functions that return configs -----------------------------------------


def _is_pow2(n: int) -> bool:
    return n >= 8 and n & (n - 1) == 0


def preset(family: str, name: str = "default", image_size: int = 16) -> GanConfig:
    """Named presets, chosen by the images' side. 'default' is what the main job trains;
    'tiny' is for fast tests; 'paper' is the paper-sized MLP GAN on 28x28 images at m = 64.

    By image_size (the snapshot's): gan/cgan up to 28 px use the paper's MLPs; larger
    power-of-two sides use the DCGAN layout (4x4 projection doubled up, ngf = ndf = 64: at
    64 px exactly Radford et al.'s 1024-512-256-128 generator); other sides keep the MLPs.
    CycleGAN up to 32 px uses the small digits preset; from 64 px the paper's generator
    (2 downsamplings, 6 ResNet blocks below 256 px, 9 from 256 px, ngf = ndf = 64), the
    70x70 PatchGAN (3 stride-2 layers), batch 1, λ = 10, identity weight 0.5 (the paper's
    code), LSGAN loss, linear decay over the second half, and the paper's jitter and flip
    (data.augment). Augmentation is off everywhere else (the built-in digits included).
    """
    _check(family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}", family)
    data = DataConfig(dataset=DEFAULT_DATASET[family], image_size=image_size)
    if family == "cyclegan" and image_size >= 64:
        cfg = GanConfig(
            family=family,
            data=dataclasses.replace(data, augment="jitter_flip"),
            model=ModelConfig(
                arch="resnet",
                ngf=64,
                ndf=64,
                n_res_blocks=9 if image_size >= 256 else 6,
                g_downsample=2,
                patch_layers=3,
            ),
            loss=LossConfig(gan_loss="lsgan", lambda_cyc=10.0, lambda_id=0.5),
            optim=OptimConfig(decay_start=0.5),
            train=TrainConfig(batch_size=1, steps=20000, log_every=100),
        )
    elif family == "cyclegan":
        cfg = GanConfig(
            family=family,
            data=data,
            # One down/up-sampling instead of the paper's two: at 16 px a 4x4 bottleneck
            # let G learn a digit permutation (label preservation 0.03, measured); at 8x8 it
            # keeps the digit (0.98). No identity loss: it asks G(y) = y, but here T inverts
            # colours, and with it G stayed near the identity (ratio 0.83 vs 0.08 without).
            model=ModelConfig(arch="resnet", ngf=16, ndf=32, n_res_blocks=3, g_downsample=1),
            loss=LossConfig(gan_loss="lsgan", lambda_cyc=10.0, lambda_id=0.0),
            optim=OptimConfig(decay_start=0.5),
            train=TrainConfig(batch_size=16, steps=600, log_every=50),
        )
    elif image_size > 28 and _is_pow2(image_size):
        cfg = GanConfig(
            family=family,
            data=data,
            model=ModelConfig(arch="conv", z_dim=100, ngf=64, ndf=64),
            optim=OptimConfig(decay_start=0.5),
            train=TrainConfig(batch_size=64, steps=5000, log_every=100),
        )
    else:
        # The unconditional GAN's Fréchet distance is best around 1,200-1,800 steps and drifts
        # up after (D keeps winning, measured); linear decay over the second half steadies
        # the end. The cGAN keeps improving to 3,000 steps.
        cfg = GanConfig(
            family=family,
            data=data,
            model=ModelConfig(arch="mlp"),
            optim=OptimConfig(decay_start=0.5),
            train=TrainConfig(batch_size=64, steps=2000 if family == "gan" else 3000),
        )
    if name == "default":
        return cfg
    if name == "tiny":
        small = {
            "train.steps": 20,
            "train.log_every": 5,
            "train.batch_size": 8,
            "model.hidden": 32,
            "model.ngf": 8,
            "model.ndf": 8,
            "model.n_res_blocks": 1,
        }
        return apply_overrides(cfg, small)
    if name == "paper":
        _check(family == "gan", "preset", "'paper' is defined for the gan family only", family)
        return apply_overrides(
            cfg,
            {
                "data.image_size": 28,
                "model.hidden": 1200,
                "model.z_dim": 100,
                "train.batch_size": 64,
            },
        )
    raise ConfigError(f"preset: unknown preset {name!r} (known: default, tiny, paper)")


# --- the config follows the data ----------------------------------------------------------

# Fields the dataset decides; a user value that differs is a contradiction, not an override.
_DATA_FIELDS = ("data.image_size", "data.channels", "model.num_classes")


def check_family_data(family: str, facts: DataFacts) -> None:
    """ConfigError unless the family can train on this kind of dataset."""
    _check(family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}", family)
    if facts.kind in FAMILY_DATA[family]:
        return
    need = {
        "cgan": "class labels (a folder per class)",
        "cyclegan": "two domains (trainA/ and trainB/ folders)",
        "gan": "one domain of images (a folder of images or of class folders)",
    }[family]
    raise ConfigError(
        f"family: {family} cannot train on {facts.name}: it holds {facts.kind} images and "
        f"{family} needs {need}"
    )


def config_for_data(
    family: str,
    facts: DataFacts,
    overrides: dict[str, object] | list[str] | None = None,
    preset_name: str = "default",
) -> GanConfig:
    """The config for training family on a dataset: the preset for the images' side, the
    dataset's facts (image size, channels, class count), then the user's overrides.

    An override of a fact that differs from the dataset is refused in one line: the data
    would not fit the networks (or would silently be re-interpreted)."""
    check_family_data(family, facts)
    user = normalise_overrides(overrides or {})
    cfg = preset(family, preset_name, image_size=facts.image_size)
    num_classes = facts.num_classes if family == "cgan" else cfg.model.num_classes
    wanted = {
        "data.image_size": facts.image_size,
        "data.channels": facts.channels,
        "model.num_classes": num_classes,
    }
    for key in _DATA_FIELDS:
        if key not in user:
            continue
        section, name = key.split(".")
        value = _coerce(key, _field_type(section, name), user[key])
        if key == "model.num_classes" and family != "cgan":
            continue
        if value != wanted[key]:
            what = {
                "data.image_size": f"{facts.image_size}px images (re-ingest with --image-size {value})",
                "data.channels": f"{facts.channels}-channel images (re-ingest with --channels {value})",
                "model.num_classes": f"{facts.num_classes} classes",
            }[key]
            raise ConfigError(
                f"{key}: {value!r} contradicts the dataset {facts.name}, which holds {what}; "
                "drop the override"
            )
    cfg = apply_overrides(cfg, wanted)
    return apply_overrides(cfg, user)


def parse_pairs(items: list[str]) -> dict[str, object]:
    """The command line's ['d_steps=3', 'train.steps=500'] as {'d_steps': '3', ...}."""
    pairs: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item}: overrides must look like key=value")
        pairs[key.strip()] = value.strip()
    return pairs


def normalise_overrides(overrides: dict[str, object] | list[str]) -> dict[str, object]:
    """key=value list or dict -> {'section.name': value} with leaf names resolved (unknown or
    ambiguous keys fail here); 'family' is dropped (the family is chosen elsewhere)."""
    if isinstance(overrides, list):
        overrides = parse_pairs(overrides)
    out: dict[str, object] = {}
    for key, value in overrides.items():
        if key == "family":
            continue
        section, name = resolve_key(key)
        out[f"{section}.{name}"] = value
    return out
