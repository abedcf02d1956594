"""The demo's SigLIP: a tiny SigLIP-architecture model trained on the demo world, shipped in the
package (``saefe/demo/model``), and the random-weight maker for tests that only need the
architecture.

Both are ordinary SigLIP directories (config.json, model.safetensors, preprocessor_config.json
naming SiglipImageProcessor, spiece.model + tokenizer_config.json naming SiglipTokenizer), loaded
through exactly the same ``from_pretrained`` code as google/siglip-*, so the demo runs the code
real checkpoints run. ``--model demo`` reaches the shipped one through the ``saefe.models`` entry
point (``resolve``). The shipped weights are checked against the SHA-256 their training record
holds: a missing or corrupt file is a one-line error that says how to restore it, never a quiet
fall-back to random weights (which would make every demo artefact silently meaningless).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from saefe.errors import ModelLoadError
from saefe.manifest import file_sha256

DEMO_MODEL_ID = "saefe/demo-siglip"
DEMO_ALIASES = {"demo", DEMO_MODEL_ID}
# What make_tiny_siglip's random-weight directories record (never confused with the trained one).
RANDOM_MODEL_ID = "saefe/demo-siglip-random"
# The random-weight model that demo indexes recorded before the demo model was trained.
LEGACY_MODEL_IDS = {"saefe/tiny-siglip"}
SHIPPED_DIR = Path(__file__).resolve().with_name("model")
RECORD = "training_record.json"
WEIGHTS = "model.safetensors"
MODEL_FILES = ("config.json", WEIGHTS, "preprocessor_config.json", "spiece.model", "tokenizer_config.json")
RESTORE_HINT = "restore it with `saefe train-demo-model` (or `git checkout saefe/demo/model`)"
# SentencePiece special ids, as in SigLIP's own spiece.model: <pad> 0, </s> 1, <unk> 2, no <s>.
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


@dataclass
class TinySiglipConfig:
    """Sizes of the demo model: small enough to train in ~10 minutes and embed a few hundred
    images/s on 2 CPU cores, big enough to learn the demo world (benchmarks/bench_demo_model.py)."""

    hidden_size: int = 128
    intermediate_size: int = 512
    vision_layers: int = 2
    text_layers: int = 2
    num_heads: int = 4
    image_size: int = 64
    patch_size: int = 8
    max_text_len: int = 16
    vocab_size: int = 512  # SentencePiece pieces (BPE on the caption vocabulary)
    seed: int = 0


def siglip_config(cfg: TinySiglipConfig, vocab_size: int):
    """A transformers SiglipConfig with the special-token ids inside the vocabulary.

    transformers' defaults (bos 49406 / eos 49407, CLIP's) lie outside any small vocabulary and
    make every load print a warning; SigLIP has no BOS token, so bos repeats eos."""
    from transformers import SiglipConfig

    common = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_attention_heads=cfg.num_heads)
    return SiglipConfig(
        text_config=dict(
            **common, num_hidden_layers=cfg.text_layers, vocab_size=vocab_size,
            max_position_embeddings=cfg.max_text_len, pad_token_id=EOS_ID, eos_token_id=EOS_ID,
            bos_token_id=EOS_ID, projection_size=cfg.hidden_size,
        ),
        vision_config=dict(**common, num_hidden_layers=cfg.vision_layers, image_size=cfg.image_size,
                           patch_size=cfg.patch_size),
    )


def image_processor(cfg: TinySiglipConfig):
    """SigLIP's PIL image processor (saved as ``SiglipImageProcessor``): resize, [-1, 1]."""
    try:
        from transformers import SiglipImageProcessorPil as Proc  # transformers >= 5
    except ImportError:  # transformers 4.x: the PIL processor is SiglipImageProcessor itself
        from transformers import SiglipImageProcessor as Proc
    return Proc(size={"height": cfg.image_size, "width": cfg.image_size}, image_mean=[0.5] * 3,
                image_std=[0.5] * 3)


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int, max_len: int):
    """Train SentencePiece (BPE) on the caption vocabulary into ``out_dir/spiece.model``; return
    the SiglipTokenizer saved there. Deterministic: fixed corpus order, one thread."""
    import io

    import sentencepiece as spm
    from transformers import SiglipTokenizer

    from saefe.demo.captions import vocabulary_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(vocabulary_text()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", hard_vocab_limit=False, num_threads=1, character_coverage=1.0, minloglevel=2,
    )
    (out / "spiece.model").write_bytes(buf.getvalue())
    tok = SiglipTokenizer(vocab_file=str(out / "spiece.model"), model_max_length=max_len)
    tok.save_pretrained(out)
    return tok


