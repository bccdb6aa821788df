"""Node "UltraGen Attention Patch": FLUX with windowed attention and low-res guidance."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..core.flow_matching import FLUX_MU_1024
from ..kernels import BACKENDS
from ..patch import PatchOptions, UltraGenFluxPatch, UltraGenPatchError, load_guidance_lora
from .types import UltraGenGuidance

NO_LORA = "none"
D = PatchOptions()  # defaults, from the papers


class UltraGenAttentionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraGenAttentionPatch",
            display_name="UltraGen Attention Patch",
            category="UltraGen",
            description=(
                "Makes FLUX fast and coherent at 2K-8K: every 256-px window attends to its neighbours, the prompt "
                "and the matching part of a low-res guidance copy of the image (which itself sees the whole "
                "picture), instead of to every other pixel. Connect the "
                "guidance from Low-Res Guidance Encode. Each block also runs a slice of the image at a time, so "
                "8K fits a 24 GB card and 4K a 12 GB one (fp8). The model is patched "
                "in place; other LoRAs and patches keep working."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 (dev, schnell, Krea, Kontext) or FLUX.2 (klein, dev) model."),
                UltraGenGuidance.Input(
                    "guidance", optional=True,
                    tooltip="Low-res guidance (Low-Res Guidance Encode). Without it, windows only see their "
                    "neighbours and the prompt: fine for ScaleDiff's NPA mode, weaker structure otherwise.",
                ),
                io.Combo.Input(
                    "guidance_lora", options=[NO_LORA] + folder_paths.get_filename_list("loras"), default=NO_LORA,
                    tooltip="Optional guidance LoRA from models/loras (trained with ultragen-train). It changes only "
                    "the guidance tokens, so your style LoRAs keep working.",
                ),
                io.Float.Input(
                    "lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                    tooltip="Strength of the guidance LoRA.",
                ),
                io.Combo.Input(
                    "mode", options=["ultragen", "npa"], default=D.mode,
                    tooltip="ultragen: windows + neighbours + guidance (UltraGen/Scale-DiT). npa: ScaleDiff's "
                    "Neighborhood Patch Attention, training-free: 32x32-token patches see a 64x64 neighbourhood.",
                ),
                io.Int.Input(
                    "window", default=D.window, min=4, max=128, step=4,
                    tooltip="Window size in tokens (1 token = 16 px). 16 = 256-px windows, as in the paper; larger "
                    "windows see more but cost more.",
                ),
                io.Int.Input(
                    "neighbour_radius", default=D.neighbour_radius, min=0, max=8,
                    tooltip="How many windows around its own a window sees: 1 = 3x3 windows (paper), 0 = only itself "
                    "(fastest, may show seams).",
                ),
                io.Combo.Input(
                    "token_order", options=["window-first", "hilbert"], default=D.token_order,
                    tooltip="Order of windows in memory. Same image either way; hilbert (Scale-DiT) keeps "
                    "neighbouring windows closer, which can help speed with local guidance.",
                ),
                io.Combo.Input(
                    "guidance_scope", options=["global", "local"], default=D.guidance_scope,
                    tooltip="local: each window sees the guidance of its own area and of the windows around it, as "
                    "in the authors' code at every size. global: every window sees the whole guidance image (more "
                    "context; a step takes ~15% longer at 4K and ~70% longer at 8K).",
                ),
                io.Int.Input(
                    "guidance_radius", default=D.guidance_radius, min=0, max=16,
                    tooltip="With local guidance: how many windows around the window's own area of the guidance "
                    "it sees.",
                ),
                io.Combo.Input(
                    "guidance_tokens", options=["noised", "clean"], default=D.guidance_tokens,
                    tooltip="noised: guidance is noised to the current step like the image (training-free use). "
                    "clean: guidance enters un-noised and modulated at timestep 0, as the authors train their "
                    "guidance LoRAs (use it with one of those).",
                ),
                io.Float.Input(
                    "ntk_factor", default=D.ntk_factor, min=1.0, max=100.0, step=0.5,
                    tooltip="NTK scaling of positional encodings (paper: 10). 1 turns it off.",
                ),
                io.Boolean.Input(
                    "constant_shift", default=D.constant_shift,
                    tooltip="Use a fixed FLUX shift at every size (papers). ComfyUI's resolution-dependent shift "
                    "puts every 4K step at full noise.",
                ),
                io.Float.Input(
                    "shift_mu", default=D.shift_mu, min=0.0, max=10.0, step=0.01,
                    tooltip=f"The fixed shift. The default ({FLUX_MU_1024}, FLUX.1's at 1024 px) means the model's "
                    "own: FLUX.2 keeps its 2.02.",
                ),
                io.Combo.Input(
                    "backend", options=list(BACKENDS), default=D.backend,
                    tooltip="Attention implementation. auto picks the fastest here: triton (NVIDIA + Triton), "
                    "flex (PyTorch flex_attention), portable (any device).",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with windowed attention, for the high-res sampler.")],
        )  # fmt: skip

    @classmethod
    def execute(
        cls, model, guidance_lora, lora_strength, mode, window, neighbour_radius, token_order, guidance_scope,
        guidance_radius, guidance_tokens, ntk_factor, constant_shift, shift_mu, backend, guidance=None,
    ) -> io.NodeOutput:  # fmt: skip
        options = PatchOptions(
            mode=mode,
            window=window,
            neighbour_radius=neighbour_radius,
            token_order=token_order,
            guidance_scope=guidance_scope,
            guidance_radius=guidance_radius,
            guidance_tokens=guidance_tokens,
            ntk_factor=ntk_factor,
            constant_shift=constant_shift,
            shift_mu=shift_mu,
            backend=backend,
        )
        lora = None
        if guidance_lora != NO_LORA:
            path = folder_paths.get_full_path("loras", guidance_lora)
            if path is None:
                raise UltraGenPatchError(f"UltraGen Attention Patch: LoRA {guidance_lora!r} is not in models/loras")
            lora = load_guidance_lora(path)
        patch = UltraGenFluxPatch(options, guidance=guidance, lora=lora, lora_strength=lora_strength)
        return io.NodeOutput(patch.apply(model))
