"""Where the noisy latents x_t of each training step come from.

Data-free erasure needs x_t that look like what the model produces for a prompt. ESD gets them by running the
sampler from noise down to a random timestep *at every step* (tens of UNet calls per step). We run the frozen
model's DDIM sampler once per (prompt, trajectory) at the start, keep every intermediate x_t of each trajectory
in a pool, and draw (prompt, trajectory, timestep) triples from the pool at every step: a training step then costs
only the loss forwards. ``FreshTrajectories`` (the ESD way) and ``NoisedImages`` (an image folder pushed through
the forward process) are the alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

LATENT_SOURCES = ("pool", "fresh", "images")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class LatentBatch:
    """x_t with their timesteps and the index of the prompt each belongs to."""

    prompt_index: torch.Tensor  # (B,) long
    latents: torch.Tensor  # (B, C, H, W)
    timesteps: torch.Tensor  # (B,) long (DDPM / DDIM) or float (flow schedulers: sigma x 1000)


@dataclass
class RowTokens:
    """What rows' contexts are encoded from when the text encoder carries the LoRA: each row's prompt tokens and,
    for adversarial rows, the soft prefix in their prefix slots (see :mod:`munba_diffusion.adversarial`)."""

    ids: torch.Tensor  # (B, L) long
    prefix: torch.Tensor | None = None  # (B, k, d) or None


class LatentSource(Protocol):
    def sample(self, batch_size: int, generator: torch.Generator) -> LatentBatch: ...


@dataclass
class SamplerSettings:
    """The frozen model's sampler used to make x_t: steps, classifier-free guidance, latent shape, and the keywords
    of the scheduler's ``set_timesteps`` (FLUX's resolution-dependent shift ``mu``)."""

    steps: int = 25
    guidance_scale: float = 7.5
    latent_shape: tuple[int, int, int] = (4, 64, 64)
    timestep_kwargs: dict = field(default_factory=dict)


DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, context) -> eps


def guided_eps(
    denoise: DenoiseFn,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance: eps(uncond) + s (eps(cond) - eps(uncond)), both in one batched call; the
    conditional prediction alone when ``uncond`` is None (FLUX: no unconditional branch)."""
    if uncond is None:
        return denoise(x, t, cond)
    eps = denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond.expand_as(cond), cond]))
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_trajectory(
    denoise: DenoiseFn,
    scheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    settings: SamplerSettings,
    stop_after: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the sampler (DDIM; the flow models' Euler) from ``noise``; return every x_t fed to the denoiser,
    (S, B, C, H, W), and the timesteps (S,) (integers for DDIM, the flow schedulers' sigma x 1000 otherwise).

    ``stop_after`` = k stops once k x_t have been recorded (ESD's partial trajectory).
    """
    scheduler.set_timesteps(settings.steps, **settings.timestep_kwargs)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    states, times = [], []
    for t in scheduler.timesteps:
        states.append(x.detach().cpu())
        times.append(t.item())
        if stop_after is not None and len(states) >= stop_after:
            break
        tb = torch.full((x.shape[0],), t.item(), device=x.device)
        eps = guided_eps(denoise, scale(x, t), tb, cond, uncond, settings.guidance_scale)
        x = scheduler.step(eps, t, x).prev_sample
    return torch.stack(states), torch.tensor(times)


class TrajectoryPool:
    """Every x_t of ``per_prompt`` frozen-model trajectories for each prompt, made once and reused.

    ``latents`` has shape (P, N, S, C, H, W): prompts x trajectories x sampler steps.
    """

    def __init__(self, latents: torch.Tensor, timesteps: torch.Tensor):
        self.latents, self.timesteps = latents, timesteps

    @classmethod
    def build(
        cls,
        denoise: DenoiseFn,
        scheduler,
        contexts: torch.Tensor,
        uncond: torch.Tensor | None,
        settings: SamplerSettings,
        per_prompt: int,
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 8,
        desc: str = "trajectory pool",
    ) -> "TrajectoryPool":
        """``contexts``: (P, L, D) text embeddings of the P prompts."""
        jobs = [(p, n) for p in range(len(contexts)) for n in range(per_prompt)]
        noise = torch.randn((len(jobs), *settings.latent_shape), generator=generator)
        states = []
        for start in tqdm(range(0, len(jobs), batch_size), desc=desc, leave=False):
            chunk = jobs[start : start + batch_size]
            cond = contexts[torch.tensor([p for p, _ in chunk])].to(device, dtype)
            traj, times = ddim_trajectory(
                denoise,
                scheduler,
                noise[start : start + len(chunk)].to(device, dtype),
                cond,
                None if uncond is None else uncond.to(device, dtype),
                settings,
            )
            states.append(traj.transpose(0, 1))  # (B, S, C, H, W)
        latents = torch.cat(states).view(len(contexts), per_prompt, *states[0].shape[1:])
        return cls(latents.float(), times)

    def sample(self, batch_size: int, generator: torch.Generator) -> LatentBatch:
        p, n, s = self.latents.shape[:3]
        prompt = torch.randint(p, (batch_size,), generator=generator)
        traj = torch.randint(n, (batch_size,), generator=generator)
        step = torch.randint(s, (batch_size,), generator=generator)
        return LatentBatch(prompt, self.latents[prompt, traj, step], self.timesteps[step])


class FreshTrajectories:
    """The ESD way: for every batch, sample from noise down to a random timestep (cost grows with the depth)."""

    def __init__(
        self,
        denoise: DenoiseFn,
        scheduler,
        contexts: torch.Tensor,
        uncond: torch.Tensor | None,
        settings: SamplerSettings,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.denoise, self.scheduler, self.contexts, self.uncond = denoise, scheduler, contexts, uncond
        self.settings, self.device, self.dtype = settings, device, dtype

    def sample(self, batch_size: int, generator: torch.Generator) -> LatentBatch:
        prompt = torch.randint(len(self.contexts), (batch_size,), generator=generator)
        depth = int(torch.randint(1, self.settings.steps + 1, (1,), generator=generator))
        noise = torch.randn((batch_size, *self.settings.latent_shape), generator=generator)
        traj, times = ddim_trajectory(
            self.denoise,
            self.scheduler,
            noise.to(self.device, self.dtype),
            self.contexts[prompt].to(self.device, self.dtype),
            None if self.uncond is None else self.uncond.to(self.device, self.dtype),
            self.settings,
            stop_after=depth,
        )
        return LatentBatch(prompt, traj[-1].float(), times[-1].repeat(batch_size))  # flow timesteps stay floats


ForwardProcess = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # x0 -> (x_t, t)


class NoisedImages:
    """An image folder encoded once by the VAE and pushed through the family's forward process q(x_t | x_0) each
    step (:meth:`munba_diffusion.diffusion.family.ModelFamily.forward_process`)."""

    def __init__(self, clean_latents: torch.Tensor, num_prompts: int, noised: ForwardProcess):
        if len(clean_latents) == 0:
            raise ValueError("the image folder holds no images")
        self.clean_latents, self.num_prompts, self.noised = clean_latents, num_prompts, noised

    def sample(self, batch_size: int, generator: torch.Generator) -> LatentBatch:
        idx = torch.randint(len(self.clean_latents), (batch_size,), generator=generator)
        prompt = torch.randint(self.num_prompts, (batch_size,), generator=generator)
        latents, t = self.noised(self.clean_latents[idx], generator)
        return LatentBatch(prompt, latents, t)


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly in ``directory`` (sorted); a missing or empty folder is a one-line error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image folder {directory} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


@torch.no_grad()
def encode_image_folder(
    vae, directory: str | Path, resolution: int, device: torch.device, dtype: torch.dtype, batch_size: int = 8
) -> torch.Tensor:
    """VAE latents (shifted and scaled as the pipeline's VAE says) of every image in ``directory``, resized to ``resolution``."""
    files = list_images(directory)
    latents = []
    for start in range(0, len(files), batch_size):
        images = []
        for f in files[start : start + batch_size]:
            im = Image.open(f).convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
            images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        x = torch.stack(images).to(device, dtype)
        if dtype == torch.float16 and vae.config.get("force_upcast", False):  # SDXL's VAE overflows in float16
            with torch.autocast(device.type, enabled=False):
                encoded = vae.float().encode(x.float()).latent_dist.mean
            vae.to(dtype)
        else:
            encoded = vae.encode(x).latent_dist.mean
        shift = vae.config.get("shift_factor") or 0.0  # SD3's and FLUX's VAEs shift before scaling
        latents.append((encoded.float().cpu() - shift) * vae.config.scaling_factor)
    return torch.cat(latents)
