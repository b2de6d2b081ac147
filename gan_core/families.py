"""The three GAN families as the loop sees them: how to draw a minibatch, what one D update
and one G update are. Each reads like its paper; D's augmentation (``state.augment``) wraps
every image D sees, and R1 (``loss.r1_gamma``) is added to D's loss every ``r1_every``
updates.

Code-to-paper names: G, F (CycleGAN's Y -> X generator), D, D_X, D_Y; k = d_steps;
m = batch_size; λ = lambda_cyc.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gan_core import losses
from gan_core.config import GanConfig
from gan_core.data import ImageSet, MinibatchSampler, UnpairedSet
from gan_core.feed import Feeder, sources_of
from gan_core.state import Batch, Metrics, TrainState, frozen, plain


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al.): D sees a mix of current
    and past fakes. Per image: while the pool fills, store and return it; after that, with
    probability ½ return a stored image and store the new one in its place."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.images: Tensor | None = None
        self.count = 0

    def query(self, images: Tensor) -> Tensor:
        if self.size == 0:
            return images
        if self.images is None:
            self.images = images.new_zeros((self.size, *images.shape[1:]))
        n = images.shape[0]
        # Decisions come from a CPU generator: no device sync, and they checkpoint cleanly.
        coins = torch.rand(n, generator=self.generator).tolist()
        slots = torch.randint(0, self.size, (n,), generator=self.generator).tolist()
        out = images.clone()
        for i in range(n):
            if self.count < self.size:
                self.images[self.count] = images[i]
                self.count += 1
            elif coins[i] > 0.5:
                j = slots[i]
                out[i] = self.images[j]
                self.images[j] = images[i]
        return out

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state(), "count": self.count}
        if self.images is not None:
            state["images"] = self.images
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.count = int(state["count"])
        self.images = state.get("images")


# No generator forward is shared between D's and G's updates. Each of the k D updates draws
# fresh z and a fresh data minibatch (Algorithm 1), so no two of them see the same fakes; and
# G's update needs D *after* its k-th step, on fresh z, with a graph through G: the k-th D
# update's fakes were made under no_grad for other z, so reusing them would change the
# algorithm, not just its cost. What is exact and kept: D's update builds no graph through G.


def _r1_due(state: TrainState) -> bool:
    lc = state.cfg.loss
    return lc.r1_gamma > 0 and state.d_updates % lc.r1_every == 0


def _r1_term(state: TrainState, D: nn.Module, real: Tensor, *cond: Tensor) -> Tensor:
    """Lazy R1 on freshly augmented reals (its own pass, as stylegan2-ada's "Dreg" phase),
    scaled by γ/2 and by the interval. Through the plain D: DDP does not support
    autograd.grad; the weight gradients still meet the main loss's in one backward."""
    lc = state.cfg.loss
    x = real.detach().requires_grad_(True)
    with state.autocast():
        scores = plain(D)(state.augment(x), *cond)
    return losses.r1_penalty(scores.float(), x) * (lc.r1_gamma / 2 * lc.r1_every)


def _wrong_labels(state: TrainState, labels: Tensor) -> Tensor:
    """For each label y another class y' != y, uniform over the other k - 1, from the noise
    stream (checkpointed, so a resumed run draws the same)."""
    k = state.cfg.model.num_classes
    shift = torch.randint(1, k, labels.shape, generator=state.noise, device=state.device)
    return (labels + shift) % k


class Family:
    """What a GAN variant plugs into the loop. Subclasses override the four hooks."""

    name: str = ""
    generators: tuple[str, ...] = ("G",)
    discriminators: tuple[str, ...] = ("D",)
    g_uses_data = False
    """Whether G's update needs a data minibatch (labels for the cGAN, real x, y for CycleGAN)."""

    def samplers(
        self, cfg: GanConfig, data, rank: int, world_size: int
    ) -> dict[str, MinibatchSampler]:
        seed = cfg.train.seed * 1_000_003 + 1
        return {"x": MinibatchSampler(len(data), cfg.train.batch_size, seed, rank, world_size)}

    def sources(self, data) -> dict[str, ImageSet]:
        """The sets minibatches are drawn from, by sampler key ("x" carries the labels)."""
        return sources_of(data)

    def next_batch(self, state: TrainState, data) -> Batch:
        """One fresh minibatch, read now (the loop's :class:`Feeder` reads ahead)."""
        return Feeder(state, data).next(ahead=False)

    def d_step(self, state: TrainState, batch: Batch) -> Metrics:
        raise NotImplementedError

    def g_step(self, state: TrainState, batch: Batch | None) -> Metrics:
        raise NotImplementedError


class GanFamily(Family):
    """Goodfellow et al. (2014): G(z), D(x)."""

    name = "gan"

    def _labels(self, batch: Batch | None) -> tuple[Tensor, ...]:
        return ()

    def d_step(self, state: TrainState, batch: Batch) -> Metrics:
        G, D, aug = state.models["G"], state.models["D"], state.augment
        y = self._labels(batch)
        with torch.no_grad(), state.autocast():  # no graph through G in D's update
            fake = G(state.z(batch.x.shape[0]), *y)
        d_loss = losses.discriminator_loss(state.cfg.loss.gan_loss)
        w = state.cfg.loss.mismatch if y and state.cfg.model.num_classes > 1 else 0.0
        with state.autocast():
            real = aug(batch.x)
            real_logits = D(real, *y)
            fake_logits = D(aug(fake), *y)
            if w:  # the same augmented reals, each with a label it does not have
                wrong_logits = D(real, _wrong_labels(state, y[0]))
        if w:
            loss = losses.matching_aware_discriminator_loss(
                d_loss, real_logits.float(), fake_logits.float(), wrong_logits.float(), w
            )
        else:
            loss = d_loss(real_logits.float(), fake_logits.float())
        metrics = {"loss_D": loss.detach()}
        if _r1_due(state):
            r1 = _r1_term(state, D, batch.x, *y)
            loss = loss + r1
            metrics["r1"] = r1.detach()
        state.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        state.opt_d.step()
        aug.observe(real_logits)
        metrics["D_real"] = losses.d_probability(real_logits)
        metrics["D_fake"] = losses.d_probability(fake_logits)
        return metrics

    def g_step(self, state: TrainState, batch: Batch | None) -> Metrics:
        G, D = state.models["G"], plain(state.models["D"])
        y = self._labels(batch)
        m = state.cfg.train.batch_size
        with frozen(D), state.autocast():
            fake_logits = D(state.augment(G(state.z(m), *y)), *y)
        loss = losses.generator_loss(state.cfg.loss.gan_loss, state.cfg.loss.g_loss)(
            fake_logits.float()
        )
        state.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        state.opt_g.step()
        return {"loss_G": loss.detach()}


class CganFamily(GanFamily):
    """Mirza & Osindero (2014): G(z, y), D(x, y), y ~ p_data(y) drawn with the minibatch."""

    name = "cgan"
    g_uses_data = True  # G's labels are the labels of a fresh data minibatch: y ~ p_data(y)

    def _labels(self, batch: Batch | None) -> tuple[Tensor, ...]:
        if batch is None or batch.labels is None:
            raise ValueError("the cgan family needs a labelled dataset")
        return (batch.labels,)


class CycleGanFamily(Family):
    """Zhu et al. (2017): G: X -> Y, F: Y -> X, D_Y judges Y, D_X judges X."""

    name = "cyclegan"
    generators = ("G", "F")
    discriminators = ("D_X", "D_Y")
    g_uses_data = True

    def samplers(
        self, cfg: GanConfig, data: UnpairedSet, rank: int, world_size: int
    ) -> dict[str, MinibatchSampler]:
        seed = cfg.train.seed * 1_000_003
        m = cfg.train.batch_size
        return {
            "x": MinibatchSampler(len(data.x), m, seed + 1, rank, world_size),
            "y": MinibatchSampler(len(data.y), m, seed + 2, rank, world_size),
        }

    def d_step(self, state: TrainState, batch: Batch) -> Metrics:
        mo, aug = state.models, state.augment
        with torch.no_grad(), state.autocast():
            fake_y, fake_x = mo["G"](batch.x), mo["F"](batch.y)
        fake_y = state.pools["Y"].query(fake_y.float())
        fake_x = state.pools["X"].query(fake_x.float())
        d_loss = losses.discriminator_loss(state.cfg.loss.gan_loss)
        with state.autocast():
            real_y, real_x = mo["D_Y"](aug(batch.y)), mo["D_X"](aug(batch.x))
            scores_fake_y, scores_fake_x = mo["D_Y"](aug(fake_y)), mo["D_X"](aug(fake_x))
        loss_d_y = d_loss(real_y.float(), scores_fake_y.float())
        loss_d_x = d_loss(real_x.float(), scores_fake_x.float())
        total = loss_d_x + loss_d_y
        metrics = {"loss_D_X": loss_d_x.detach(), "loss_D_Y": loss_d_y.detach()}
        if _r1_due(state):
            r1 = _r1_term(state, mo["D_Y"], batch.y) + _r1_term(state, mo["D_X"], batch.x)
            total = total + r1
            metrics["r1"] = r1.detach()
        state.opt_d.zero_grad(set_to_none=True)
        total.backward()
        state.opt_d.step()
        aug.observe(torch.cat([real_y.flatten(), real_x.flatten()]))
        return metrics

    def g_step(self, state: TrainState, batch: Batch | None) -> Metrics:
        assert batch is not None and batch.y is not None
        G, F = state.models["G"], state.models["F"]
        D_X, D_Y = plain(state.models["D_X"]), plain(state.models["D_Y"])
        lc, aug = state.cfg.loss, state.augment
        g_loss = losses.generator_loss(lc.gan_loss, lc.g_loss)
        x, y = batch.x, batch.y
        with frozen(D_X, D_Y), state.autocast():
            fake_y, fake_x = G(x), F(y)
            cycled_x, cycled_y = F(fake_y), G(fake_x)
            adv_g = g_loss(D_Y(aug(fake_y)).float())  # L_GAN(G, D_Y, X, Y), G's side
            adv_f = g_loss(D_X(aug(fake_x)).float())  # L_GAN(F, D_X, Y, X), F's side
            cyc = losses.cycle_consistency_loss(x, cycled_x.float(), y, cycled_y.float())
            total = adv_g + adv_f + lc.lambda_cyc * cyc
            metrics = {"loss_G": adv_g.detach(), "loss_F": adv_f.detach(), "loss_cyc": cyc.detach()}
            if lc.lambda_id > 0:
                idt = losses.identity_loss(x, F(x).float(), y, G(y).float())
                total = total + lc.lambda_cyc * lc.lambda_id * idt
                metrics["loss_idt"] = idt.detach()
        state.opt_g.zero_grad(set_to_none=True)
        total.backward()
        state.opt_g.step()
        metrics["loss_G_total"] = total.detach()
        return metrics


FAMILIES: dict[str, Family] = {f.name: f for f in (GanFamily(), CganFamily(), CycleGanFamily())}
