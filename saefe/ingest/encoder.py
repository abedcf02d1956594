"""SigLIP image/text encoder through transformers: L2-normalised embeddings, batched.

One class serves real weights (hub id or local dir, from the HF cache when offline) and the
built-in tiny model (``demo``). CUDA with fp16 when present, CPU fp32 otherwise. Image work
loads only the vision tower; the text tower and tokenizer load on the first text (see
saefe.ingest.towers for why and for the error messages).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Protocol, Sequence

import numpy as np

from saefe.errors import ModelLoadError, SaefeError
from saefe.ingest.pixels import PixelPlan
from saefe.manifest import EncoderInfo
from saefe.ingest.models import resolve_model

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """What the pipeline and engine need from an encoder (local SigLIP or a remote clip_server)."""

    info: EncoderInfo

    def embed_images(self, images: Sequence["PIL.Image.Image"]) -> np.ndarray: ...  # noqa: F821

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    env = os.environ.get("SAEFE_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_batch_size(device: str) -> int:
    """Images per model call when none is asked for: 256 on a GPU (SO400M@384 in fp16 peaks at
    ~5.6 GiB there, and batch 64 ran 5% slower on an H100: benchmarks/bench_gpu_embed.py), 64 on
    CPUs (bigger batches only cost memory there)."""
    return 256 if device.startswith("cuda") else 64


def model_layout(px: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """(n, 3, H, W) pixels in channels-last memory, the layout the loaders' uint8 resize already
    has: cuDNN's patch-embedding convolution runs it much faster than contiguous NCHW (SO400M@384
    on an H100, fp16: 574-604 images/s through ``embed_pixels`` against 437-450 for NCHW input;
    benchmarks/bench_gpu_embed.py). A no-op for pixels already in that layout."""
    import torch

    return px.contiguous(memory_format=torch.channels_last) if px.dim() == 4 else px


def cpu_preprocess(processor, plan: PixelPlan | None) -> Callable[[Sequence], "torch.Tensor"]:  # noqa: F821
    """The CPU half of pre-processing, safe in loader threads, workers and Ray actors: the uint8
    resize when ``plan`` reproduces the processor (the device finishes it), else the processor."""
    if plan is not None:
        return plan.resize
    return lambda images: processor(images=list(images), return_tensors="pt")["pixel_values"]


def draft_size(info: EncoderInfo) -> tuple[int, int] | None:
    """The size JPEGs may be draft-decoded down to (the model's input), None when unknown."""
    return tuple(info.image_size) if all(info.image_size) else None  # type: ignore[return-value]


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _pooled(out):
    """A tower's pooled output (a tensor passes through: 4.x ``get_*_features`` returned one)."""
    return out if hasattr(out, "shape") else out.pooler_output


def info_from_config(config, model_id: str) -> EncoderInfo:
    """The EncoderInfo a SigLIP config implies (no weights needed)."""
    vc = config.vision_config
    size = int(vc.image_size)
    dim = int(getattr(config.text_config, "projection_size", None) or vc.hidden_size)
    return EncoderInfo(model_id=model_id, embedding_dim=dim, image_size=(size, size))


def encoder_info(name_or_path: str) -> EncoderInfo:
    """EncoderInfo of a model from its config alone: a coordinator (the Ray build's driver)
    records it without loading the weights that only its workers need."""
    from saefe.ingest import towers

    path, model_id = resolve_model(str(name_or_path))
    local_only = os.environ.get("SAEFE_ALLOW_DOWNLOAD") != "1"
    with towers.transformers_notices():
        config, _ = towers.load_config(path, str(name_or_path), local_only)
    return info_from_config(config, model_id)


class SiglipEncoder:
    """SigLIP behind ``from_pretrained``; records the EncoderInfo every artefact inherits.

    Holds the vision tower from the start and the text tower + tokenizer only once a text is
    embedded (``text_loader``), so image-only work never pays for (or fails on) the text side.
    ``model`` is the vision tower: the module ``image_features`` runs (saliency freezes its
    parameters).
    """

    def __init__(self, vision, image_processor, model_id: str, device: str, batch_size: int = 0, *,
                 config, text=None, tokenizer=None, text_loader: Callable[[], tuple] | None = None,
                 lowercase: bool = True):
        import torch

        self.vision = vision
        self.image_processor = image_processor
        self.pixel_plan = PixelPlan.from_processor(image_processor)
        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.batch_size = batch_size or default_batch_size(device)
        self.config = config
        self._text, self._tokenizer, self._text_loader = text, tokenizer, text_loader
        self._text_lock = threading.Lock()
        self.lowercase = lowercase
        self.info = info_from_config(config, model_id)
        self.max_text_len = int(config.text_config.max_position_embeddings)

    @property
    def model(self):
        """The vision tower (what ``image_features`` differentiates through)."""
        return self.vision

    @property
    def text_loaded(self) -> bool:
        return self._text is not None

    @property
    def text_model(self):
        """The text tower (loaded now if no text has been embedded yet)."""
        return self._text_side()[0]

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (loaded with the text tower)."""
        return self._text_side()[1]

    @classmethod
    def from_model(cls, model, image_processor, tokenizer, model_id: str, device: str, batch_size: int = 0,
                   lowercase: bool = True) -> "SiglipEncoder":
        """Wrap an in-memory dual encoder (a ``SiglipModel``): its towers, nothing loaded lazily."""
        return cls(model.vision_model, image_processor, model_id, device, batch_size, config=model.config,
                   text=model.text_model, tokenizer=tokenizer, lowercase=lowercase)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, device: str | None = None, batch_size: int = 0,
        allow_download: bool | None = None,
    ) -> "SiglipEncoder":
        """Config, vision tower and image processor now; text tower and tokenizer on first use.

        ``name_or_path``: a hub id (read from the Hugging Face cache; offline unless
        ``allow_download`` or SAEFE_ALLOW_DOWNLOAD=1), a checkpoint directory, or a name a
        ``saefe.models`` plug-in owns (``demo``). Every failure is a one-line ModelLoadError.
        """
        import torch

        from saefe.ingest import towers

        device = pick_device(device)
        name = str(name_or_path)
        path, model_id = resolve_model(name)
        if allow_download is None:
            allow_download = os.environ.get("SAEFE_ALLOW_DOWNLOAD") == "1"
        local_only = not allow_download
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        t0 = time.perf_counter()
        with towers.transformers_notices():
            config, spec = towers.load_config(path, name, local_only)
            vision = towers.load_tower(spec.vision, path, name, dtype, local_only, "vision")
            processor = towers.load_image_processor(spec, path, name, local_only)
        vision = vision.to(device).eval()
        log.debug("loaded the vision tower of %s in %.1fs", name, time.perf_counter() - t0)

        def load_text():
            text, tok = towers.load_text_side(spec, path, name, dtype, local_only)
            return text.to(device).eval(), tok

        return cls(vision, processor, model_id, device, batch_size, config=config, text_loader=load_text,
                   lowercase=spec.lowercase)

    # -- images ------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        """Model-ready pixels on the device (the same path ``embed_images`` takes)."""
        return self._to_model(self.preprocess_cpu(images))

    def image_features(self, pixel_values) -> "torch.Tensor":  # noqa: F821
        """Un-normalised, differentiable image features (saliency differentiates through this).

        The vision tower's pooled output: exactly ``SiglipModel.get_image_features``."""
        return _pooled(self.vision(pixel_values=pixel_values))

    def preprocess_cpu(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        """Pixels on the CPU, safe to make in loader threads while the model works: the resized
        uint8 image when the processor's maths can finish on the device (ingest/pixels.py), else
        the processor's float output. ``embed_pixels`` takes either."""
        return cpu_preprocess(self.image_processor, self.pixel_plan)(images)

    def embed_pixels(self, pixel_values, on_batch: Callable[[int, float], None] | None = None) -> np.ndarray:
        """Embed already pre-processed pixels (see ``preprocess_cpu``), batched.

        ``on_batch(n_images, seconds)`` is called after each batch (a build's cost estimate).
        A batch that does not fit the GPU is retried at half the size (and the encoder keeps the
        smaller size): the default of 256 suits SO400M on any 8 GB card, not every model on
        every card, and a build should not die for it."""
        import torch

        out = []
        i = 0
        with torch.inference_mode():
            while i < len(pixel_values):
                t0 = time.perf_counter()
                px = pixel_values[i : i + self.batch_size]
                try:
                    out.append(self._embed_batch(px))
                except torch.OutOfMemoryError:
                    self._smaller_batch(len(px))
                    continue
                i += len(px)
                if on_batch is not None:
                    on_batch(len(px), time.perf_counter() - t0)
        if not out:
            return np.zeros((0, self.info.embedding_dim), np.float32)
        return l2_normalise(np.concatenate(out))

    def _to_model(self, px) -> "torch.Tensor":  # noqa: F821
        """CPU pixels (``preprocess_cpu``'s) -> the model's input on its device, dtype and layout."""
        import torch

        if px.dtype == torch.uint8:  # resized on the CPU; scale + normalise here
            px = self.pixel_plan.finish(px.to(self.device, non_blocking=True), self.dtype)
        else:
            px = px.to(self.device, self.dtype, non_blocking=True)
        return model_layout(px)

    def _embed_batch(self, px) -> np.ndarray:
        return self.image_features(self._to_model(px)).float().cpu().numpy()

    def _smaller_batch(self, tried: int) -> None:
        import torch

        if tried <= 1:
            raise SaefeError(f"out of memory on {self.device} embedding a single image with {self.info.model_id}: "
                             "free the GPU (another process?) or run with --device cpu") from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.batch_size = max(1, tried // 2)
        log.warning("a batch of %d images does not fit %s; continuing with batches of %d (--batch-size)",
                    tried, self.device, self.batch_size)

    def embed_images(self, images: Sequence) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.info.embedding_dim), np.float32)
        return self.embed_pixels(self.preprocess_cpu(images))

    # -- texts -------------------------------------------------------------------------------
    def _text_side(self):
        """The text tower and tokenizer, loaded on first use (once, even from several threads)."""
        if self._text is None:
            with self._text_lock:
                if self._text is None:
                    if self._text_loader is None:
                        raise ModelLoadError(f"encoder {self.info.model_id!r} has no text tower")
                    t0 = time.perf_counter()
                    self._text, self._tokenizer = self._text_loader()
                    log.debug("loaded the text tower of %s in %.1fs", self.info.model_id, time.perf_counter() - t0)
        return self._text, self._tokenizer

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not len(texts):
            return np.zeros((0, self.info.embedding_dim), np.float32)
        text_model, tokenizer = self._text_side()
        texts = [t.lower() if self.lowercase else t for t in texts]
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 256):
                tok = tokenizer(
                    texts[i : i + 256], padding="max_length", truncation=True,
                    max_length=self.max_text_len, return_tensors="pt",
                )
                feats = _pooled(text_model(input_ids=tok["input_ids"].to(self.device)))
                out.append(feats.float().cpu().numpy())
        return l2_normalise(np.concatenate(out))


def load_encoder(model: str = "demo", clip_server: str | None = None, device: str | None = None,
                 batch_size: int = 0) -> Encoder:
    """The one place that turns CLI flags into an encoder (local model or remote clip_server).
    ``batch_size``: images per model call (0: ``default_batch_size`` of the device)."""
    if clip_server:
        from saefe.remote.clip_client import ClipServerEncoder

        return ClipServerEncoder(clip_server)
    return SiglipEncoder.from_pretrained(model, device=device, batch_size=batch_size)
