"""The demo's models, trained on the demo's world and saved in the real checkpoint formats.

    python -m tessera.demo.world_models --out tessera/models/world_weights   # train, write SHA256SUMS
    python -m tessera.demo.world_models --check                               # retrain, compare sha256

Four models learn from pictures of `world` (a training seed of their own, never the demo's):
an open_clip CLIP trained contrastively with open_clip's ClipLoss; the LAION-layout aesthetic
head regressed on that CLIP's image embeddings (clean pictures high, noisy, blurred and blank
ones low); the LAION-layout watermark detector (timm) trained to tell overlays apart; and a
LLaVA (CLIP vision tower, Llama) trained to describe a picture in the captions' grammar. Each is
saved where and how its loader reads it (open_clip folder, `.safetensors` state dicts, HF
`save_pretrained`). Training is bit-for-bit reproducible on a CPU: fixed seeds, one thread,
deterministic algorithms, so `--check` retrains and compares the files' sha256. Bit for bit holds
on the CPU the weights were trained on (PINNED_CPU beside them names it): another CPU's float
kernels sum in another order and give other bits. On any CPU, tests/test_world_models.py retrains
the models and checks that they do their jobs as the shipped ones do, within stated tolerances.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from tessera.demo import world
from tessera.demo.truth import parse_caption
from tessera.models.aesthetic import AestheticHead, load_aesthetic
from tessera.models.clip import (
    CONFIG_FILE,
    OPENAI_MEAN,
    OPENAI_STD,
    Clip,
    ClipPreprocess,
)
from tessera.models.llava import build_llava, load_llava, prompt_text
from tessera.models.watermark import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY_ARCH,
    build_detector,
    load_watermark,
    pwatermark,
)
from tessera.models.watermark import preprocess as watermark_preprocess

log = logging.getLogger(__name__)

TRAIN_SEED = 101      # the world the models learn from
EVAL_SEED = 202       # a held-out slice of the world, for the tests and the thresholds
CLIP_ARCH = "tessera-world-clip"
# A small ResNet tower (open_clip's ModifiedResNet, as in OpenAI's RN50): its 3x3 convolutions see
# noise and blur, which a two-layer ViT of 16px patches did not.
CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 12, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLIP_SIZE = 64
CAPTIONER_SIZE = CLIP_SIZE  # the captioner's processor crops as CLIP's does: it reads CLIP's input
# The captioner: CAPTIONER_SIZE px pictures in patches of `patch` px, a CLIP tower and a Llama.
CAPTIONER = {"image_size": CAPTIONER_SIZE, "patch": 8, "vision_width": 64, "vision_layers": 2,
             "text_width": 64, "text_layers": 2, "feature_layer": -1, "max_positions": 256}
WATERMARK_SIZE = 96
CAPTION_PROMPT = "Describe this image in as much detail as possible."
# Captions the CLIP learns for low-aesthetic pictures: they say what is wrong and nothing of the
# shape, so quality becomes a direction of the embedding that a linear aesthetic head can read.
DEGRADED_CAPTIONS = {"noise": "a noisy picture", "blur": "a blurry picture", "blank": "a blank picture"}
# The aesthetic head's targets (the LAION scale runs from about 1 to 10).
AESTHETIC_GOOD, AESTHETIC_BAD = 7.0, 2.0
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "world_weights")
SUMS = "SHA256SUMS"
PINNED = "PINNED_CPU"  # the CPU (and torch build) the shipped weights' sha256 sums were made on


def deterministic(seed: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


# The training pictures --------------------------------------------------------------------------
@dataclass
class WorldImages:
    """Rendered pictures, preprocessed once for each model's input."""

    pictures: list[world.Picture]
    kinds: list[str]          # "clean", "watermark" or "low_aesthetic"
    details: list[str]
    clip: np.ndarray          # (N, 64, 64, 3) uint8, CLIP's (and the captioner's) input
    copies: np.ndarray        # (N, 64, 64, 3) uint8, a near-duplicate of each picture as CLIP sees it
    watermark: np.ndarray     # (N, 96, 96, 3) uint8, the watermark detector's input

    def captions(self) -> list[str]:
        return [p.caption for p in self.pictures]

    def clip_captions(self) -> list[str]:
        return [DEGRADED_CAPTIONS[d] if k == world.LOW_AESTHETIC else p.caption
                for p, k, d in zip(self.pictures, self.kinds, self.details)]


