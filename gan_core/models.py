"""Generators and discriminators for the three families, single-device PyTorch.

Shapes: images [N, C, S, S] in [-1, 1] (tanh outputs); noise z [N, z_dim]; labels y [N]
int64. Discriminators return logits/scores [N] (MLP, DCGAN) or [N, 1, P, P] (PatchGAN).
Nothing here knows about ranks or devices: distribution is applied at the edge.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gan_core.config import GanConfig


def _mlp(sizes: list[int], act: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act)
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """G(z) or G(z, y): the paper's multilayer perceptron with a tanh output.

    Hidden layers are Linear -> BatchNorm -> LeakyReLU(0.2): without batch norm the MLP
    generator collapses onto one sample per label on the digits within a few hundred steps
    (measured: identical rows in the cGAN grid), with it the samples stay diverse."""

    def __init__(
        self,
        z_dim: int,
        image_shape: tuple[int, int, int],
        hidden: int,
        layers: int,
        num_classes: int = 0,
        embed_dim: int = 0,
    ):
        super().__init__()
        self.image_shape = image_shape
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        in_dim = z_dim + (embed_dim if num_classes else 0)
        out_dim = image_shape[0] * image_shape[1] * image_shape[2]
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks += [
                nn.Linear(in_dim if i == 0 else hidden, hidden),
                nn.BatchNorm1d(hidden),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Linear(hidden if layers else in_dim, out_dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)
        return torch.tanh(self.net(z)).view(z.shape[0], *self.image_shape)


class MLPDiscriminator(nn.Module):
    """D(x) or D(x, y): an MLP to one logit (LeakyReLU, which trains more reliably than maxout here)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        hidden: int,
        layers: int,
        num_classes: int = 0,
        embed_dim: int = 0,
    ):
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        in_dim = image_shape[0] * image_shape[1] * image_shape[2] + (
            embed_dim if num_classes else 0
        )
        self.net = _mlp([in_dim] + [hidden] * layers + [1], nn.LeakyReLU(0.2))

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = x.flatten(1)
        if self.embed is not None:
            h = torch.cat([h, self.embed(y)], dim=1)
        return self.net(h).squeeze(1)


