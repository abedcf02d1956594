"""Load a SigLIP checkpoint tower by tower, turning every failure into a one-line ModelLoadError.

Why towers: building an index, encoding images and saliency need only the vision tower. Loading
the whole dual encoder (and its tokenizer) for them cost twice the memory at SO400M size, and
made an image-only build fail on the *text* side (issue 9: SigLIP's SentencePiece tokenizer
needs ``sentencepiece`` and ``protobuf``). So the vision tower is loaded alone, from the same
checkpoint, with the vision class of the config's ``model_type``; the text tower and tokenizer
are loaded by :func:`load_text_side` when a text query first needs them.

Why explicit classes: ``AutoImageProcessor`` picks the torchvision backend when it can and
otherwise falls back with a notice; which one runs changes the pixels slightly from machine to
machine. The PIL-backed processor class of the model type is named here instead, so a build and
a query embed identical pixels everywhere.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saefe.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerSpec:
    """transformers class names for one ``model_type``."""

    vision: str
    text: str
    image_processor: str
    # The texts the model was trained on were lower-cased (SigLIP: tokenizer does it; SigLIP 2's
    # checkpoints ship a plain Gemma tokenizer that does not, so the encoder must).
    lowercase: bool = True


# model_type -> classes. SigLIP 2 fixed-resolution checkpoints (google/siglip2-*-patch*-NNN) are
# model_type "siglip" too; NaFlex ones ("siglip2") need patch masks this encoder does not feed.
SPECS: dict[str, TowerSpec] = {
    "siglip": TowerSpec("SiglipVisionModel", "SiglipTextModel", "SiglipImageProcessor"),
}

HOW_TO_GET_WEIGHTS = (
    "put its weights in a local directory and pass that path, or fill the Hugging Face cache on a "
    "machine with network (`hf download google/siglip-so400m-patch14-384`) and copy ~/.cache/huggingface "
    "here; `--model demo` uses the built-in tiny model"
)


@contextlib.contextmanager
def transformers_notices():
    """Keep transformers' harmless load notices out of normal output; ``-v`` shows them.

    Loading the vision tower alone reports every text-tower weight as UNEXPECTED; SigLIP's
    config.json carries CLIP's BOS/EOS ids (outside its vocabulary) and gets a remark; a
    missing torchvision gets a fallback notice. None of these needs the user's attention.
    """
    if logging.getLogger("saefe").isEnabledFor(logging.DEBUG):
        yield
        return
    from transformers.utils import logging as tlog

    old = tlog.get_verbosity()
    bar = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(old)
        if bar:
            tlog.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and not name.startswith(".")


def _cache_dir_for(name: str) -> str:
    try:
        from huggingface_hub import constants

        return str(Path(constants.HF_HUB_CACHE) / ("models--" + name.replace("/", "--")))
    except Exception:  # noqa: BLE001 - only for the message
        return "~/.cache/huggingface/hub"


def load_config(path: str, name: str, local_only: bool):
    """The checkpoint's config.json (cheap: no weights) and its tower classes."""
    from transformers import AutoConfig

    p = Path(path)
    if not p.exists() and not _looks_like_hub_id(path):
        raise ModelLoadError(f"model {name!r}: no such directory")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json: not a transformers checkpoint (need "
                             "config.json, model.safetensors, preprocessor_config.json and the tokenizer files)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except OSError:
        where = (f"cannot read {path}" if p.exists() else
                 f"no such directory here and not in the Hugging Face cache ({_cache_dir_for(path)})")
        raise ModelLoadError(f"cannot load model {name!r} offline: {where}; {HOW_TO_GET_WEIGHTS}") from None
    except (ValueError, KeyError) as e:  # unknown model_type: a newer transformers wrote it
        raise ModelLoadError(f"cannot read the config of model {name!r} ({_first_line(e)}); "
                             "try `pip install -U transformers`") from None
    mt = getattr(config, "model_type", None)
    if mt not in SPECS:
        hint = (" (a SigLIP 2 NaFlex checkpoint: use a fixed-resolution one such as "
                "google/siglip2-so400m-patch14-384)") if mt == "siglip2" else ""
        raise ModelLoadError(f"model {name!r} has model_type {mt!r}{hint}; SAEFE embeds with SigLIP "
                             f"(model_type {', '.join(map(repr, SPECS))}: google/siglip-*, google/siglip2-*-patch*-NNN)")
    return config, SPECS[mt]


def _tf_class(name: str):
    import transformers

    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError) as e:
        raise ModelLoadError(f"transformers {transformers.__version__} has no {name} ({_first_line(e)}); "
                             "try `pip install -U transformers`") from None


