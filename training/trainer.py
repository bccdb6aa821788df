"""Training the guidance LoRA on ComfyUI's FLUX, under the same patch inference uses.

Why this way: the LoRA must learn exactly what "UltraGen Attention Patch" will later ask
of it, so training runs the model through that patch (window-first order, guidance tokens
with scaled positions and NTK RoPE, the windowed layout) with peft adapters on the
guidance rows (``row_lora``). Attention takes a differentiable backend (flex on CUDA,
portable SDPA elsewhere: the Triton kernel is forward-only). Blocks are checkpointed
through ComfyUI's public ``patches_replace`` hook.

Every random draw of micro-batch ``i`` (example, sigma, noise, guidance noise) is seeded
by ``(seed, i)``, so a resumed run continues exactly where the saved one stopped.

Files in ``output_dir``: ``guidance_lora.safetensors`` (what the node loads; rewritten at
each save), ``checkpoints/step_N.safetensors``, ``training_state.pt`` (optimizer, step,
settings; for ``resume``), ``samples/step_N.png``, ``loss.csv``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import comfy.model_management
import comfy.patcher_extension
import torch
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from ..core.flow_matching import FLUX_MU_1024, flow_matching_loss, noised_latent, training_sigmas
from ..patch import Guidance, PatchOptions, UltraGenFluxPatch
from ..patch.call_state import embedding_guidance
from ..patch.flux_family import pixels_per_latent, shift_mu_for
from ..patch.sampling import constant_shift_sigmas
from .dataset import CachedDataset, Example
from .row_lora import GuidanceRows, inject_guidance_lora, load_lora_tensors, lora_tensors
from .settings import TrainingError, TrainSettings

STATE = "training_state.pt"
LORA = "guidance_lora.safetensors"
# Settings a resumed run must share with the saved one.
_FIXED = ("targets", "rank", "alpha", "size", "ratio", "window", "ntk_factor", "batch_size", "grad_accum", "seed")


def _seeded(seed: int, i: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + i) % (2**63))


class GuidanceLoRATrainer:
    """Owns one FLUX ModelPatcher, patched and adapted for training; :meth:`train` runs the loop."""

    def __init__(
        self,
        model,
        dataset: CachedDataset,
        output_dir: Path,
        settings: TrainSettings | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | None = None,
    ):
        self.settings = s = settings or TrainSettings()
        s.check()
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.decode = decode
        self.device = device or comfy.model_management.get_torch_device()
        options = PatchOptions(window=s.window, ntk_factor=s.ntk_factor, constant_shift=False, backend=s.backend)
        self.patch = UltraGenFluxPatch(options, Guidance(dataset.example(0).guidance, s.size, s.size))
        self.model = self.patch.apply(model)
        if s.gradient_checkpointing:
            self._checkpoint_blocks()
        self.model.patch_model(device_to=self.device)
        # What a sampler hands the model: the clone's transformer options with its wrappers.
        self._options = copy.deepcopy(self.model.model_options["transformer_options"])
        comfy.patcher_extension.merge_nested_dicts(
            self._options.setdefault("wrappers", {}), self.model.wrappers, copy_dict1=False
        )
        self.dm = self.model.model.diffusion_model
        self.rows = GuidanceRows(embedding=embedding_guidance)
        self.layers = inject_guidance_lora(self.dm, self.rows, s.targets, s.rank, s.alpha, seed=s.seed)
        self.sigma_shift = s.sigma_shift(flux2=pixels_per_latent(dataset.example(0).latent.shape[1]) == 16)
        self.params = [p for p in self.dm.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=s.learning_rate, weight_decay=s.weight_decay)
        self.step = 0

    # -- the model call ---------------------------------------------------------------------
    def _checkpoint_blocks(self) -> None:
        """Recompute each block in backward. The block is looked up by index here: ComfyUI's
        ``original_block`` closes over its loop variable, which names the last block by the
        time backward recomputes. Blocks add their residuals in place (``txt +=``, ``x +=``, and
        ``img +=`` in ComfyUI 0.29), so each gets a copy of the streams it updates: checkpoint
        keeps the originals for the recomputation."""
        dm = self.model.get_model_object("diffusion_model")

        def double(i):
            def replace(args, extra):
                def run(img, txt, vec, pe):
                    block = dm.double_blocks[i]
                    mask, options = args.get("attn_mask"), args["transformer_options"]
                    return block(
                        img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, attn_mask=mask, transformer_options=options
                    )

                img, txt = checkpoint(run, args["img"], args["txt"], args["vec"], args["pe"], use_reentrant=False)
                return {"img": img, "txt": txt}

            return replace

        def single(i):
            def replace(args, extra):
                def run(img, vec, pe):
                    return dm.single_blocks[i](img.clone(), vec=vec, pe=pe, attn_mask=args.get("attn_mask"),
                                               transformer_options=args["transformer_options"])  # fmt: skip

                return {"img": checkpoint(run, args["img"], args["vec"], args["pe"], use_reentrant=False)}

            return replace

        for i in range(len(dm.double_blocks)):
            self.model.set_model_patch_replace(double(i), "dit", "double_block", i)
        for i in range(len(dm.single_blocks)):
            self.model.set_model_patch_replace(single(i), "dit", "single_block", i)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, example: Example, run: dict) -> torch.Tensor:
        """FLUX's velocity prediction for model-space latent ``x`` (B, C, H, W) at ``sigma`` (B,), in the
        patch run ``run`` (:meth:`_run`)."""
        dtype = self.model.model.get_dtype()
        batch = x.shape[0]
        return self.dm(
            x.to(self.device, dtype),
            sigma.to(self.device, torch.float32),
            context=example.context.to(self.device, dtype),
            y=example.pooled.to(self.device, dtype) if example.pooled.numel() else None,  # FLUX.2: none
            guidance=torch.full((batch,), self.settings.flux_guidance, device=self.device, dtype=dtype),
            transformer_options={**self._options, **run},
        )

    def _run(self, example: Example, noise_seed: int) -> dict:
        """A patch run guided by ``example``'s guidance, its guidance noise drawn from ``noise_seed``."""
        guidance = Guidance(example.guidance, self.settings.size, self.settings.size)
        gh, gw = guidance.grid(self.dm.patch_size)
        self.rows.count = gh * gw
        return self.patch.run_options(noise_seed, guidance)

    def loss(self, i: int, seed: int | None = None) -> torch.Tensor:
        """The flow-matching loss of micro-batch ``i`` (its example, sigma and noise seeded by i and
        ``seed``, default the run's)."""
        s = self.settings
        example = self.dataset.batch(i, s.batch_size)
        gen = _seeded(s.seed if seed is None else seed, i)
        x0 = self.model.model.process_latent_in(example.latent.float())
        noise = torch.randn(x0.shape, generator=gen)
        sigma = training_sigmas(x0.shape[0], self.sigma_shift, gen)
        run = self._run(example, noise_seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
        v = self.velocity(noised_latent(x0, noise, sigma), sigma, example, run)
        return flow_matching_loss(v, x0.to(v.device), noise.to(v.device))

    @torch.no_grad()
    def validation_loss(self, count: int = 4, seed: int = 12345) -> float:
        """Mean loss over ``count`` fixed micro-batches (same examples, sigmas and noise every time)."""
        return sum(self.loss(i, seed).item() for i in range(count)) / count

    # -- the loop ----------------------------------------------------------------------------
    def train(self, until: int | None = None, progress: Callable | None = None) -> float:
        """Optimizer steps from the current step to ``until`` (default: settings.steps); returns the last loss."""
        s = self.settings
        until = s.steps if until is None else until
        self.output_dir.mkdir(parents=True, exist_ok=True)
        loss_value = math.nan
        bar = progress(total=until, initial=self.step) if progress else None
        while self.step < until:
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for j in range(s.grad_accum):
                loss = self.loss(self.step * s.grad_accum + j) / s.grad_accum
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):
                raise TrainingError(f"the loss became {total} at step {self.step + 1}; lower --learning-rate")
            self.optimizer.step()
            self.step += 1
            loss_value = total
            with open(self.output_dir / "loss.csv", "a") as f:
                f.write(f"{self.step},{total:.6f}\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
            if s.save_every and self.step % s.save_every == 0 or self.step == until:
                self.save()
            if self.decode is not None and s.sample_every and self.step % s.sample_every == 0:
                self.save_sample()
        if bar is not None:
            bar.close()
        return loss_value

    # -- files -------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write the LoRA (node format) and the resume state; returns the LoRA path."""
        tensors = lora_tensors(self.dm)
        meta = {"ultragen": json.dumps({"step": self.step, **self._fixed()})}
        (self.output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.output_dir / "checkpoints" / f"step_{self.step:06d}.safetensors"), meta)
        lora = self.output_dir / LORA
        save_file(tensors, str(lora.with_suffix(".tmp")), meta)
        lora.with_suffix(".tmp").replace(lora)
        state = {"step": self.step, "settings": self._fixed(), "sigma_shift": self.sigma_shift,
                 "optimizer": self.optimizer.state_dict()}  # fmt: skip
        torch.save(state, self.output_dir / (STATE + ".tmp"))
        (self.output_dir / (STATE + ".tmp")).replace(self.output_dir / STATE)
        return lora

    def _fixed(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self.settings).items() if k in _FIXED}

    def resume(self) -> int:
        """Continue from ``output_dir``'s saved state; returns the step it continues from."""
        path = self.output_dir / STATE
        if not path.is_file():
            raise TrainingError(f"nothing to resume in {self.output_dir}: no {STATE}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        differ = {k: (v, state["settings"].get(k)) for k, v in self._fixed().items() if state["settings"].get(k) != v}
        if differ:
            listed = ", ".join(f"{k} {old!r} (now {new!r})" for k, (new, old) in differ.items())
            raise TrainingError(f"the saved run was trained with {listed}; resume with the same settings")
        # A run keeps the training sigmas it started with (runs saved before FLUX.2 drew the authors' unshifted
        # sigmas had 1.15 for both families and no record of it); an explicitly set mu must match it.
        started = state.get("sigma_shift", FLUX_MU_1024)
        if self.settings.mu is not None and self.settings.mu != started:
            raise TrainingError(f"the saved run was trained with mu {started!r} (now {self.settings.mu!r}); "
                                "resume with the same settings")  # fmt: skip
        self.sigma_shift = started
        saved = self.output_dir / "checkpoints" / f"step_{state['step']:06d}.safetensors"
        load_lora_tensors(self.dm, load_file(str(saved)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        return self.step

    @torch.no_grad()
    def save_sample(self, index: int = 0) -> Path:
        """Sample dataset example ``index``'s caption with its own guidance (Euler, constant shift) and save it."""
        s = self.settings
        example = self.dataset.example(index)
        run = self._run(example, noise_seed=s.seed)
        mu = FLUX_MU_1024 if s.mu is None else s.mu  # FLUX_MU_1024: the model's own 1024-px shift
        sigmas = constant_shift_sigmas(s.sample_steps, shift_mu_for(example.latent.shape[1], mu))
        x = torch.randn(example.latent.shape, generator=_seeded(s.seed, -1)).to(self.device)
        for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
            v = self.velocity(x, torch.full((x.shape[0],), float(a)), example, run).float()
            x = x + (float(b) - float(a)) * v
        image = self.decode(self.model.model.process_latent_out(x))  # (1, H, W, 3) in [0, 1]
        path = self.output_dir / "samples" / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        Image.fromarray(pixels).save(path)
        return path
