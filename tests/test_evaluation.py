"""ultragen-evaluate's plumbing on tiny random-weight networks (a tiny CLIP, a tiny feature net)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ultragen.evaluation import cli
from ultragen.evaluation.metrics import EvaluationError, LocalCLIP, evaluate, image_files, prompts_for, random_crops

PROMPTS = ["a red square", "a blue circle", "green stripes", "a yellow sun"]

# torchmetrics warns that KID keeps every feature in memory; a handful of test images is meant.
pytestmark = pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")


def byte_chars() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table (the 256 base symbols of CLIP's BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP with random weights, byte-level vocabulary and 32-px images, saved as a local HF folder."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("clip")
    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + 256 for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


class TinyFeatures(torch.nn.Module):
    """Stands in for InceptionV3: uint8 (B, 3, 299, 299) -> (B, 8), random fixed weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 8, 7, stride=4)

    def forward(self, x):
        return self.conv(x.float() / 255).relu().mean((-2, -1))


def write_images(folder, count, seed, size=(96, 80), prompts=True):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        if prompts:
            (folder / f"{i:03d}.txt").write_text(PROMPTS[i % len(PROMPTS)])
    return folder


def test_clip_score_is_the_cosine_of_clip_embeddings(tiny_clip, tmp_path):
    folder = write_images(tmp_path / "gen", 4, seed=0)
    clip = LocalCLIP.load(tiny_clip)
    files = image_files(folder)
    got = evaluate(files, prompts_for(files), None, None, clip)["clip_score"]
    # by hand: each tower, its projection, cosine, x100, clamp at 0, mean
    from ultragen.evaluation.metrics import read_image

    m = clip.model
    pixels = clip.image_processor(images=[read_image(f).permute(1, 2, 0).numpy() for f in files], return_tensors="pt")
    ids = clip.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = m.visual_projection(m.vision_model(pixel_values=pixels["pixel_values"]).pooler_output)
        txt = m.text_projection(m.text_model(**ids).pooler_output)
    want = (100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)).mean().item()
    assert got == pytest.approx(want, abs=1e-4)


def test_fid_kid_and_patch_versions(tmp_path):
    gen = image_files(write_images(tmp_path / "gen", 6, seed=0))
    same = evaluate(gen, None, gen, TinyFeatures(), None, patch_size=32, patches_per_image=3, kid_subset=4)
    assert set(same) == {"fid", "kid", "patch_fid", "patch_kid"}
    assert abs(same["fid"]) < 1e-2  # a set against itself
    from PIL import Image

    other = tmp_path / "flat"
    other.mkdir()
    for i in range(6):
        Image.new("RGB", (96, 80), (40 * i, 200, 90)).save(other / f"{i}.png")
    far = evaluate(
        gen, None, image_files(other), TinyFeatures(), None, patch_size=32, patches_per_image=3, kid_subset=4
    )
    assert far["fid"] > 1e-3 and far["patch_fid"] > 1e-3 and far["kid"] > same["kid"]


def test_fid_kid_stream_their_batches(tmp_path):
    """Each batch reaches the feature network before the next is read (no list of all crops), with the
    same result as the batches given whole."""
    from ultragen.evaluation.metrics import _distances

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (3, 3, 299, 299), generator=g, dtype=torch.uint8) for _ in range(4)]
    features = TinyFeatures()
    calls = []
    features.register_forward_hook(lambda *_: calls.append(1))
    read = []

    def stream(part):
        for b in part:
            assert len(calls) >= 2 * len(read)  # FID and KID saw the previous batch already
            read.append(b)
            yield b

    streamed = _distances(features, stream(batches[:2]), stream(batches[2:]), (6, 6), 4, "cpu")
    whole = _distances(TinyFeatures(), batches[:2], batches[2:], (6, 6), 4, "cpu")
    assert streamed["fid"] == pytest.approx(whole["fid"], rel=1e-6) and len(read) == 4


def test_random_crops_are_windows_of_the_image():
    image = torch.arange(3 * 20 * 30, dtype=torch.int64).view(3, 20, 30).to(torch.uint8)
    crops = random_crops(image, 8, 5, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 8, 8)
    for c in crops:
        hits = [(y, x) for y in range(13) for x in range(23) if torch.equal(image[:, y : y + 8, x : x + 8], c)]
        assert hits
    with pytest.raises(EvaluationError, match="smaller than the 64-px patches"):
        random_crops(image, 64, 1, torch.Generator())


def test_command_reports_and_writes_json(tiny_clip, tmp_path, monkeypatch, capsys):
    gen = write_images(tmp_path / "gen", 4, seed=0)
    ref = write_images(tmp_path / "ref", 4, seed=1, prompts=False)
    monkeypatch.setattr(cli, "inception", lambda path: TinyFeatures())  # the real one: tested where installed
    (tmp_path / "inception.pth").write_bytes(b"x")
    out = tmp_path / "m.json"
    argv = ["--images", str(gen), "--reference", str(ref), "--clip", str(tiny_clip), "--inception",
            str(tmp_path / "inception.pth"), "--patch-size", "32", "--patches-per-image", "2", "--json", str(out),
            "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["images"] == 4 and set(saved) >= {"clip_score", "fid", "kid", "patch_fid", "patch_kid"}
    assert "clip_score" in capsys.readouterr().out


def test_missing_weights_and_inputs_say_what_to_provide(tmp_path, tiny_clip):
    gen = write_images(tmp_path / "gen", 2, seed=0)
    with pytest.raises(SystemExit, match="nothing to compute: pass --clip"):
        cli.main(["--images", str(gen)])
    with pytest.raises(SystemExit, match="download .*weights-inception-2015-12-05-6726825d.pth"):
        cli.main(["--images", str(gen), "--inception", str(tmp_path / "missing.pth")])
    with pytest.raises(SystemExit, match="CLIP model folder in Hugging Face format"):
        cli.main(["--images", str(gen), "--clip", str(tmp_path)])
    (gen / "001.txt").unlink()
    with pytest.raises(SystemExit, match="no prompt for 001.png"):
        cli.main(["--images", str(gen), "--clip", str(tiny_clip), "--device", "cpu"])
    (tmp_path / "p.txt").write_text("only one\n")
    with pytest.raises(SystemExit, match="1 prompts for 2 images"):
        cli.main(["--images", str(gen), "--clip", str(tiny_clip), "--prompts", str(tmp_path / "p.txt")])
    with pytest.raises(SystemExit, match="image folder not found"):
        cli.main(["--images", str(tmp_path / "none"), "--clip", str(tiny_clip)])


def test_real_inception_from_a_local_weights_file(tmp_path, monkeypatch):
    """Where torch-fidelity is installed (ComfyUI's environments): FID's InceptionV3 built from a
    local file (random weights here) yields 2048 features, and FID runs on it."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3", reason="torch-fidelity not installed")
    from ultragen.evaluation.metrics import inception

    # the architecture with random weights (without a path it would download them), saved to a file
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    features = inception(tmp_path / "inception.pth")
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    assert features(x).shape == (2, 2048)
    gen = image_files(write_images(tmp_path / "gen", 3, seed=0, size=(64, 64)))
    result = evaluate(gen, None, gen, features, None, patch_size=32, patches_per_image=1, kid_subset=2)
    assert abs(result["fid"]) < 1e-1