def _pil_processor_class(name: str):
    """``<Name>Pil`` where transformers has split backends (5.x), else ``<Name>`` (4.x: PIL)."""
    import transformers

    try:
        return getattr(transformers, f"{name}Pil")
    except (AttributeError, ImportError):
        return _tf_class(name)


def load_tower(cls_name: str, path: str, name: str, dtype, local_only: bool, what: str):
    """One tower from a full dual-encoder checkpoint; refuses one whose weights are not all there.

    transformers initialises missing weights at random and only logs it; an index embedded
    with a half-random tower would be silently useless, so missing keys are an error here.
    """
    cls = _tf_class(cls_name)
    try:
        model, info = cls.from_pretrained(path, dtype=dtype, local_files_only=local_only,
                                          use_safetensors=True, output_loading_info=True)
    except OSError as e:
        msg = _first_line(e)
        if "safetensors" in msg or ".bin" in msg or "pytorch_model" in msg:
            raise ModelLoadError(f"model {name!r} has no model.safetensors; SAEFE loads weights only from "
                                 "safetensors (never pickles): convert it with transformers' save_pretrained") from None
        raise ModelLoadError(f"cannot load the {what} tower of {name!r}: {msg}; {HOW_TO_GET_WEIGHTS}") from None
    except MemoryError:
        raise ModelLoadError(f"not enough memory to load the {what} tower of {name!r}") from None
    except Exception as e:  # noqa: BLE001 - corrupt file, shape mismatch, ...: one line, not a traceback
        raise ModelLoadError(f"cannot load the {what} tower of {name!r} ({type(e).__name__}: {_first_line(e)})") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(f"model {name!r} lacks {len(missing)} {what}-tower weights (e.g. {sorted(missing)[0]}): "
                             "is it a complete SigLIP checkpoint?")
    return model


def load_image_processor(spec: TowerSpec, path: str, name: str, local_only: bool):
    cls = _pil_processor_class(spec.image_processor)
    try:
        return cls.from_pretrained(path, local_files_only=local_only)
    except OSError:
        raise ModelLoadError(f"model {name!r} has no preprocessor_config.json (the image processor's settings); "
                             f"{HOW_TO_GET_WEIGHTS}") from None
    except ImportError as e:
        raise ModelLoadError(f"the image processor of {name!r} needs a missing package: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the image processor of {name!r} ({type(e).__name__}: {_first_line(e)})") from None


def _missing_tokenizer_packages() -> list[str]:
    """Which of the packages SigLIP-family tokenizers need are not installed (pip names)."""
    out = []
    for module, pip in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf"), ("tokenizers", "tokenizers")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package (``google``) is missing
            found = False
        if not found:
            out.append(pip)
    return out


def load_tokenizer(path: str, name: str, local_only: bool):
    """The checkpoint's own tokenizer (SentencePiece ``spiece.model`` for SigLIP, Gemma
    ``tokenizer.json`` for SigLIP 2), padded on the right as both were trained."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except (ImportError, ValueError, AttributeError, TypeError) as e:
        missing = _missing_tokenizer_packages()
        if missing:
            raise ModelLoadError(f"the tokenizer of {name!r} needs {', '.join(missing)}: "
                                 f"pip install {' '.join(missing)}") from None
        raise ModelLoadError(f"cannot load the tokenizer of {name!r} ({type(e).__name__}: {_first_line(e)})") from None
    except OSError as e:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: its tokenizer files (spiece.model or "
                             f"tokenizer.json, tokenizer_config.json) are missing ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer of {name!r} ({type(e).__name__}: {_first_line(e)})") from None
    # The text tower pools the last position, trained with right padding to a fixed length;
    # some tokenizer classes (Gemma's) default to left padding.
    tok.padding_side = "right"
    return tok


def load_text_side(spec: TowerSpec, path: str, name: str, dtype, local_only: bool) -> tuple[Any, Any]:
    """``(text tower, tokenizer)``; the tokenizer first, as it is what most often fails."""
    with transformers_notices():
        tok = load_tokenizer(path, name, local_only)
        text = load_tower(spec.text, path, name, dtype, local_only, "text")
    return text, tok