def write_model_dir(model, out_dir: str | os.PathLike, cfg: TinySiglipConfig, fp16: bool = True,
                    model_id: str = DEMO_MODEL_ID) -> Path:
    """Save ``model`` (weights as fp16 safetensors when ``fp16``: half the size, and a float32
    config so any ``from_pretrained`` still gives a float32 model), its image processor and the
    model-id marker. The tokenizer files must already be in ``out_dir``."""
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from saefe.ingest.towers import transformers_notices

    model.config.name_or_path = model_id
    with transformers_notices():  # its "writing shards" bar and config remarks are not news
        model.save_pretrained(out, safe_serialization=True)
    if fp16:
        import torch

        weights = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(out / WEIGHTS)).items()}
        save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    image_processor(cfg).save_pretrained(out)
    (out / "SAEFE_MODEL_ID").write_text(model_id + "\n")
    return out


def make_tiny_siglip(out_dir: str | os.PathLike, cfg: TinySiglipConfig | None = None) -> Path:
    """A random-weight SigLIP with the demo model's architecture, processor and tokenizer kind,
    for tests (and the benchmark's "before") that need the architecture, not the knowledge."""
    import torch
    from transformers import SiglipModel

    cfg = cfg or TinySiglipConfig()
    tok = train_tokenizer(out_dir, cfg.vocab_size, cfg.max_text_len)
    torch.manual_seed(cfg.seed)
    model = SiglipModel(siglip_config(cfg, len(tok))).eval()
    return write_model_dir(model, out_dir, cfg, fp16=False, model_id=RANDOM_MODEL_ID)


sha256_file = file_sha256  # the name train_model and the tests use


@functools.lru_cache(maxsize=8)
def _checked(path: str, size: int, mtime_ns: int) -> None:
    """Hash the weights once per (file, size, mtime): loads in one process share the check."""
    d = Path(path).parent
    record_path = d / RECORD
    try:
        expected = json.loads(record_path.read_text()).get("weights_sha256")
    except (OSError, ValueError):
        expected = None
    if expected and file_sha256(path) != expected:
        raise ModelLoadError(f"demo model weights {path} are corrupt (SHA-256 differs from {record_path.name}); {RESTORE_HINT}")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            if not list(f.keys()):
                raise ValueError("no tensors")
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise ModelLoadError(f"demo model weights {path} are unreadable ({type(e).__name__}); {RESTORE_HINT}") from None


def check_model_dir(d: Path) -> Path:
    """Raise a one-line ModelLoadError unless ``d`` holds a complete, intact demo model."""
    for name in MODEL_FILES:
        p = d / name
        if not p.is_file() or p.stat().st_size == 0:
            raise ModelLoadError(f"demo model file {p} is missing or empty; {RESTORE_HINT}")
    w = d / WEIGHTS
    st = w.stat()
    _checked(str(w), st.st_size, st.st_mtime_ns)
    return d


def demo_model_dir() -> Path:
    """The shipped model, or the directory ``SAEFE_DEMO_MODEL`` names (a model you trained)."""
    env = os.environ.get("SAEFE_DEMO_MODEL")
    return Path(env) if env else SHIPPED_DIR


def resolve(name: str) -> tuple[Path, str] | None:
    """``saefe.models`` entry point: ``demo`` and the demo model's id resolve to its directory."""
    if name in LEGACY_MODEL_IDS:
        raise ModelLoadError(
            f"this index was embedded with {name!r}, the random-weight demo model SAEFE no longer ships; "
            "rebuild it with the trained one (`python scripts/build_index.py --force` for the demo, "
            "`saefe build ... --model demo --force` for your own images)"
        )
    if name in DEMO_ALIASES:
        return check_model_dir(demo_model_dir()), DEMO_MODEL_ID
    return None

