"""Slider layout and the slider <-> FeatureMix conversion.

A ``gr.State`` holds the authoritative mix ``{feature: weight}``; every operation reads the
sliders (a slider that differs from the state is a user edit), applies the FeatureMix operation
and writes the state and all sliders back. Kept apart from Gradio so it is testable without a page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from saefe.errors import SaefeError, SteeringError
from saefe.search.mix import FeatureMix

if TYPE_CHECKING:
    from saefe.search.engine import Engine

TOP_N = 10  # sliders per group (the seed's K)
N_CUSTOM = 8  # free feature-id slots in the Custom group
SLIDER_STEP = 0.001


@dataclass
class SliderLayout:
    """Which feature each slider shows, grouped as the seed did (Shared, then per label)."""

    groups: list[tuple[str, list[int]]] = field(default_factory=list)  # (title, feature ids)
    captions: dict[int, str] = field(default_factory=dict)  # feature -> "f12 · Esteem"

    @classmethod
    def from_profiles(cls, profiles, top_n: int = TOP_N) -> "SliderLayout":
        if profiles is None:
            return cls()
        groups = [("Shared", [int(f) for f in profiles.shared(k=top_n)])]
        for label in profiles.labels:
            groups.append((label, [int(f) for f in profiles.distinct(label, k=top_n)]))
        captions = {}
        for _, fids in groups:
            for f in fids:
                if f not in captions:
                    lab = profiles.most_tied_label(f)[0]
                    captions[f] = f"f{f} · {lab}" if lab else f"f{f}"
        return cls(groups, captions)

    @property
    def slots(self) -> list[int]:
        """Feature of each slider component, in creation order (duplicates included)."""
        return [f for _, fids in self.groups for f in fids]

    @property
    def shown(self) -> list[int]:
        return sorted(set(self.slots))

    def mirrors(self) -> dict[int, list[int]]:
        """feature -> slot indices, for features shown by more than one slider."""
        out: dict[int, list[int]] = {}
        for i, f in enumerate(self.slots):
            out.setdefault(f, []).append(i)
        return {f: idx for f, idx in out.items() if len(idx) > 1}


def as_feature_id(value, d_hidden: int | None) -> int | None:
    """A custom slot's id (None when empty)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return FeatureMix(d_hidden=d_hidden)._feature(value)


class MixState:
    """Converts between the UI's slider values and the authoritative FeatureMix."""

    def __init__(self, engine: Engine, layout: SliderLayout, n_custom: int = N_CUSTOM):
        self.engine = engine
        self.layout = layout
        self.n_custom = n_custom
        self.d_hidden = engine.sae.config.d_hidden if engine.sae is not None else None
        self.slots = layout.slots
        self.n_slots = len(self.slots)

    # values = [slider_0 .. slider_{S-1}, custom_id_0 .. custom_id_{C-1}, custom_w_0 .. custom_w_{C-1}]
    def read(self, prev: dict | None, values: Sequence) -> FeatureMix:
        prev = {int(k): float(v) for k, v in (prev or {}).items()}
        mix = FeatureMix(d_hidden=self.d_hidden)
        s = self.n_slots
        by_feature: dict[int, list[float]] = {}
        for f, v in zip(self.slots, values[:s]):
            by_feature.setdefault(f, []).append(float(v or 0.0))
        for f, vs in by_feature.items():
            p = prev.get(f, 0.0)
            changed = [v for v in vs if abs(v - p) > SLIDER_STEP / 2]  # sliders show 3 decimals
            w = changed[-1] if changed else p
            if w != 0.0:
                mix.set(f, w)
        ids = values[s : s + self.n_custom]
        ws = values[s + self.n_custom : s + 2 * self.n_custom]
        for fid, w in zip(ids, ws):
            f = as_feature_id(fid, self.d_hidden)
            if f is not None:
                mix.set(f, float(w or 0.0))
        return mix

    def custom_ids(self, values: Sequence) -> list[int | None]:
        s = self.n_slots
        out = []
        for v in values[s : s + self.n_custom]:
            try:
                out.append(as_feature_id(v, self.d_hidden))
            except SaefeError:
                out.append(None)
        return out

    def write(self, mix, custom: list[int | None]) -> list:
        """Slider values + custom slots for ``mix``; features not shown go to free custom slots."""
        shown = set(self.slots)
        custom = list(custom) + [None] * (self.n_custom - len(custom))
        placed = {f for f in custom if f is not None}
        extra = [f for f, w in mix.items() if w != 0.0 and f not in shown and f not in placed]
        for f in extra:
            try:
                i = custom.index(None)
            except ValueError:
                raise SteeringError(
                    f"more than {self.n_custom} features outside the shown sliders; clear a Custom slot "
                    f"(features left: {', '.join(f'f{x}' for x in extra[:8])})"
                ) from None
            custom[i] = f
        sliders = [round(float(mix.get(f, 0.0)), 3) for f in self.slots]
        cids = [f"f{f}" if f is not None else "" for f in custom]
        cws = [round(float(mix.get(f, 0.0)), 3) if f is not None else 0.0 for f in custom]
        return sliders + cids + cws

    def touched(self, values: Sequence) -> list[int]:
        """Sliders a label operation sets: every shown slider plus the filled Custom slots."""
        return sorted(set(self.slots) | {f for f in self.custom_ids(values) if f is not None})

