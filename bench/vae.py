"""Exact, memory-bounded VAE vs ComfyUI's tiled and full-image VAE, at 4096^2 and 8192^2.

FLUX's autoencoder architecture with random weights (bf16 where the GPU supports it),
built by the real ComfyUI (``COMFYUI_PATH``). Per size and direction: seconds and peak
VRAM of the exact path, of ComfyUI's tiled path with the VAEDecodeTiled / VAEEncodeTiled
node defaults, and of the full-image path where it fits; the largest difference of the
exact and tiled results to the full one.

    COMFYUI_PATH=/path/to/ComfyUI python bench/vae.py [--sizes 4096 8192] [--full-max 4096]
    COMFYUI_PATH=/path/to/ComfyUI python bench/vae.py --cards 24 12 --sizes 4096 8192   # emulated cards
    ... --cards 24 --sizes 8192 --passes exact_decode --profile   # seconds per stage and per pinning

With ``--cards``: on each emulated card (``bench/emulated_card.py``: allocator cap, ComfyUI's free
memory scaled), the exact decode and encode as the node runs them (``offload="auto"``: streamed from host
memory where the card lacks room) against ComfyUI's tiled ones, seconds and peak GiB, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from emulated_card import ALLOCATORS, use_allocator

from results_io import comfyui_on_gpu, run_info, write_json


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--full-max", type=int, default=4096, help="largest size to also run the full-image path")
    ap.add_argument("--skip-offload", action="store_true", help="do not time offloaded mode (slow at 8192^2)")
    ap.add_argument("--cards", type=float, nargs="+", help="emulated card sizes, GiB (then only these cells; 0: the "
                    "whole GPU, e.g. for 16384^2)")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="with --cards: seconds per decoder/encoder stage and in "
                    "pinning host memory, and the bus's copy speed")  # fmt: skip
    ap.add_argument("--passes", nargs="+", default=["exact_decode", "tiled_decode", "exact_encode", "tiled_encode"],
                    help="with --cards: which passes")  # fmt: skip
    ap.add_argument("--allocator", choices=list(ALLOCATORS), default="cudaMallocAsync", help="with --cards: "
                    "PyTorch's CUDA allocator (default: ComfyUI's on NVIDIA; bench/emulated_card.py)")  # fmt: skip
    ap.add_argument("--out", help="JSON path (default: bench/results/vae.json)")
    args = ap.parse_args(argv)
    with use_allocator(args.allocator) if args.cards else contextlib.nullcontext():  # before CUDA starts
        comfyui_on_gpu("vae.py")
    if args.cards:
        return on_cards(args)
    import comfy.model_management as mm

    from ultragen.patch.exact_vae import exact_decode, exact_encode

    from random_models import flux_vae

    vae = flux_vae(seed=0)
    mm.load_models_gpu([vae.patcher])
    print(f"VAE dtype {vae.vae_dtype}, device {vae.device}", flush=True)
    rows = []
    for pixels in args.sizes:
        gen = torch.Generator().manual_seed(pixels)
        z = torch.randn(1, 16, pixels // 8, pixels // 8, generator=gen)
        row = {"pixels": pixels}
        exact, row["exact_decode_s"], row["exact_decode_gib"] = timed(lambda z=z: exact_decode(vae, z, offload="never"))
        if not args.skip_offload:
            _, row["offload_decode_s"], row["offload_decode_gib"] = timed(
                lambda z=z: exact_decode(vae, z, offload="always")
            )
        # VAEDecodeTiled defaults: tile 512 px, overlap 64 px -> latent tiles of 64 with overlap 8.
        tiled, row["tiled_decode_s"], row["tiled_decode_gib"] = timed(
            lambda z=z: vae.decode_tiled(z, tile_x=64, tile_y=64, overlap=8)
        )
        if pixels <= args.full_max:

            def full_decode(z=z):
                with torch.inference_mode():
                    out = vae.first_stage_model.decode(z.to(vae.device, vae.vae_dtype))
                return vae.process_output(out.float()).movedim(1, -1).cpu()

            full, row["full_decode_s"], row["full_decode_gib"] = timed(full_decode)
            row["exact_decode_max_diff"] = (exact - full).abs().max().item()
            row["tiled_decode_max_diff"] = (tiled.cpu() - full).abs().max().item()
            del full
        print(f"decode {pixels}: {row}", flush=True)
        image = exact.clamp(0, 1)
        del exact, tiled
        enc, row["exact_encode_s"], row["exact_encode_gib"] = timed(
            lambda im=image: exact_encode(vae, im, offload="never")
        )
        if not args.skip_offload:
            _, row["offload_encode_s"], row["offload_encode_gib"] = timed(
                lambda im=image: exact_encode(vae, im, offload="always")
            )
        tenc, row["tiled_encode_s"], row["tiled_encode_gib"] = timed(
            lambda im=image: vae.encode_tiled(im, tile_x=512, tile_y=512, overlap=64)
        )
        if pixels <= args.full_max:

            def full_encode(im=image):
                x = vae.process_input(im.movedim(-1, 1)).to(vae.device, vae.vae_dtype)
                with torch.inference_mode():
                    return vae.first_stage_model.encode(x).float().cpu()

            fenc, row["full_encode_s"], row["full_encode_gib"] = timed(full_encode)
            scale = fenc.abs().max().item()
            row["exact_encode_max_rel_diff"] = (enc.cpu() - fenc).abs().max().item() / scale
            row["tiled_encode_max_rel_diff"] = (tenc.cpu() - fenc).abs().max().item() / scale
        print(f"encode {pixels}: {row}", flush=True)
        rows.append(row)
        torch.cuda.empty_cache()

    result = {**run_info(), "vae_dtype": str(vae.vae_dtype), "rows": rows}
    out = write_json("vae", result, args.out)
    print(f"\nFLUX VAE architecture (random weights, {vae.vae_dtype}) on {result['device']}")
    print("seconds (peak GPU GiB); largest difference to the full-image result")
    print(
        "| size | pass | exact, GPU | exact, offloaded | ComfyUI tiled | full image | exact vs full | tiled vs full |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for d, diff in (("decode", "max_diff"), ("encode", "max_rel_diff")):

            def cell(mode, d=d, r=r):
                key = f"{mode}_{d}"
                return f"{r[key + '_s']:.1f} ({r[key + '_gib']:.1f})" if key + "_s" in r else "not run"

            ed, td = r.get(f"exact_{d}_{diff}"), r.get(f"tiled_{d}_{diff}")
            print(
                f"| {r['pixels']}² | {d} | {cell('exact')} | {cell('offload')} | {cell('tiled')} | {cell('full')} "
                f"| {'-' if ed is None else f'{ed:.2e}'} | {'-' if td is None else f'{td:.2e}'} |"
            )
    print(f"\nwrote {out}")


STAGES: dict[str, list] = {}
CURRENT = [""]


def profile(attention: bool) -> dict:
    """Time each stage of the exact passes (a tick of their progress bar) and every pinning of host memory; measure
    the bus once (1 GiB each way, pinned); ``attention``: also the middle attention at 8192^2, ComfyUI's vs ours."""
    import ultragen.core.row_major as row_major
    import ultragen.patch.exact_vae as exact_vae

    last = [0.0]
    tick, pin = exact_vae._Runner._tick, row_major.pinned_empty

    def timed_tick(self):
        torch.cuda.synchronize()
        now = time.perf_counter()
        STAGES.setdefault(CURRENT[0], []).append(("stage", round(now - last[0], 3)))
        print(f"  {CURRENT[0]} stage {len(STAGES[CURRENT[0]])}: {now - last[0]:.2f} s", flush=True)
        last[0] = now
        tick(self)

    def timed_pin(shape, dtype):
        t0 = time.perf_counter()
        out = pin(shape, dtype)
        STAGES.setdefault(CURRENT[0], []).append(("pin", round(time.perf_counter() - t0, 3), list(shape),
                                                  out.is_pinned()))  # fmt: skip
        print(f"  {CURRENT[0]} pinned {list(shape)} in {time.perf_counter() - t0:.2f} s ({out.is_pinned()})",
              flush=True)  # fmt: skip
        last[0] += time.perf_counter() - t0
        return out

    def start(runner_init):
        def init(self, *a, **kw):
            torch.cuda.synchronize()
            last[0] = time.perf_counter()
            runner_init(self, *a, **kw)

        return init

    exact_vae._Runner._tick = timed_tick
    exact_vae._Runner.__init__ = start(exact_vae._Runner.__init__)
    row_major.pinned_empty = timed_pin
    host = pin((1 << 29,), torch.bfloat16)
    dev = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    bus = {}
    for name, fn in (("h2d", lambda: dev.copy_(host, non_blocking=True)),
                     ("d2h", lambda: host.copy_(dev, non_blocking=True))):  # fmt: skip
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            fn()
        torch.cuda.synchronize()
        bus[f"{name}_gb_s"] = 4 * 2**30 / (time.perf_counter() - t0) / 1e9
    print(f"bus: {bus}, host pinned: {host.is_pinned()}", flush=True)
    cudart = torch.cuda.cudart()
    for touched in (False, True):  # pinning 4 GiB of fresh host memory, as is and with its pages faulted in first
        t0 = time.perf_counter()
        t = torch.empty(1 << 31, dtype=torch.bfloat16)
        if touched:
            t.zero_()
        t1 = time.perf_counter()
        cudart.cudaHostRegister(t.data_ptr(), 1 << 32, 1)
        t2 = time.perf_counter()
        cudart.cudaHostUnregister(t.data_ptr())
        bus[f"pin_4gib_touched_{touched}_s"] = (t1 - t0, t2 - t1)
        del t
    print(f"pinning 4 GiB (touch, register): {bus}", flush=True)
    if attention:
        bus["attention"] = attention_speed()
    return bus


