"""One typed, validated config tree per run.

Names follow the papers, stated once: k (Algorithm 1's discriminator steps per generator
step) is ``train.d_steps``; CycleGAN's λ is ``loss.lambda_cyc``; m (the minibatch size) is
``train.batch_size``; G, F, D_X, D_Y are the model keys.

Every field is checked on construction, so a bad value fails before any work starts with
a message that names the field. ``to_flat_dict`` gives MLflow-style params
(``train.d_steps``); reading them back and the command line's ``key=value`` overrides are
:mod:`gan_core.overrides`; presets and fitting a config to a dataset, :mod:`gan_core.presets`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

FAMILIES = ("gan", "cgan", "cyclegan")
ARCHS = {"gan": ("mlp", "conv"), "cgan": ("mlp", "conv"), "cyclegan": ("resnet",)}
DEFAULT_DATASET = {
    "gan": "builtin:digits",
    "cgan": "builtin:digits",
    "cyclegan": "builtin:digits-unpaired",
}
AUGMENTS = ("none", "flip", "jitter_flip")
GAN_LOSSES = ("minimax", "lsgan", "hinge")
DIFFAUG_OPS = ("color", "translation", "cutout")


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the dotted field name."""


def _check(ok: bool, name: str, msg: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}, got {value!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ints(obj: object, section: str, low: int, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        _check(_is_int(v) and v >= low, f"{section}.{name}", f"must be an integer >= {low}", v)


def _bools(obj: object, section: str, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        _check(isinstance(v, bool), f"{section}.{name}", "must be true or false", v)


def _one_of(obj: object, section: str, name: str, allowed: tuple[str, ...], sep=", ") -> None:
    v = getattr(obj, name)
    _check(v in allowed, f"{section}.{name}", f"must be one of {sep.join(allowed)}", v)


def _finite(v: object, low: float = 0.0) -> bool:
    return _is_num(v) and math.isfinite(v) and v >= low


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
    flip) or 'jitter_flip' (CycleGAN's: enlarge by 286/256, random crop back, random flip).
    It changes the data G learns; D's augmentation (``augment.*``) does not."""

    def __post_init__(self) -> None:
        ds, size = self.dataset, self.image_size
        _check(isinstance(ds, str) and bool(ds), "data.dataset", "must be a non-empty string", ds)
        ok = _is_int(size) and 8 <= size <= 512
        _check(ok, "data.image_size", "must be an integer in [8, 512]", size)
        _check(self.channels in (1, 3), "data.channels", "must be 1 or 3", self.channels)
        _one_of(self, "data", "augment", AUGMENTS)


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
    g_layout: str = "dcgan"
    """Conv G: 'dcgan' (Radford et al.: ngf·2^(n-1) channels at 4x4, halved per doubling, the
    last transposed conv straight to the image) or 'wide' (ganflow before 0.9: twice the
    channels per level and an extra 3x3 conv at full resolution, ~2x the cost)."""
    g_upsample: str = "transposed"
    """Conv G's doublings: 'transposed' (a stride-2 4x4 transposed conv, DCGAN's) or 'resize'
    (nearest-neighbour x2 then a 3x3 conv, Odena et al. 2016: no checkerboard by
    construction; about 2.25x the multiply-adds of G's upsampling layers)."""
    spectral_norm: bool = True
    """Spectral normalisation (Miyato et al. 2018) of every layer of the conv D and the
    PatchGAN: bounds D's Lipschitz constant, per weight (no batch statistics, so D may see
    real and fake minibatches separately)."""
    d_batchnorm: bool = True
    """Batch norm in the conv D after every convolution but the first (Radford et al.)."""
    minibatch_std: int = 0
    """Conv D: the minibatch standard deviation layer (Karras et al. 2018) with groups of
    this many images: before D's head, each group's feature-wise standard deviation,
    averaged to one number, is appended as an extra 4x4 feature map, so D sees how varied
    a group is and a G that draws one shape for every z pays for it. 0: off."""
    conditioning: str = "planes"
    """How the conv cGAN sees y. G: class-conditional batch norm for 'planes' and
    'projection'. D: 'planes', y as one-hot input planes; 'projection', Miyato & Koyama
    2018's inner product of a class embedding with D's features. 'concat' (before 0.9): a
    label embedding concatenated to z, and a learned label plane for D."""
    n_res_blocks: int = 3
    """ResNet blocks in CycleGAN's generators (the paper: 6 at 128px, 9 at 256px)."""
    g_downsample: int = 2
    """Stride-2 down- (and up-) samplings in CycleGAN's generators (the paper: 2)."""
    patch_layers: int = 2
    """Stride-2 layers in the PatchGAN discriminator (sets its receptive field)."""
    num_classes: int = 10
    """Number of labels y for the conditional GAN."""
    embed_dim: int = 16
    """Size of the label embedding fed to G(z, y) and D(x, y) (MLPs, 'concat')."""
    sync_batchnorm: bool = True
    """Under data parallelism on GPUs (workers > 1), BatchNorm layers normalise over the
    global minibatch (SyncBatchNorm), so N workers x m behave like 1 x N*m as the batch docs
    say. PyTorch's SyncBatchNorm is CUDA-only: CPU (gloo) workers normalise per rank."""

    def __post_init__(self) -> None:
        names = ("z_dim", "hidden", "mlp_layers", "ngf", "ndf", "num_classes", "embed_dim")
        _ints(self, "model", 1, *names, "patch_layers")
        _ints(self, "model", 0, "n_res_blocks", "g_downsample", "minibatch_std")
        _bools(self, "model", "sync_batchnorm", "spectral_norm", "d_batchnorm")
        _one_of(self, "model", "g_layout", ("dcgan", "wide"))
        _one_of(self, "model", "g_upsample", ("transposed", "resize"))
        _one_of(self, "model", "conditioning", ("planes", "projection", "concat"))


@dataclass(frozen=True)
class LossConfig:
    gan_loss: str = "minimax"
    """'minimax' (Goodfellow's V(D, G), from logits), 'lsgan' (least squares, CycleGAN's
    practice) or 'hinge' (Lim & Ye 2017; SNGAN's and BigGAN's)."""
    g_loss: str = "non_saturating"
    """With minimax: 'non_saturating' (maximise log D(G(z)), the default) or 'saturating'."""
    lambda_cyc: float = 10.0
    """λ, the weight of CycleGAN's cycle-consistency loss (10 in the paper)."""
    lambda_id: float = 0.0
    """Identity-loss weight as a fraction of λ (the CycleGAN code uses 0.5; 0 disables it)."""
    r1_gamma: float = 0.0
    """γ of the R1 penalty γ/2·E[‖∇D(x)‖²] on real images (Mescheder et al. 2018); 0: off."""
    r1_every: int = 16
    """Lazy regularisation (Karras et al. 2020): R1 every this many D updates, scaled up by
    the same factor, so its cost (a double backward) is paid 1/r1_every of the time."""
    mismatch: float = 0.0
    """cGAN only: the weight w of the matching-aware discriminator (Reed et al. 2016): real
    images with wrong labels count as fakes with weight w, G's samples with 1 - w, so D
    learns to check the label, not only realism. 0: off. Measured on 600 RGB shapes (3
    classes, random colours) at 3,000 steps: w = 0.5 took the judge's class accuracy of
    the samples from chance (0.34) to 0.51 and intra-class FD from 176 to 116, FD unchanged.
    With a single class there is no wrong label, and it has no effect."""

    def __post_init__(self) -> None:
        _one_of(self, "loss", "gan_loss", GAN_LOSSES)
        _one_of(self, "loss", "g_loss", ("non_saturating", "saturating"))
        for name in ("lambda_cyc", "lambda_id", "r1_gamma"):
            v = getattr(self, name)
            _check(_finite(v), f"loss.{name}", "must be a finite number >= 0", v)
        m = self.mismatch
        _check(_finite(m) and m < 1, "loss.mismatch", "must be a number in [0, 1)", m)
        _ints(self, "loss", 1, "r1_every")


@dataclass(frozen=True)
class AugmentConfig:
    """D's augmentation: every image D sees, real or fake, in D's update and in G's, passes
    through the same random, differentiable transformations (DiffAugment, Zhao et al. 2020),
    each applied per image with probability p; with ``ada``, p follows ADA's overfitting
    heuristic (Karras et al. 2020). G never learns the augmentations: D sees them on both
    sides, so they are not part of what separates real from fake."""

    policy: str = "none"
    """'none' or a comma list of DiffAugment's ops: color, translation, cutout."""
    p: float = 1.0
    """Probability of each op per image; with ``ada`` the starting value (ADA starts at 0)."""
    ada: bool = False
    """Adapt p: r_t = E[sign(D(x_real))] over the last ``ada_interval`` D updates; p moves up
    when r_t > ada_target (D too sure of the reals: overfitting), down otherwise."""
    ada_target: float = 0.6
    """ADA's target for r_t (0.6 in the paper)."""
    ada_images: int = 100_000
    """Images over which p can move from 0 to 1 (stylegan2-ada: 500k, sized for millions of
    images; 100k suits the thousands of steps of a CPU or single-GPU run)."""
    ada_interval: int = 4
    """D updates between adjustments of p."""

    def __post_init__(self) -> None:
        ops = [o.strip() for o in str(self.policy).split(",")]
        _check(
            isinstance(self.policy, str)
            and (self.policy == "none" or all(o in DIFFAUG_OPS for o in ops)),
            "augment.policy",
            f"must be 'none' or a comma list of {', '.join(DIFFAUG_OPS)}",
            self.policy,
        )
        for name in ("p", "ada_target"):
            v = getattr(self, name)
            _check(_finite(v) and v <= 1, f"augment.{name}", "must be a number in [0, 1]", v)
        _bools(self, "augment", "ada")
        _ints(self, "augment", 1, "ada_images", "ada_interval")

    @property
    def ops(self) -> tuple[str, ...]:
        """The policy's ops in application order; () when off."""
        if self.policy == "none":
            return ()
        return tuple(o.strip() for o in self.policy.split(","))


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
        v = self.decay_start
        _check(_is_num(v) and 0 <= v <= 1, "optim.decay_start", "must be a number in [0, 1]", v)


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
    ema_half_life: int = 0
    """Half-life, in images seen, of the exponential moving average of the generators'
    weights (Karras et al.: 10k images); the average is what is evaluated, registered and
    served. 0: off (the last weights are the model)."""
    ema_rampup: float = 0.05
    """The half-life is at most this fraction of the images seen so far, so early random
    weights leave the average quickly; 0 disables the ramp."""
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
        _bools(self, "train", "compile")
        _check(
            _is_int(self.d_steps) and self.d_steps >= 1,
            "train.d_steps",
            "k must be an integer >= 1",
            self.d_steps,
        )
        _ints(self, "train", 1, "batch_size", "steps", "log_every")
        _ints(self, "train", 0, "seed", "pool_size", "ema_half_life")
        v = self.ema_rampup
        _check(_finite(v) and v <= 1, "train.ema_rampup", "must be a number in [0, 1]", v)
        _check(
            self.precision in ("auto", "fp32", "bf16"),
            "train.precision",
            "must be 'auto', 'fp32' or 'bf16'",
            self.precision,
        )
        dev = self.device
        ok = isinstance(dev, str) and (dev in ("auto", "cpu") or dev.startswith("cuda"))
        _check(ok, "train.device", "must be 'auto', 'cpu' or 'cuda[:N]'", dev)


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
    every: int = 0
    """Iterations between evaluations on the validation split during training (0: at the
    end only). The best step on validation is the model registered, not the last one."""

    def __post_init__(self) -> None:
        _ints(self, "eval", 10, "heldout", "samples")
        _ints(self, "eval", 0, "every")
        _bools(self, "eval", "inception")


@dataclass(frozen=True)
class GanConfig:
    family: str = "gan"
    """'gan' (Goodfellow et al.), 'cgan' (Mirza & Osindero) or 'cyclegan' (Zhu et al.)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
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
        s, m, key = self.data.image_size, self.model, "data.image_size"
        if m.arch == "conv":  # DCGAN-style nets double/halve the side from a 4x4 base
            _check(
                s >= 8 and s & (s - 1) == 0,
                key,
                "the conv architecture needs a power of two >= 8",
                s,
            )
        if m.arch == "resnet":
            # G's stride-2 downsamplings, then PatchGAN's strides and two 4x4 valid-ish convs.
            f, need = 2**m.g_downsample, 3 * 2**m.patch_layers
            what = f"the resnet generator with g_downsample={m.g_downsample}"
            _check(s % f == 0, key, f"{what} needs a multiple of {f}", s)
            _check(
                s >= need, key, f"PatchGAN with patch_layers={m.patch_layers} needs >= {need}", s
            )
        if self.loss.mismatch:  # a wrong label needs labels
            _check(self.family == "cgan", "loss.mismatch", "needs the cgan family", self.family)
        if self.augment.ops and self.model.arch == "mlp":
            # translation and cutout are spatial: an MLP D has no notion of them.
            _check(False, "augment.policy", "needs a convolutional D (model.arch conv)", "mlp")

    # --- flat dict round trip -------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, object]:
        flat: dict[str, object] = {"family": self.family}
        for section in _SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                flat[f"{section}.{f.name}"] = getattr(getattr(self, section), f.name)
        return flat


_SECTIONS = ("data", "model", "loss", "augment", "optim", "train", "eval")


def _field_type_owner(section: str) -> type:
    return typing.get_type_hints(GanConfig)[section]