def served(img, quality: int = 92):
    """The picture as the demo's loopback server sends it: a JPEG."""
    from PIL import Image

    return Image.open(io.BytesIO(world.encode(img, "JPEG", quality=quality))).convert("RGB")


def world_images(n: int, seed: int) -> WorldImages:
    """`n` pictures: 55% clean, 20% watermarked, 25% degraded, each with a near-duplicate copy."""

    rng = random.Random(seed)
    clip_pre = ClipPreprocess(CLIP_SIZE)
    pictures, kinds, details = [], [], []
    clip = np.zeros((n, CLIP_SIZE, CLIP_SIZE, 3), np.uint8)
    copies = np.zeros_like(clip)
    wm = np.zeros((n, WATERMARK_SIZE, WATERMARK_SIZE, 3), np.uint8)
    for i in range(n):
        p = world.random_picture(rng)
        # At half size (every defect scales with the picture): the inputs are 64 and 96 px.
        img = world.draw(dataclasses.replace(p, width=p.width // 2, height=p.height // 2))
        u = rng.random()
        if u < 0.2:
            kind, detail = world.WATERMARK, rng.choice(world.DETAILS[world.WATERMARK])
            img = world.add_watermark(img, rng, detail)
        elif u < 0.45:
            kind, detail = world.LOW_AESTHETIC, rng.choice(world.DETAILS[world.LOW_AESTHETIC])
            img = world.degrade(img, rng, detail)
        else:
            kind, detail = "clean", ""
        copy, quality = world.copy_variant(img, rng, rng.choice(world.DETAILS[world.NEAR_DUPLICATE]))
        img = served(img)
        pictures.append(p)
        kinds.append(kind)
        details.append(detail)
        clip[i] = clip_pre(img)
        copies[i] = clip_pre(served(copy, quality))
        wm[i] = watermark_preprocess(img, WATERMARK_SIZE)
    return WorldImages(pictures, kinds, details, clip, copies, wm)


def batches(n: int, batch_size: int, steps: int, seed: int):
    """`steps` batches of indices, epoch after epoch, each epoch shuffled by `seed`."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        yield order[:batch_size]
        order = order[batch_size:]


def update(opt, loss: torch.Tensor, name: str, step: int, steps: int, every: int) -> None:
    """One optimizer step on `loss`, logged every `every` steps and at the last."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % every == 0 or step == steps - 1:
        log.info("%s step %d loss %.4f", name, step, loss.item())


def cosine_lr(opt, step: int, steps: int, lr: float, warmup: int) -> None:
    scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup)))
    for group in opt.param_groups:
        group["lr"] = lr * scale


# CLIP ----------------------------------------------------------------------------------------------
def new_clip():
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault(CLIP_ARCH, CLIP_CONFIG)
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(CLIP_ARCH, pretrained=None), open_clip.get_tokenizer(CLIP_ARCH)
    finally:
        logging.disable(logging.NOTSET)