def attention_speed() -> dict:
    """The VAE's middle attention at 8192^2 (one 512-wide head, 1M tokens): ComfyUI's (SDPA) vs query chunks."""
    import comfy.ldm.modules.diffusionmodules.model as vae_model

    from ultragen.core import long_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 512, 1024, 1024, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    result = {}
    for name, fn in (("comfyui", lambda: vae_model.pytorch_attention(q, k, v)),
                     ("chunked", lambda: long_attention.attention(*(t.flatten(2).transpose(1, 2) for t in (q, k, v)),
                                                                  budget_bytes=2 << 30).transpose(1, 2)
                      .reshape(q.shape))):  # fmt: skip
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result[name] = fn()
        torch.cuda.synchronize()
        print(f"attention {name}: {time.perf_counter() - t0:.2f} s", flush=True)
        result[name + "_s"] = time.perf_counter() - t0
    diff = (result.pop("comfyui").float() - result.pop("chunked").float()).abs().max().item()
    result["max_diff"] = diff
    print(f"attention: {result}", flush=True)
    return result


def on_cards(args) -> None:
    """Exact (auto) vs tiled decode and encode on emulated cards; a cell that runs out of memory says where."""
    import resource
    import traceback

    from emulated_card import Card

    from ultragen.patch.exact_vae import exact_decode, exact_encode

    from random_models import flux_vae

    vae = flux_vae(seed=0)
    card = Card(dynamic=False)
    rows = []
    result = {**run_info(), "vae_dtype": str(vae.vae_dtype), "allocator": args.allocator, "rows": rows}
    if args.profile:
        result["bus"] = profile(attention=8192 in args.sizes)  # 40 s, not spent on a 16384^2 run
    for gib in (None if g == 0 else g for g in args.cards):
        for pixels in args.sizes:
            z = torch.randn(1, 16, pixels // 8, pixels // 8, generator=torch.Generator().manual_seed(pixels))
            image = torch.rand(1, pixels, pixels, 3, generator=torch.Generator().manual_seed(pixels + 1))
            cells = {
                "exact_decode": lambda z=z: exact_decode(vae, z),
                "tiled_decode": lambda z=z: vae.decode_tiled(z, tile_x=64, tile_y=64, overlap=8),
                "exact_encode": lambda im=image: exact_encode(vae, im),
                "tiled_encode": lambda im=image: vae.encode_tiled(im, tile_x=512, tile_y=512, overlap=64),
            }
            row = {"card_gib": gib, "pixels": pixels}
            for name, fn in ((n, f) for n, f in cells.items() if n in args.passes):
                card.set(gib)
                CURRENT[0] = name
                try:
                    _, row[f"{name}_s"], row[f"{name}_gib"] = timed(fn)
                except torch.OutOfMemoryError as exc:
                    frame = traceback.extract_tb(exc.__traceback__)[-1]
                    row[f"{name}_oom"] = f"{frame.filename.split('/')[-1]}:{frame.lineno}"
                # the process's peak resident host memory so far (streamed activations live there)
                row[f"{name}_host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                print(f"{gib or 'whole'} GB {pixels}² {name}: {row.get(f'{name}_s', 'OOM')}", flush=True)
            if args.profile:
                row["stages"] = STAGES.pop("exact_decode", None), STAGES.pop("exact_encode", None)
            for d in ("decode", "encode"):
                if f"exact_{d}_s" in row and f"tiled_{d}_s" in row:
                    row[f"{d}_exact_over_tiled"] = row[f"exact_{d}_s"] / row[f"tiled_{d}_s"]
            rows.append(row)
            write_json("vae-cards", result, args.out)
    card.set(None)
    print("\n| card | size | exact decode | tiled decode | exact / tiled | exact encode | tiled encode "
          "| exact / tiled |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:

        def c(k, r=r):
            if k + "_s" in r:
                return f"{r[k + '_s']:.1f} s, {r[k + '_gib']:.1f} GiB"
            return f"OOM ({r[k + '_oom']})" if k + "_oom" in r else "–"

        ratio = [f"{r[k]:.2f}x" if k in r else "-" for k in ("decode_exact_over_tiled", "encode_exact_over_tiled")]
        label = "whole GPU" if r["card_gib"] is None else f"{r['card_gib']} GB"
        print(f"| {label} | {r['pixels']}² | {c('exact_decode')} | {c('tiled_decode')} | {ratio[0]} "
              f"| {c('exact_encode')} | {c('tiled_encode')} | {ratio[1]} |")  # fmt: skip


if __name__ == "__main__":
    main()
