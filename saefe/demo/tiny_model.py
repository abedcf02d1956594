"""The built-in tiny SigLIP: same architecture and loading path as real SigLIP, random weights.

No machine here reaches a model hub, so tests and the demo need a model they can make
themselves. It is saved with ``save_pretrained`` and then loaded back through exactly the same
``from_pretrained`` code as google/siglip-*, so the real loading path is what gets tested.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEMO_MODEL_ID = "saefe/tiny-siglip"
DEMO_ALIASES = {"demo", DEMO_MODEL_ID}

# Words the tiny tokenizer knows: labels, prompt templates and the demo's vocabulary.
_VOCAB_TEXT = """
a an the photo picture image of person people man woman boy girl child kid teenager adult old young
male female face smiling sad angry scared surprised calm proud excited happy happiness sadness anger
fear surprise peace esteem excitement affection anticipation engagement confidence pleasure sympathy
doubt confusion disconnection fatigue embarrassment yearning disapproval aversion annoyance
sensitivity disquietment pain suffering valence arousal dominance with and in on at who is looks
feeling very little red green blue yellow orange purple pink brown black white gray grey dog cat
"""


@dataclass
class TinySiglipConfig:
    """Sizes small enough to embed a few thousand images per minute on 2 CPU cores."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    image_size: int = 64
    patch_size: int = 8
    max_text_len: int = 16
    seed: int = 0


def default_demo_dir() -> Path:
    """Where the tiny model lives; SAEFE_HOME moves it (tests point it at a temp dir)."""
    home = Path(os.environ.get("SAEFE_HOME", Path.home() / ".cache" / "saefe"))
    return home / "tiny-siglip-v1"


def make_tiny_siglip(out_dir: str | os.PathLike, cfg: TinySiglipConfig | None = None) -> Path:
    """Create a random-weight SigLIP with its image processor and tokenizer in ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, normalizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel
    from transformers import SiglipImageProcessor

    cfg = cfg or TinySiglipConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    words = sorted(set(re.findall(r"[a-z]+", _VOCAB_TEXT)))
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=cfg.max_text_len,
    )

    common = dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
    )
    config = SiglipConfig(
        text_config=dict(
            **common,
            vocab_size=len(vocab),
            max_position_embeddings=cfg.max_text_len,
            pad_token_id=vocab["<pad>"],
            eos_token_id=vocab["</s>"],
            bos_token_id=vocab["</s>"],
        ),
        vision_config=dict(**common, image_size=cfg.image_size, patch_size=cfg.patch_size),
    )
    torch.manual_seed(cfg.seed)
    model = SiglipModel(config).eval()
    model.config.name_or_path = DEMO_MODEL_ID
    model.save_pretrained(out, safe_serialization=True)
    SiglipImageProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SAEFE_MODEL_ID").write_text(DEMO_MODEL_ID + "\n")
    return out


def ensure_demo_model(path: str | os.PathLike | None = None) -> Path:
    """Return the tiny model's directory, creating it once (it is deterministic from its seed)."""
    d = Path(path) if path else default_demo_dir()
    if not (d / "config.json").exists() or not (d / "SAEFE_MODEL_ID").exists():
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        make_tiny_siglip(tmp)
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, d)
        except OSError:  # another process won the race; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return d


def resolve(name: str) -> tuple[Path, str] | None:
    """``saefe.models`` entry point: the demo's names resolve to the tiny model's directory."""
    if name in DEMO_ALIASES:
        return ensure_demo_model(), DEMO_MODEL_ID
    return None
