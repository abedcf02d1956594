"""SigLIP image/text encoder through transformers: L2-normalised embeddings, batched.

One class serves real weights (hub id or local dir, from the HF cache when offline) and the
built-in demo model (``demo``: trained on the demo world, shipped with the package). CUDA with
fp16 when present, CPU fp32 otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from saefe.errors import ModelLoadError
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


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _pooled(out):
    """transformers 4.x returns a tensor from get_*_features, 5.x an output with pooler_output."""
    return out if hasattr(out, "shape") else out.pooler_output


@contextlib.contextmanager
def library_notices():
    """Keep transformers' load-time notices out of normal output; ``-v`` (DEBUG logging) shows them.

    They concern a checkpoint's authors, not its user: special-token ids outside the vocabulary
    (real SigLIP configs carry CLIP's 49406/49407), which image-processor backend was picked,
    weight-loading progress bars."""
    from transformers.utils import logging as hf_logging

    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    old, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bar:
            hf_logging.enable_progress_bar()


def _pil_processor_kwargs() -> dict:
    """Pick SigLIP's PIL image processor explicitly: the same pixels whether or not torchvision
    happens to be installed (the demo model was trained on them), and no fallback notice."""
    import transformers

    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


class SiglipEncoder:
    """SigLIP behind ``from_pretrained``; records the EncoderInfo every artefact inherits."""

    def __init__(self, model, image_processor, tokenizer, model_id: str, device: str, batch_size: int = 64):
        import torch

        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.batch_size = batch_size
        vc = model.config.vision_config
        size = int(vc.image_size)
        dim = int(getattr(model.config.text_config, "projection_size", None) or vc.hidden_size)
        self.info = EncoderInfo(model_id=model_id, embedding_dim=dim, image_size=(size, size))
        self.max_text_len = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, device: str | None = None, batch_size: int = 64,
        allow_download: bool | None = None,
    ) -> "SiglipEncoder":
        """Load weights, processor and tokenizer; ``demo`` is the trained tiny model shipped in
        saefe/demo/model (see saefe.demo.tiny_model)."""
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        device = pick_device(device)
        path, model_id = resolve_model(str(name_or_path))
        if allow_download is None:
            allow_download = os.environ.get("SAEFE_ALLOW_DOWNLOAD") == "1"
        local_only = not allow_download
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        try:
            with library_notices():
                model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=local_only)
                image_processor = AutoImageProcessor.from_pretrained(
                    path, local_files_only=local_only, **_pil_processor_kwargs())
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"cannot load model {name_or_path!r} offline ({type(e).__name__}): put its weights in "
                "a local directory and pass that path, or fill the Hugging Face cache on a machine "
                "with network (`hf download google/siglip-so400m-patch14-384`) and copy ~/.cache/"
                "huggingface here; `--model demo` uses the built-in tiny model"
            ) from None
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise ModelLoadError(f"model {name_or_path!r} is not a SigLIP/CLIP-style dual encoder")
        model = model.to(device).eval()
        return cls(model, image_processor, tokenizer, model_id, device, batch_size)

    def preprocess(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        px = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    def image_features(self, pixel_values) -> "torch.Tensor":  # noqa: F821
        """Un-normalised, differentiable image features (saliency differentiates through this)."""
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def preprocess_cpu(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        """Processor output on the CPU: safe to run in a loader thread while the model works."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def embed_pixels(self, pixel_values) -> np.ndarray:
        """Embed already pre-processed pixels (see ``preprocess_cpu``), batched."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(pixel_values), self.batch_size):
                px = pixel_values[i : i + self.batch_size].to(self.device, self.dtype, non_blocking=True)
                out.append(self.image_features(px).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.info.embedding_dim), np.float32)
        return l2_normalise(np.concatenate(out))

    def embed_images(self, images: Sequence) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.info.embedding_dim), np.float32)
        return self.embed_pixels(self.preprocess_cpu(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 256):
                tok = self.tokenizer(
                    list(texts[i : i + 256]), padding="max_length", truncation=True,
                    max_length=self.max_text_len, return_tensors="pt",
                )
                feats = _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device)))
                out.append(feats.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.info.embedding_dim), np.float32)
        return l2_normalise(np.concatenate(out))


def load_encoder(model: str = "demo", clip_server: str | None = None, device: str | None = None) -> Encoder:
    """The one place that turns CLI flags into an encoder (local model or remote clip_server)."""
    if clip_server:
        from saefe.remote.clip_client import ClipServerEncoder

        return ClipServerEncoder(clip_server)
    return SiglipEncoder.from_pretrained(model, device=device)
