"""The search engine: one API behind the CLI, the Gradio app and the HTTP adapters.

It ties the index (store + FAISS), the SAE, label profiles and per-image attributes together,
and answers queries made of weighted terms (embeddings, text, images, labels, expressions,
feature mixes) in two modes:

- ``direction``: the seed's search; the query vector is the L2-normalised weighted sum of the
  terms' unit vectors (a feature mix becomes its normalised decoder direction), then cosine
  search in the FAISS index (or a remote meme-search-engine backend).
- ``features``: exact ranking by sum_j w_j * a_j(image) over the SAE codes' inverted index.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from saefe.errors import IncompatibleError, SaefeError, SteeringError
from saefe.manifest import EncoderInfo
from saefe.search.mix import check_weight as _check_weight
from saefe.ingest.store import EmbeddingStore
from saefe.labels.attributes import ATTRIBUTES
from saefe.search.types import MODES, TERM_KINDS, FeatureReport, SearchResult, Term

log = logging.getLogger(__name__)

DEMO_INDEX = "index/demo"


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if not np.isfinite(v).all():
        raise SteeringError(f"{what} contains NaN or infinity")
    n = float(np.linalg.norm(v))
    if n < 1e-12:
        raise SteeringError(f"{what} is a zero vector")
    return v / n


class Engine:
    def __init__(self, store: EmbeddingStore, index=None, sae=None, profiles=None, attributes=None,
                 model: str | None = None, clip_server: str | None = None, backend=None, sae_dir: Path | None = None):
        self.store = store
        self.index = index
        self.sae = sae
        self.sae_dir = sae_dir
        self.profiles = profiles
        self.attributes = attributes
        self.backend = backend
        self._model = model
        self._clip_server = clip_server
        self.info: EncoderInfo = store.encoder_info
        if sae is not None:
            sae.check_input(self.info, store.dim, f"the index at {store.dir}")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: str | os.PathLike = DEMO_INDEX, sae_dir: str | os.PathLike | None = None,
             labels_dir: str | os.PathLike | None = None, model: str | None = None,
             clip_server: str | None = None, backend: str | None = None) -> "Engine":
        """Open an index with its SAE (default: the one the build recorded) and labels."""
        from saefe.ingest.index import VectorIndex

        store = EmbeddingStore.open(index_dir)
        remote = None
        if backend:
            from saefe.remote.backend_client import RemoteBackend

            remote = RemoteBackend(backend)
            if int(remote.d_emb) != store.dim:
                raise IncompatibleError(f"backend {backend} has d_emb {remote.d_emb}, the index has {store.dim}")
        index = None if remote else VectorIndex.load(store.data)
        if index is not None and index.dim != store.dim:
            raise IncompatibleError(f"FAISS index dim {index.dim} != store dim {store.dim} in {store.dir}")
        if sae_dir is None and store.manifest.get("default_sae"):
            cand = (store.dir / store.manifest["default_sae"]).resolve()
            sae_dir = cand if cand.exists() else None
        sae = profiles = None
        if sae_dir is not None:
            from saefe.sae.model import TopKSAE

            sae = TopKSAE.from_pretrained(sae_dir)
            if labels_dir is None and (Path(sae_dir) / "labels").exists():
                labels_dir = Path(sae_dir) / "labels"
        if labels_dir is not None:
            from saefe.labels.profiles import LabelProfiles

            profiles = LabelProfiles.load(labels_dir, sae=sae, encoder_info=store.encoder_info)
        from saefe.labels.attributes import read_attributes

        attrs = read_attributes(store)
        eng = cls(store, index, sae, profiles, attrs, model, clip_server, remote, Path(sae_dir) if sae_dir else None)
        eng._open_args = dict(index_dir=index_dir, sae_dir=sae_dir, labels_dir=labels_dir, model=model,
                              clip_server=clip_server, backend=backend)
        return eng

    def reopen(self) -> "Engine":
        """A fresh Engine over the index's current generation, opened with the same arguments
        (saefe.search.live swaps it in when a build updated the index)."""
        args = getattr(self, "_open_args", None)
        if args is None:
            raise SaefeError("this engine was not made by Engine.open, so it cannot be reopened")
        return type(self).open(**args)

    # -- basic facts ------------------------------------------------------------------------
    @property
    def n_total(self) -> int:
        return int(self.backend.n_total) if self.backend else len(self.store)

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def labels(self) -> list[str]:
        return list(self.profiles.labels) if self.profiles is not None else []

    def require_sae(self):
        if self.sae is None:
            raise SaefeError(f"no SAE for the index at {self.store.dir}; pass --sae weights/NAME (train one with `saefe train-sae`)")
        return self.sae

    def require_profiles(self):
        if self.profiles is None:
            raise SaefeError("no label profiles for this SAE; build them with `saefe labels`")
        return self.profiles

    # -- encoders -----------------------------------------------------------------------------
    @cached_property
    def encoder(self):
        from saefe.ingest.encoder import load_encoder

        enc = load_encoder(self._model or self.info.model_id, self._clip_server)
        self.info.check_compatible(enc.info, f"the index at {self.store.dir}", "the query encoder")
        return enc

    def embed_text(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise SaefeError("empty text query")
        return self.encoder.embed_texts([text])[0]

    def embed_image(self, image) -> np.ndarray:
        from saefe.ingest.images import BadImage, decode_image

        if isinstance(image, (bytes, bytearray)):
            try:
                image = decode_image(bytes(image))
            except BadImage as e:
                raise SaefeError(f"cannot use the query image: {e}") from None
        elif isinstance(image, (str, Path)):
            try:
                with open(image, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise SaefeError(f"cannot read the query image {image}: {e.strerror or type(e).__name__}") from None
            return self.embed_image(data)
        return self.encoder.embed_images([image])[0]

    def embed_image_bytes(self, data: bytes) -> np.ndarray:
        return self.embed_image(data)

    # -- steering -------------------------------------------------------------------------------
    def mix(self, term: Term):
        """A FeatureMix from a label, an expression or explicit {feature: weight}."""
        from saefe.search.mix import FeatureMix, evaluate_expression

        sae = self.require_sae()
        if term.kind == "features":
            try:
                items = list(term.value.items() if hasattr(term.value, "items") else term.value)
                items = [(f, w) for f, w in items]
            except (TypeError, ValueError):
                raise SteeringError("a features term needs {feature id: weight} or (id, weight) pairs") from None
            m = FeatureMix(d_hidden=sae.config.d_hidden, clip=None)
            for f, w in items:
                m.set(f, _check_weight(w, f"feature {f}"))
            if m.is_zero():
                raise SteeringError("all sliders are zero")
            return m
        profiles = self.require_profiles()
        if term.kind == "label":
            return FeatureMix(d_hidden=sae.config.d_hidden).apply_label(profiles, str(term.value))
        if term.kind == "expr":
            return evaluate_expression(str(term.value), profiles)
        raise SteeringError(f"a {term.kind} term is not a feature mix")

    def direction(self, mix) -> np.ndarray:
        from saefe.search.mix import query_vector

        return query_vector(mix, self.require_sae())

    @cached_property
    def predefined(self) -> dict[str, np.ndarray]:
        """Each label's direction (its mean activations over its distinct+shared features)."""
        if self.profiles is None or self.sae is None:
            return {}
        out = {}
        for name in self.profiles.labels:
            try:
                out[name] = self.direction(self.mix(Term("label", name)))
            except SteeringError as e:
                log.debug("no direction for %s: %s", name, e)
        return out

    def term_vector(self, term: Term) -> np.ndarray:
        kind = term.kind
        if kind not in TERM_KINDS:
            raise SaefeError(f"unknown term type {kind!r}; use one of {', '.join(TERM_KINDS)}")
        if kind == "embedding":
            try:
                v = np.asarray(term.value, dtype=np.float32).reshape(-1)
            except (TypeError, ValueError):
                raise SaefeError("an embedding term needs a list of numbers") from None
            if v.shape[0] != self.dim:
                raise IncompatibleError(f"query embedding has dimension {v.shape[0]}, the index has {self.dim}")
            return _unit(v, "query embedding")
        if kind == "text":
            return self.embed_text(term.value)
        if kind == "image":
            return self.embed_image(term.value)
        if kind == "predefined":
            if term.value not in self.predefined:
                raise SteeringError(f"unknown predefined embedding {term.value!r}")
            return self.predefined[term.value]
        return self.direction(self.mix(term))

    def query_vector(self, terms: Sequence[Term]) -> np.ndarray:
        if not terms:
            raise SteeringError("empty query: give a label, expression, features, text or image")
        acc = np.zeros(self.dim, np.float64)
        for t in terms:
            acc += _check_weight(t.weight, f"{t.kind} term") * self.term_vector(t)
        return _unit(acc, "the combined query")

    # -- search ---------------------------------------------------------------------------------
    def _results(self, ids: np.ndarray, scores: np.ndarray) -> list[SearchResult]:
        keep = [(int(i), float(sc)) for i, sc in zip(ids, scores) if i >= 0]
        metas = self.store.rows([i for i, _ in keep])
        return [SearchResult(i, sc, m) for (i, sc), m in zip(keep, metas)]

    def search_vector(self, vec: np.ndarray, k: int = 20) -> list[SearchResult]:
        v = np.asarray(vec, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise IncompatibleError(f"query vector has dimension {v.shape[0]}, the index has {self.dim}")
        k = _check_k(k)
        if self.backend is not None:
            return self.backend.search_vector(v, k)
        scores, ids = self.index.search(v[None, :], k)
        return self._results(ids[0], scores[0])

    @cached_property
    def ranker(self):
        from saefe.search.feature_rank import FeatureRanker
        from saefe.labels.profiles import load_or_compute_codes

        sae = self.require_sae()
        if self.sae_dir is not None:  # the stored inverted index, when encode-sae wrote one
            try:
                from saefe.sae.codes import open_codes

                _, csc = open_codes(self.store.data, self.sae_dir)  # memory-mapped postings
                if csc is not None and csc.shape == (len(self.store), sae.config.d_hidden):
                    return FeatureRanker(csc, len(self.store))
            except (SaefeError, OSError, ValueError, KeyError) as e:
                log.debug("no stored CSC codes (%s)", e)
        csr = load_or_compute_codes(self.store, sae, self.sae_dir)
        return FeatureRanker(csr.tocsc(), len(self.store))

    def search_features(self, mix, k: int = 20) -> list[SearchResult]:
        if self.backend is not None:
            raise SaefeError("feature-space ranking needs the local index (not available with --backend)")
        ids, ws = mix.as_arrays()
        return self._rank_arrays(ids, ws, k)

    def _rank_arrays(self, ids: np.ndarray, ws: np.ndarray, k: int) -> list[SearchResult]:
        k = _check_k(k)
        if self.backend is not None:
            raise SaefeError("feature-space ranking needs the local index (not available with --backend)")
        top, scores = self.ranker.rank(ids, ws, k)
        return self._results(top, scores)

    def search(self, terms: Sequence[Term], k: int = 20, mode: str = "direction", debias=None) -> list[SearchResult]:
        """Top-k for ``terms``; ``debias`` (a saefe.search.debias.DebiasConfig) attenuates bias and
        returns a list that also carries ``.info``."""
        if mode not in MODES:
            raise SaefeError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        k = _check_k(k)
        if debias is not None:
            from saefe.search.debias import debiased_search

            return debiased_search(self, terms, k, mode, debias)
        if mode == "direction":
            return self.search_vector(self.query_vector(terms), k)
        from saefe.search.query import feature_weights

        return self._rank_arrays(*feature_weights(self, terms), k)

    def search_page(self, terms: Sequence[Term], k: int = 20, mode: str = "direction", offset: int = 0,
                    where=None, dedup: float | str | None = "auto"):
        """A page of results with filters, near-duplicate collapse and paging (saefe.search.query)."""
        from saefe.search.query import search_page

        return search_page(self, terms, k, mode, offset, where, dedup)

    # -- inspection -----------------------------------------------------------------------------
    def image_features(self, image_id: int, top: int = 10) -> list[tuple[int, float, str | None]]:
        """The image's strongest SAE features with the label each is most tied to."""
        import torch

        sae = self.require_sae()
        if not 0 <= int(image_id) < len(self.store):
            raise SaefeError(f"image id {image_id} is out of range [0, {len(self.store)})")
        x = torch.from_numpy(self.store.vectors_f32([int(image_id)]))
        with torch.no_grad():
            v, i = sae.encode(x)
        v, i = v[0].numpy(), i[0].numpy()
        order = np.argsort(-v)[:top]
        out = []
        for j in order:
            if v[j] <= 0:
                break
            lab = self.profiles.most_tied_label(int(i[j]))[0] if self.profiles is not None else None
            out.append((int(i[j]), float(v[j]), lab))
        return out

    def inspect_feature(self, feature: int, k: int = 8) -> FeatureReport:
        """Top/bottom images by pre-activation x . W_enc[j] (+ b_j): one inner-product search each
        with the encoder row, no pass of the corpus through the SAE."""
        import torch

        sae = self.require_sae()
        h = sae.config.d_hidden
        if not isinstance(feature, (int, np.integer)) or not 0 <= int(feature) < h:
            raise SteeringError(f"feature id {feature} is out of range [0, {h})")
        j = int(feature)
        with torch.no_grad():
            row = sae.up_proj.weight[j].float().cpu().numpy()
            b = float(sae.up_proj.bias[j]) if sae.up_proj.bias is not None else 0.0
            if sae.config.pre_bias and sae.down_proj.bias is not None:
                b -= float(row @ sae.down_proj.bias.float().cpu().numpy())
        if self.index is None:
            raise SaefeError("feature inspection needs the local index")
        s_top, i_top = self.index.search(row[None, :], k)
        s_bot, i_bot = self.index.search(-row[None, :], k)
        freq = None
        if "ranker" in self.__dict__ or (self.sae_dir and (self.store.data / "codes").exists()):
            freq = self.ranker.frequency(j)
        elif self.profiles is not None:
            counts = self.profiles.counts.astype(np.float64)
            freq = float((self.profiles.freq[:, j] * counts).sum() / max(1.0, counts.sum()))
        labels = []
        if self.profiles is not None:
            labels = [(ls.label, float(ls.score)) for ls in self.profiles.labels_for_feature(j)]
        return FeatureReport(j, freq, self._results(i_top[0], s_top[0] + b), self._results(i_bot[0], -s_bot[0] + b), labels)

    @cached_property
    def demographics(self):
        """Per-image groups of the protected attributes: labels where they exist, probe estimates elsewhere."""
        from saefe.labels.estimates import load_demographics

        return load_demographics(self.store, self.attributes, self.profiles, self.sae, self.sae_dir)

    def bias(self, results: Sequence[SearchResult]):
        """The results' demographic make-up (BiasReport; ``.by_attribute()`` is the JSON shape)."""
        from saefe.search.bias import measure_demographics
        from saefe.search.debias import local_ids

        if not self.demographics.attributes:
            raise SaefeError(f"no per-image demographic labels for {self.store.dir} ({ATTRIBUTES}) and no probes to "
                             "estimate them; run `saefe labels --annotations` (probes are fit there)")
        return measure_demographics(local_ids(self, results), self.demographics)


def _check_k(k) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise SaefeError(f"number of results must be an integer, got {k!r}") from None
    if k < 1:
        raise SaefeError(f"number of results must be at least 1, got {k}")
    return min(k, 10_000)
