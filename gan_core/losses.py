"""GAN losses as pure functions of tensors: logits in, scalar out.

D outputs logits a, and D(x) = sigmoid(a). Written with softplus so no log(0) is ever taken:
    log D(x)       = log sigmoid(a)     = -softplus(-a)
    log(1 - D(x))  = log sigmoid(-a)    = -softplus(a)
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor


def value_function(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))] (Goodfellow et al., 2014, eq. 1)."""
    return -nnf.softplus(-real_logits).mean() - nnf.softplus(fake_logits).mean()


def discriminator_minimax_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """-V(D, G): D ascends V, so it minimises its negation."""
    return -value_function(real_logits, fake_logits)


def generator_saturating_loss(fake_logits: Tensor) -> Tensor:
    """E_z[log(1 - D(G(z)))], which G minimises. Saturates when D rejects G's samples."""
    return -nnf.softplus(fake_logits).mean()


def generator_non_saturating_loss(fake_logits: Tensor) -> Tensor:
    """-E_z[log D(G(z))]: G maximises log D(G(z)) instead (strong gradients early on)."""
    return nnf.softplus(-fake_logits).mean()


def lsgan_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Least-squares D loss (Mao et al.; CycleGAN's practice): ½(E[(D(y) - 1)²] + E[D(G(x))²])."""
    return 0.5 * ((real_scores - 1).square().mean() + fake_scores.square().mean())


def lsgan_generator_loss(fake_scores: Tensor) -> Tensor:
    """Least-squares G loss: E[(D(G(x)) - 1)²]."""
    return (fake_scores - 1).square().mean()


def hinge_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Hinge D loss (Lim & Ye 2017; Miyato et al. 2018): E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]."""
    return nnf.relu(1 - real_scores).mean() + nnf.relu(1 + fake_scores).mean()


def hinge_generator_loss(fake_scores: Tensor) -> Tensor:
    """Hinge G loss: -E[D(G(z))]."""
    return -fake_scores.mean()


def matching_aware_discriminator_loss(
    d_loss, real_right: Tensor, fake_right: Tensor, real_wrong: Tensor, weight: float
) -> Tensor:
    """GAN-CLS's discriminator (Reed et al. 2016, Algorithm 1): a real image shown with a wrong
    label counts as fake too, so D must judge whether image and label agree, not only whether
    the image looks real. ``d_loss(real, fake)`` is any of the D losses above (each a real term
    plus a fake term); the fake term is split, (1 - w) on G's samples and w on the mismatched
    pairs: L_real + (1 - w)·L_fake(G(z, y), y) + w·L_fake(x, y'). Reed et al. use w = ½."""
    return (1 - weight) * d_loss(real_right, fake_right) + weight * d_loss(real_right, real_wrong)


def r1_penalty(real_scores: Tensor, real_images: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): E_x[‖∇_x D(x)‖²] on real images, without the γ/2 factor.

    real_images must require grad and be what real_scores were computed from; the graph is
    kept (create_graph) so the penalty can be differentiated with respect to D's weights."""
    (grad,) = torch.autograd.grad(real_scores.sum(), real_images, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def cycle_consistency_loss(x: Tensor, x_cycled: Tensor, y: Tensor, y_cycled: Tensor) -> Tensor:
    """L_cyc(G, F) = E_x[||F(G(x)) - x||_1] + E_y[||G(F(y)) - y||_1] (per-pixel mean, as in the code)."""
    return (x_cycled - x).abs().mean() + (y_cycled - y).abs().mean()


def identity_loss(x: Tensor, f_of_x: Tensor, y: Tensor, g_of_y: Tensor) -> Tensor:
    """E_y[||G(y) - y||_1] + E_x[||F(x) - x||_1] (Zhu et al., section 5.2, photo -> painting)."""
    return (g_of_y - y).abs().mean() + (f_of_x - x).abs().mean()


def discriminator_loss(kind: str):
    """The D loss for a LossConfig.gan_loss value."""
    return {
        "minimax": discriminator_minimax_loss,
        "lsgan": lsgan_discriminator_loss,
        "hinge": hinge_discriminator_loss,
    }[kind]


def generator_loss(kind: str, g_loss: str = "non_saturating"):
    """The G loss for LossConfig (gan_loss, g_loss)."""
    if kind == "lsgan":
        return lsgan_generator_loss
    if kind == "hinge":
        return hinge_generator_loss
    return {
        "non_saturating": generator_non_saturating_loss,
        "saturating": generator_saturating_loss,
    }[g_loss]


def decision_boundary(kind: str) -> float:
    """The D output between "real" and "fake" for a gan_loss: 0 for logits (minimax) and
    hinge scores, ½ between LSGAN's targets 0 and 1. ADA's sign(D(x)) is taken about it."""
    return 0.5 if kind == "lsgan" else 0.0


def d_probability(logits: Tensor) -> Tensor:
    """Mean D(x) = sigmoid(logit) of a batch, a cheap training diagnostic."""
    return torch.sigmoid(logits.detach()).mean()
