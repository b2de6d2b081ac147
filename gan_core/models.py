"""Generators and discriminators for the three families, single-device PyTorch.

Shapes: images [N, C, S, S] in [-1, 1] (tanh outputs); noise z [N, z_dim]; labels y [N]
int64. Discriminators return logits/scores [N] (MLP, DCGAN) or [N, 1, P, P] (PatchGAN).
Nothing here knows about ranks or devices: distribution is applied at the edge.
"""

from __future__ import annotations

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


class ConvGenerator(nn.Module):
    """DCGAN-style G: project z (and the label embedding) to 4x4, then double until size S."""

    def __init__(
        self,
        z_dim: int,
        channels: int,
        image_size: int,
        ngf: int,
        num_classes: int = 0,
        embed_dim: int = 0,
    ):
        super().__init__()
        n_up = (image_size // 4).bit_length() - 1  # 4 * 2**n_up == image_size
        c0 = ngf * 2**n_up
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        in_dim = z_dim + (embed_dim if num_classes else 0)
        self.project = nn.Sequential(
            nn.Linear(in_dim, c0 * 16), nn.Unflatten(1, (c0, 4, 4)), nn.BatchNorm2d(c0), nn.ReLU()
        )
        ups: list[nn.Module] = []
        c = c0
        for _ in range(n_up):
            ups += [
                nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(),
            ]
            c //= 2
        ups += [nn.Conv2d(c, channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*ups)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)
        return self.net(self.project(z))


class ConvDiscriminator(nn.Module):
    """DCGAN-style D: stride-2 convolutions down to 4x4, then one logit.

    No batch norm: D sees real and fake minibatches separately, and batch statistics would
    let it tell them apart by batch rather than by sample. For D(x, y) the label embedding is
    broadcast to an extra input plane.
    """

    def __init__(
        self, channels: int, image_size: int, ndf: int, num_classes: int = 0, embed_dim: int = 0
    ):
        super().__init__()
        n_down = (image_size // 4).bit_length() - 1
        self.embed = nn.Embedding(num_classes, image_size * image_size) if num_classes else None
        c_in = channels + (1 if num_classes else 0)
        layers: list[nn.Module] = []
        c = ndf
        for _ in range(n_down):
            layers += [nn.Conv2d(c_in, c, 4, 2, 1), nn.LeakyReLU(0.2)]
            c_in, c = c, c * 2
        layers += [nn.Flatten(), nn.Linear(c_in * 16, 1)]
        self.net = nn.Sequential(*layers)
        self.image_size = image_size

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            plane = self.embed(y).view(-1, 1, self.image_size, self.image_size)
            x = torch.cat([x, plane], dim=1)
        return self.net(x).squeeze(1)


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

    def __init__(self, channels: int, ndf: int, n_layers: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ndf
        for _ in range(1, n_layers):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.InstanceNorm2d(c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [
            nn.Conv2d(c, c * 2, 4, 1, 1),
            nn.InstanceNorm2d(c * 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c * 2, 1, 4, 1, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) for conv/linear weights, as in DCGAN and CycleGAN; norms at (1, 0)."""
    for m in module.modules():
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
            "D_X": PatchDiscriminator(d.channels, m.ndf, m.patch_layers),
            "D_Y": PatchDiscriminator(d.channels, m.ndf, m.patch_layers),
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
        "G": ConvGenerator(m.z_dim, d.channels, d.image_size, m.ngf, ncls, emb),
        "D": ConvDiscriminator(d.channels, d.image_size, m.ndf, ncls, emb),
    }
    for net in models.values():
        init_weights(net)
    return models