def _sn(module: nn.Module, on: bool) -> nn.Module:
    """Spectral normalisation of a layer's weight (Miyato et al. 2018): one power iteration
    per training forward, its vectors kept as buffers (so they checkpoint)."""
    return nn.utils.parametrizations.spectral_norm(module) if on else module


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift are looked up per class (de Vries et al. 2017, as in
    Miyato & Koyama's and BigGAN's generators): y steers every layer of G, not only its input."""

    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, affine=False)
        self.gamma = nn.Embedding(num_classes, c)
        self.beta = nn.Embedding(num_classes, c)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.bn(x)
        return h * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class ResizeConv(nn.Module):
    """x2 nearest-neighbour upsampling then a 3x3 conv (Odena et al. 2016, "Deconvolution
    and checkerboard artifacts"): every output pixel sees the same number of input taps, so
    G has no built-in checkerboard, which a stride-2 4x4 transposed conv has until it
    learns its way out of it."""

    def __init__(self, c_in: int, c_out: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class ConvGenerator(nn.Module):
    """DCGAN-style G(z) or G(z, y): z (and y) to 4x4, then stride-2 transposed convs up to S.

    layout 'dcgan' (Radford et al.): ngf·2^(n-1) channels at 4x4 from a 4x4 transposed conv
    of z, halved at each doubling, the last one straight to the image. 'wide' (ganflow
    before 0.9, kept so registered models load): a linear projection to ngf·2^n channels
    and a 3x3 conv at full resolution. conditioning 'projection': class-conditional batch
    norm at every level (also with 'planes', which changes only D); 'concat': a label
    embedding concatenated to z."""

    def __init__(
        self,
        z_dim: int,
        channels: int,
        image_size: int,
        ngf: int,
        num_classes: int = 0,
        embed_dim: int = 0,
        layout: str = "dcgan",
        conditioning: str = "concat",
        upsample: str = "transposed",
    ):
        super().__init__()
        n_up = (image_size // 4).bit_length() - 1  # 4 * 2**n_up == image_size
        self.cbn = bool(num_classes) and conditioning in ("projection", "planes")
        concat = bool(num_classes) and not self.cbn
        self.embed = nn.Embedding(num_classes, embed_dim) if concat else None
        in_dim = z_dim + (embed_dim if concat else 0)
        if layout == "wide":
            c0 = ngf * 2**n_up
            self.project = nn.Sequential(
                nn.Linear(in_dim, c0 * 16),
                nn.Unflatten(1, (c0, 4, 4)),
                nn.BatchNorm2d(c0),
                nn.ReLU(),
            )
            widths = [c0 // 2**i for i in range(n_up + 1)]
        else:
            c0 = ngf * 2 ** max(n_up - 1, 0)
            self.project = nn.Sequential(
                nn.Unflatten(1, (in_dim, 1, 1)), nn.ConvTranspose2d(in_dim, c0, 4, 1, 0, bias=False)
            )
            widths = [c0 // 2**i for i in range(n_up)] + [channels]
        if self.cbn:
            # Per-level norms live beside the convs: forward needs y at each of them.
            self.norms = nn.ModuleList(
                ConditionalBatchNorm2d(c, num_classes) for c in widths[: n_up + (layout == "wide")]
            )
            if layout == "wide":
                self.project = self.project[:2]
        elif layout == "dcgan":
            self.project.append(nn.BatchNorm2d(c0))
            self.project.append(nn.ReLU())
        ups: list[nn.Module] = []
        for i in range(n_up):
            last = layout == "dcgan" and i == n_up - 1
            if upsample == "resize":
                ups.append(ResizeConv(widths[i], widths[i + 1], bias=last))
            else:
                ups.append(nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1, bias=last))
            if not last and not self.cbn:
                ups += [nn.BatchNorm2d(widths[i + 1]), nn.ReLU()]
        if layout == "wide":
            ups.append(nn.Conv2d(widths[-1], channels, 3, 1, 1))
        ups.append(nn.Tanh())
        self.net = nn.Sequential(*ups)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)
        h = self.project(z)
        if not self.cbn:
            return self.net(h)
        convs = [m for m in self.net if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d, ResizeConv))]
        h = torch.relu(self.norms[0](h, y))
        for i, conv in enumerate(convs):
            h = conv(h)
            if i + 1 < len(self.norms):
                h = torch.relu(self.norms[i + 1](h, y))
        return torch.tanh(h)


class ConvDiscriminator(nn.Module):
    """DCGAN-style D(x) or D(x, y): stride-2 convolutions down to 4x4, then one logit.

    ``batchnorm``: batch norm after every convolution but the first (Radford et al.). D sees
    real and fake minibatches separately, so its batch statistics are per kind: that lets it
    judge a batch as well as a sample, which punishes a G whose batch lacks variety (measured
    on 32 px shapes: judge FD 244 -> 192 without spectral norm). ``sn``: spectral norm of
    every layer. conditioning 'planes': y as one-hot input planes (the tutorials' DCGAN);
    'projection' (Miyato & Koyama 2018): the logit is ψ(φ(x)) + <embed(y), φ(x)>; 'concat'
    (ganflow before 0.9): a learned label plane.
    """

    def __init__(
        self,
        channels: int,
        image_size: int,
        ndf: int,
        num_classes: int = 0,
        embed_dim: int = 0,
        sn: bool = False,
        conditioning: str = "concat",
        batchnorm: bool = False,
        mbstd: int = 0,
    ):
        super().__init__()
        n_down = (image_size // 4).bit_length() - 1
        projection = bool(num_classes) and conditioning == "projection"
        self.planes = num_classes if conditioning == "planes" else 0
        self.embed = None  # the label plane of 'concat' (named as before projection existed)
        if num_classes and conditioning == "concat":
            self.embed = nn.Embedding(num_classes, image_size * image_size)
        c_in = channels + (1 if self.embed is not None else 0) + self.planes
        layers: list[nn.Module] = []
        c = ndf
        for i in range(n_down):
            norm = batchnorm and i > 0
            layers.append(_sn(nn.Conv2d(c_in, c, 4, 2, 1, bias=not norm), sn))
            if norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2))
            c_in, c = c, c * 2
        if mbstd:  # only when on: registered models keep their module names
            layers.append(MinibatchStd(mbstd))
            c_in += 1
        layers.append(nn.Flatten())
        head = _sn(nn.Linear(c_in * 16, 1), sn)
        # Module names as before projection existed, so registered concat models load.
        self.head = head if projection else None
        self.net = nn.Sequential(*layers) if projection else nn.Sequential(*layers, head)
        self.proj = _sn(nn.Embedding(num_classes, c_in * 16), sn) if projection else None
        self.image_size = image_size

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            plane = self.embed(y).view(-1, 1, self.image_size, self.image_size)
            x = torch.cat([x, plane], dim=1)
        if self.planes:
            s = self.image_size
            onehot = nn.functional.one_hot(y, self.planes).to(x.dtype)
            x = torch.cat([x, onehot[:, :, None, None].expand(-1, -1, s, s)], dim=1)
        h = self.net(x)
        if self.proj is None:
            return h.squeeze(1)
        return self.head(h).squeeze(1) + (self.proj(y) * h).sum(1)


class MinibatchStd(nn.Module):
    """Karras et al. 2018 (ProGAN): split the batch into groups of ``group`` images, take
    each feature's standard deviation over the group, average it to one number per group
    and append it to every image of the group as one more feature map. A batch that lacks
    variety shows as a small number D can read. The group shrinks to the largest divisor
    of the batch (a last, short minibatch; a single image gets 0)."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = math.gcd(self.group, n)
        y = x.view(g, n // g, c, h, w).float()
        y = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # one per group
        y = y.to(x.dtype).view(1, n // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, y], dim=1)


class ResnetBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's generator (Johnson et al. layout): c7s1, n_down stride-2 downs (2 in the paper), n ResNet
    blocks, as many stride-2 ups, c7s1 to tanh. Instance norm, reflection padding."""

    def __init__(self, channels: int, ngf: int, n_blocks: int, n_down: int = 2):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(),
        ]
        c = ngf
        for _ in range(n_down):
            layers += [nn.Conv2d(c, c * 2, 3, 2, 1), nn.InstanceNorm2d(c * 2), nn.ReLU()]
            c *= 2
        layers += [ResnetBlock(c) for _ in range(n_blocks)]
        for _ in range(n_down):
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1),
                nn.InstanceNorm2d(c // 2),
                nn.ReLU(),
            ]
            c //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.): one score per overlapping patch, [N, 1, P, P]."""

    def __init__(self, channels: int, ndf: int, n_layers: int, sn: bool = False):
        super().__init__()
        # With spectral norm, no instance norm (SN-PatchGAN): SN bounds D per weight, and
        # instance norm's per-image statistics would undo part of it.
        norm = nn.Identity if sn else nn.InstanceNorm2d
        layers: list[nn.Module] = [_sn(nn.Conv2d(channels, ndf, 4, 2, 1), sn), nn.LeakyReLU(0.2)]
        c = ndf
        for _ in range(1, n_layers):
            layers += [_sn(nn.Conv2d(c, c * 2, 4, 2, 1), sn), norm(c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [
            _sn(nn.Conv2d(c, c * 2, 4, 1, 1), sn),
            norm(c * 2),
            nn.LeakyReLU(0.2),
            _sn(nn.Conv2d(c * 2, 1, 4, 1, 1), sn),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) for conv/linear weights, as in DCGAN and CycleGAN; norms at (1, 0).
    Spectrally normalised layers keep PyTorch's default init: SN rescales the weight to unit
    spectral norm anyway, and N(0, 0.02) would only change its direction's statistics."""
    for m in module.modules():
        if nn.utils.parametrize.is_parametrized(m):
            continue
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def build_models(cfg: GanConfig) -> dict[str, nn.Module]:
    """The family's networks keyed by the papers' names: {G, D} or {G, F, D_X, D_Y}."""
    m, d = cfg.model, cfg.data
    shape = (d.channels, d.image_size, d.image_size)
    ncls = m.num_classes if cfg.family == "cgan" else 0
    emb = m.embed_dim if ncls else 0
    if cfg.family == "cyclegan":
        models = {
            "G": ResnetGenerator(d.channels, m.ngf, m.n_res_blocks, m.g_downsample),
            "F": ResnetGenerator(d.channels, m.ngf, m.n_res_blocks, m.g_downsample),
            "D_X": PatchDiscriminator(d.channels, m.ndf, m.patch_layers, m.spectral_norm),
            "D_Y": PatchDiscriminator(d.channels, m.ndf, m.patch_layers, m.spectral_norm),
        }
        for net in models.values():
            init_weights(net)
        return models
    if m.arch == "mlp":
        models = {
            "G": MLPGenerator(m.z_dim, shape, m.hidden, m.mlp_layers, ncls, emb),
            "D": MLPDiscriminator(shape, m.hidden, m.mlp_layers, ncls, emb),
        }
        return models  # PyTorch's default (Kaiming-uniform) init suits the MLPs
    models = {
        "G": ConvGenerator(
            m.z_dim,
            d.channels,
            d.image_size,
            m.ngf,
            ncls,
            emb,
            m.g_layout,
            m.conditioning,
            m.g_upsample,
        ),
        "D": ConvDiscriminator(
            d.channels,
            d.image_size,
            m.ndf,
            ncls,
            emb,
            m.spectral_norm,
            m.conditioning,
            m.d_batchnorm,
            m.minibatch_std,
        ),
    }
    for net in models.values():
        init_weights(net)
    return models