def train_clip(data: WorldImages, steps: int = 400, batch_size: int = 64, lr: float = 2e-3, copy_weight: float = 2.0,
               quality_weight: float = 1.0, seed: int = 0):
    """open_clip's contrastive loss on (picture, caption) pairs, plus two terms the world needs:
    the same loss on (picture, its near-duplicate) pairs, since captions alone map every picture of
    one description to one point and the dedup filter must tell a copy from a look-alike; and a
    linear probe that reads quality (clean or degraded) from the embedding, so that the aesthetic
    head, which is linear in the embedding as LAION's is, finds quality there."""
    from open_clip.loss import ClipLoss


    deterministic(seed)
    model, tokenizer = new_clip()
    tokens = tokenizer(data.clip_captions())
    pre = ClipPreprocess(CLIP_SIZE)
    pixels, copies = pre.normalize(torch.from_numpy(data.clip)), pre.normalize(torch.from_numpy(data.copies))
    loss_fn = ClipLoss()
    probe = torch.nn.Linear(CLIP_CONFIG["embed_dim"], 1)
    good = torch.tensor([k != world.LOW_AESTHETIC for k in data.kinds], dtype=torch.float32)
    opt = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=lr, weight_decay=0.1)
    model.train()
    for step, idx in enumerate(batches(len(tokens), batch_size, steps, seed)):
        cosine_lr(opt, step, steps, lr, warmup=30)
        features, text_features, logit_scale = model(torch.cat([pixels[idx], copies[idx]]), tokens[idx])
        image_features, copy_features = features.chunk(2)
        loss = loss_fn(image_features, text_features, logit_scale)
        if copy_weight:
            loss = loss + copy_weight * loss_fn(image_features, copy_features, logit_scale)
        if quality_weight:
            loss = loss + quality_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                probe(image_features).squeeze(-1), good[idx])
        update(opt, loss, "clip", step, steps, every=100)
    return model.eval()


def save_clip(model, path: str) -> None:
    from safetensors.torch import save_file


    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"model_cfg": CLIP_CONFIG,
                   "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}, f, indent=2)
    # Half precision keeps the (mostly unused) 49k-token embedding small; the loader casts back.
    state = {k: (v.half() if v.is_floating_point() else v).detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "open_clip_model.safetensors"))


@torch.inference_mode()
def clip_image_embeddings(model, clip_pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    pre = ClipPreprocess(CLIP_SIZE)
    out = [torch.nn.functional.normalize(model.encode_image(pre.normalize(torch.from_numpy(clip_pixels[i:i + batch_size]))), dim=-1)
           for i in range(0, len(clip_pixels), batch_size)]
    return torch.cat(out).numpy()


# Aesthetic head -----------------------------------------------------------------------------------
def train_aesthetic(embeddings: np.ndarray, kinds: list[str], steps: int = 600, lr: float = 5e-3, seed: int = 0):
    deterministic(seed)
    head = AestheticHead(embeddings.shape[1])
    x = torch.from_numpy(embeddings).float()
    y = torch.tensor([AESTHETIC_BAD if k == world.LOW_AESTHETIC else AESTHETIC_GOOD for k in kinds])
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    head.train()
    for step, idx in enumerate(batches(len(x), 256, steps, seed)):
        loss = torch.nn.functional.mse_loss(head(x[idx]), y[idx])
        update(opt, loss, "aesthetic", step, steps, every=200)
    return head.eval()


# Watermark detector -------------------------------------------------------------------------------
def train_watermark(data: WorldImages, steps: int = 800, batch_size: int = 32, lr: float = 5e-3, seed: int = 0):
    deterministic(seed)
    model = build_detector(TINY_ARCH)
    mean = torch.from_numpy(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.from_numpy(IMAGENET_STD).view(1, 3, 1, 1)
    # Class 0 is "watermark", as in LAION's detector (pwatermark = softmax[:, 0]).
    labels = torch.tensor([0 if k == world.WATERMARK else 1 for k in data.kinds])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for step, idx in enumerate(batches(len(labels), batch_size, steps, seed)):
        cosine_lr(opt, step, steps, lr, warmup=30)
        x = (torch.from_numpy(data.watermark[idx.numpy()]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
        update(opt, loss, "watermark", step, steps, every=100)
    return model.eval()


# Captioner ----------------------------------------------------------------------------------------
def new_llava(seed: int = 0, **sizes):
    """An untrained LLaVA of the captioner's sizes (CAPTIONER, or `sizes` instead) and its processor."""

    return build_llava(**{**CAPTIONER, **sizes}, prompt=CAPTION_PROMPT, seed=seed)


def caption_batch(processor, images: np.ndarray, captions: list[str]):
    """Inputs and labels: the prompt (with its image tokens) is context, the caption is learned."""

    prompt = prompt_text(processor, CAPTION_PROMPT)
    tok = processor.tokenizer
    texts = [f"{prompt} {c}.{tok.eos_token}" for c in captions]
    tok.padding_side = "right"
    try:
        inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        prompt_len = processor(images=list(images[:1]), text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    finally:
        tok.padding_side = "left"
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_len] = -100
    labels[inputs["attention_mask"] == 0] = -100
    return inputs, labels


def warm_up_vision(model, pixel_values: torch.Tensor, pictures: list[world.Picture], steps: int, batch_size: int,
                   lr: float, seed: int) -> None:
    """Train the vision tower alone to tell the shapes apart (a linear head on its mean patch feature).
    A tower this small, trained from scratch, needs thousands of steps before it sees shapes, and a step
    here costs a fraction of a LLaVA step; colours, background and place the LLaVA learns by itself."""
    tower = model.model.vision_tower
    target = torch.tensor([world.SHAPES.index(p.shape) for p in pictures])
    head = torch.nn.Linear(tower.config.hidden_size, len(world.SHAPES))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.01)
    tower.train()
    for step, idx in enumerate(batches(len(pictures), batch_size, steps, seed)):
        features = tower(pixel_values[idx]).last_hidden_state[:, 1:].mean(1)
        loss = torch.nn.functional.cross_entropy(head(features), target[idx])
        update(opt, loss, "llava vision warm-up", step, steps, every=500)


def train_llava(data: WorldImages, steps: int = 700, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                warm_up_steps: int = 12000, warm_up_lr: float = 1e-3, **sizes):
    deterministic(seed)
    model, processor = new_llava(seed, **sizes)
    clean = [i for i, k in enumerate(data.kinds) if k != world.LOW_AESTHETIC]
    inputs, labels = caption_batch(processor, data.clip[clean], [data.pictures[i].caption for i in clean])
    if warm_up_steps:
        warm_up_vision(model, inputs["pixel_values"], [data.pictures[i] for i in clean], warm_up_steps,
                       batch_size, warm_up_lr, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for step, idx in enumerate(batches(len(clean), batch_size, steps, seed)):
        cosine_lr(opt, step, steps, lr, warmup=50)
        loss = model(**{k: v[idx] for k, v in inputs.items()}, labels=labels[idx]).loss
        update(opt, loss, "llava", step, steps, every=100)
    return model.eval(), processor


# Measured on a held-out slice of the world, through the real loaders -----------------------------
def eval_images(n: int, seed: int = EVAL_SEED) -> tuple[list[world.WorldSample], np.ndarray, np.ndarray]:
    """The first `n` samples of world `seed` as the demo plants them (defects, captions), rendered
    at half size, as CLIP and watermark-detector inputs."""

    samples = [world.world_sample(i, seed) for i in range(n)]
    clip_pre = ClipPreprocess(CLIP_SIZE)
    clip = np.zeros((n, CLIP_SIZE, CLIP_SIZE, 3), np.uint8)
    wm = np.zeros((n, WATERMARK_SIZE, WATERMARK_SIZE, 3), np.uint8)
    for i, s in enumerate(samples):
        p = s.picture
        half = dataclasses.replace(s, picture=dataclasses.replace(p, width=p.width // 2, height=p.height // 2))
        img = served(*world.render_with_quality(half, seed))
        clip[i] = clip_pre(img)
        wm[i] = watermark_preprocess(img, WATERMARK_SIZE)
    return samples, clip, wm


def evaluate(folder: str, n: int = 400, captions: int = 48) -> dict:
    """Scores of the models in `folder` (loaded as the stages load them) on a held-out slice."""

    torch.set_num_threads(1)
    samples, clip_pixels, wm_pixels = eval_images(n)
    kinds = np.array([s.defect or "clean" for s in samples])
    clip = Clip(CLIP_ARCH, os.path.join(folder, "clip"))
    image_emb = clip.encode_images(clip_pixels)
    clip_score = np.sum(image_emb * clip.encode_texts([s.caption for s in samples]), axis=1)
    with torch.inference_mode():
        aesthetic = load_aesthetic(os.path.join(folder, "aesthetic", "aesthetic.safetensors"))(
            torch.from_numpy(image_emb)).numpy()
        detector = load_watermark(os.path.join(folder, "watermark", "watermark.safetensors"), TINY_ARCH)
        pwm = np.concatenate([pwatermark(detector, torch.from_numpy(wm_pixels[i:i + 64])).numpy()
                              for i in range(0, n, 64)])
    # Near-duplicates: each planted copy against its original, and clean pictures against each other.
    dup_sims = []
    for i, s in enumerate(samples):
        if s.defect == world.NEAR_DUPLICATE and s.duplicate_of is not None and s.duplicate_of < n:
            dup_sims.append(float(image_emb[i] @ image_emb[s.duplicate_of]))
    clean = np.flatnonzero(kinds == "clean")
    sims = image_emb[clean] @ image_emb[clean].T
    np.fill_diagonal(sims, -1.0)
    generated, right = evaluate_captions(os.path.join(folder, "llava"), [samples[i].picture for i in clean[:captions]],
                                         clip_pixels[clean[:captions]])
    return {"kinds": kinds, "clip_score": clip_score, "aesthetic": aesthetic, "pwatermark": pwm,
            "duplicate_similarity": np.array(dup_sims), "clean_nearest_similarity": sims.max(axis=1),
            "captions": generated, "caption_accuracy": right}


def evaluate_captions(folder: str, truth: list[world.Picture], images: np.ndarray, batch_size: int = 48):
    """Captions of `images` (generated greedily as the caption stage does) and the share of them that
    name each of the truth's colour, shape, background and place right."""

    model, processor = load_llava(folder)
    text = prompt_text(processor, CAPTION_PROMPT)
    generated = []
    for i in range(0, len(images), batch_size):
        inputs = processor(images=list(images[i:i + batch_size]), text=[text] * len(images[i:i + batch_size]),
                           return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=20, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        generated += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    parsed = [parse_caption(g) for g in generated]
    right = {f: float(np.mean([getattr(t, f) == p[f] for t, p in zip(truth, parsed)]))
             for f in ("color", "shape", "background", "place")}
    right["color_and_shape"] = float(np.mean([t.color == p["color"] and t.shape == p["shape"]
                                              for t, p in zip(truth, parsed)]))
    return generated, right


def summarize(ev: dict) -> dict:
    """Thresholds that keep 99% of the clean pictures, and what each catches of its defect."""
    kinds = ev["kinds"]
    clean = kinds == "clean"
    out = {}
    for score, defect, higher in (("clip_score", world.MISMATCHED_CAPTION, True),
                                  ("aesthetic", world.LOW_AESTHETIC, True),
                                  ("pwatermark", world.WATERMARK, False)):
        values = ev[score]
        t = float(np.quantile(values[clean], 0.01 if higher else 0.99))
        caught = values[kinds == defect] < t if higher else values[kinds == defect] > t
        out[score] = {"threshold_keeping_99pct_clean": round(t, 4), "caught": round(float(caught.mean()), 4),
                      "clean_median": round(float(np.median(values[clean])), 4),
                      "defect_median": round(float(np.median(values[kinds == defect])), 4)}
    copy_p5 = float(np.quantile(ev["duplicate_similarity"], 0.05))
    out["near_duplicate"] = {"threshold_catching_95pct_copies": round(copy_p5, 4),
                             "clean_with_a_look_alike_above_it": round(float(np.mean(
                                 ev["clean_nearest_similarity"] >= copy_p5)), 4)}
    out["captions"] = {k: round(v, 4) for k, v in ev["caption_accuracy"].items()}
    return out


# All of them ---------------------------------------------------------------------------------------
MODELS = ("clip", "aesthetic", "watermark", "llava")  # the aesthetic head needs the CLIP


def train_all(out: str, n: int = 3000, models: tuple[str, ...] = MODELS) -> dict[str, float]:
    """Train `models` (every one by default) on `n` pictures of the training world; save them under `out`.
    Returns the seconds spent rendering and on each model trained (the aesthetic head needs the CLIP,
    so asking for either trains both)."""
    from safetensors.torch import save_file

    seconds = {}
    t = time.time()
    data = world_images(n, TRAIN_SEED)
    seconds["render"] = time.time() - t
    if "clip" in models or "aesthetic" in models:
        t = time.time()
        clip = train_clip(data)
        save_clip(clip, os.path.join(out, "clip"))
        seconds["clip"] = time.time() - t
        t = time.time()
        head = train_aesthetic(clip_image_embeddings(clip, data.clip), data.kinds)
        os.makedirs(os.path.join(out, "aesthetic"), exist_ok=True)
        save_file(head.state_dict(), os.path.join(out, "aesthetic", "aesthetic.safetensors"))
        seconds["aesthetic"] = time.time() - t
    if "watermark" in models:
        t = time.time()
        detector = train_watermark(data)
        os.makedirs(os.path.join(out, "watermark"), exist_ok=True)
        save_file({k: v.contiguous() for k, v in detector.state_dict().items()},
                  os.path.join(out, "watermark", "watermark.safetensors"))
        seconds["watermark"] = time.time() - t
    if "llava" in models:
        t = time.time()
        llava, processor = train_llava(data)
        llava.save_pretrained(os.path.join(out, "llava"))
        processor.save_pretrained(os.path.join(out, "llava"))
        seconds["llava"] = time.time() - t
    write_sums(out)
    with open(os.path.join(out, PINNED), "w") as f:
        f.write(this_cpu() + "\n")
    return seconds


def weight_files(folder: str) -> list[str]:
    """The files whose sha256 is compared: every weights file (configs carry library versions)."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder)
                  for f in files if f.endswith((".safetensors", "tokenizer.json")))


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_sums(folder: str) -> None:
    with open(os.path.join(folder, SUMS), "w") as f:
        for name in weight_files(folder):
            f.write(f"{sha256(os.path.join(folder, name))}  {name}\n")


def read_sums(folder: str) -> dict[str, str]:
    with open(os.path.join(folder, SUMS)) as f:
        return {name: digest for digest, name in (line.split("  ", 1) for line in f.read().splitlines())}


def this_cpu() -> str:
    """The CPU and the kernel path torch takes on it: what bit-for-bit reproduction depends on."""
    name = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            lines = [line.split(":", 1) for line in f if ":" in line]
        info = {k.strip(): v.strip() for k, v in reversed(lines)}
        name = f"{info.get('model name', name)} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    return f"{name}, torch {torch.__version__} CPU capability {torch.backends.cpu.get_cpu_capability()}"


def pinned_cpu(folder: str = DEFAULT_OUT) -> str:
    path = os.path.join(folder, PINNED)
    if not os.path.exists(path):
        return "unknown"
    with open(path) as f:
        return f.read().strip()


def check(shipped: str = DEFAULT_OUT, models: tuple[str, ...] = MODELS) -> list[str]:
    """Retrain `models` into a temporary folder; the names whose sha256 differs from the shipped ones."""
    with tempfile.TemporaryDirectory() as tmp:
        trained = set(train_all(tmp, models=models)) - {"render"}
        fresh = read_sums(tmp)
    want = {name: digest for name, digest in read_sums(shipped).items() if name.split("/")[0] in trained}
    return sorted(name for name in set(fresh) | set(want) if fresh.get(name) != want.get(name))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="where to write the models (default: the shipped folder)")
    p.add_argument("--check", action="store_true", help="retrain and compare with the shipped sha256 sums")
    args = p.parse_args(argv)
    if args.check:
        print(f"The shipped weights were pinned on: {pinned_cpu(args.out)}")
        print(f"This machine:                      {this_cpu()}")
        differ = check(args.out)
        print("identical to the shipped weights" if not differ else f"differ: {', '.join(differ)}")
        if differ and pinned_cpu(args.out) != this_cpu():
            print("Another CPU gives other bits; `pytest -m slow tests/test_world_models.py` checks that the "
                  "retrained models behave as the shipped ones do.")
        return 1 if differ else 0
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    seconds = train_all(args.out)
    print(" ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
