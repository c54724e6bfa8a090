"""Optimization profiles: the user's ranges for batch, sequence and past length -> per-input shapes.

    parse_profile("batch=1:4:8,seq=1:512:4096,past=0:1024:4096")

Each axis is ``MIN:OPT:MAX``, ``MIN:MAX`` (opt = max) or one number (fixed). Axes left out take
the default range, cut to the model's ``max_position_embeddings``. Several profiles are
separated by ``;`` (e.g. one for decode steps and one for prefill); the engine then holds all of
them and the runtime picks the first that fits each step.

The export names its dynamic axes in ``moetrt.json`` (``batch_size``, ``sequence_length``,
``past_sequence_length``, ``total_sequence_length``); every input's shape is read from there,
with ``total = past + seq`` (the attention mask covers the cached and the new tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from moetrt.errors import MoetrtError

__all__ = ["AxisRange", "ProfileSpec", "parse_profile", "parse_profiles", "DEFAULT_PROFILE", "AXES", "DIM_NAMES"]

DEFAULT_PROFILE = "batch=1:4:8,seq=1:512:4096,past=0:1024:4096"
AXES = ("batch", "seq", "past")
# the export's dimension names (export/io_spec.py) -> profile axis ("total" is past + seq)
DIM_NAMES = {"batch_size": "batch", "sequence_length": "seq", "past_sequence_length": "past",
             "total_sequence_length": "total"}
_ALIASES = {"batch": "batch", "batch_size": "batch", "seq": "seq", "sequence": "seq", "sequence_length": "seq",
            "past": "past", "past_sequence_length": "past"}
_LOWEST = {"batch": 1, "seq": 1, "past": 0}  # a step has at least one row and one new token


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def __iter__(self):
        yield from (self.min, self.opt, self.max)

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max

    def __add__(self, other: AxisRange) -> AxisRange:
        return AxisRange(self.min + other.min, self.opt + other.opt, self.max + other.max)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile: ranges of batch, new tokens per step (seq) and cached tokens (past)."""

    batch: AxisRange
    seq: AxisRange
    past: AxisRange

    @property
    def total(self) -> AxisRange:
        return self.past + self.seq

    def axis(self, name: str) -> AxisRange:
        return self.total if name == "total" else getattr(self, name)

    def __str__(self) -> str:
        return ",".join(f"{a}={self.axis(a)}" for a in AXES)

    def shapes(self, inputs: list[dict]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``{input name: (min shape, opt shape, max shape)}`` for the ``io.inputs`` of ``moetrt.json``."""
        out = {}
        for spec in inputs:
            dims = []
            for dim in spec["shape"]:
                if isinstance(dim, int):
                    dims.append(AxisRange(dim, dim, dim))
                elif dim in DIM_NAMES:
                    dims.append(self.axis(DIM_NAMES[dim]))
                else:
                    raise MoetrtError(
                        f"input {spec['name']} has a dynamic axis {dim!r} that moetrt does not know how to size "
                        f"(known: {', '.join(DIM_NAMES)}); re-export the model with this moetrt"
                    )
            out[spec["name"]] = tuple(tuple(d.min for d in dims)), tuple(d.opt for d in dims), tuple(d.max for d in dims)
        return out

    def to_dict(self) -> dict:
        return {a: list(self.axis(a)) for a in (*AXES, "total")}

    @classmethod
    def from_dict(cls, data: dict) -> ProfileSpec:
        return cls(*(AxisRange(*data[a]) for a in AXES))


def _parse_range(axis: str, text: str) -> AxisRange:
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise MoetrtError(f"profile axis {axis}={text!r}: use MIN:OPT:MAX, MIN:MAX or N with whole numbers, "
                          f"e.g. {axis}=1:4:8") from None
    if len(values) == 1:
        values = values * 3
    elif len(values) == 2:
        values = [values[0], values[1], values[1]]
    elif len(values) != 3:
        raise MoetrtError(f"profile axis {axis}={text!r}: give MIN:OPT:MAX (3 numbers at most), e.g. {axis}=1:4:8")
    low, opt, high = values
    if not low <= opt <= high:
        raise MoetrtError(f"profile axis {axis}={text!r}: needs MIN <= OPT <= MAX")
    if low < _LOWEST[axis]:
        raise MoetrtError(f"profile axis {axis}={text!r}: MIN must be at least {_LOWEST[axis]}")
    return AxisRange(low, opt, high)


def _clamp(r: AxisRange, high: int, low: int) -> AxisRange:
    top = max(low, min(r.max, high))
    return AxisRange(min(r.min, top), min(r.opt, top), top)


def parse_profile(text: str | None = None, max_positions: int | None = None) -> ProfileSpec:
    """One profile from ``"batch=1:4:8,seq=1:512:4096,past=0:1024:4096"`` (any subset of the axes).

    Axes left out take :data:`DEFAULT_PROFILE`'s range cut to ``max_positions``; a given
    ``seq`` or ``past`` beyond ``max_positions`` is an error (the model cannot use those
    positions). :data:`DEFAULT_PROFILE` itself counts as "nothing given", so it fits any model.
    """
    if text is not None and text.replace(" ", "") == DEFAULT_PROFILE:
        text = None
    given: dict[str, AxisRange] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        axis = _ALIASES.get(name.strip().lower())
        if not sep or axis is None:
            raise MoetrtError(
                f"cannot read profile item {item!r}: write AXIS=MIN:OPT:MAX with AXIS one of {', '.join(AXES)}, e.g. "
                f"{DEFAULT_PROFILE!r}"
            )
        if axis in given:
            raise MoetrtError(f"profile axis {axis} is given twice in {text!r}")
        given[axis] = _parse_range(axis, value.strip())
    defaults = _defaults()
    ranges = {}
    for axis in AXES:
        if axis in given:
            ranges[axis] = given[axis]
        else:
            ranges[axis] = defaults[axis]
            if max_positions is not None and axis in ("seq", "past"):
                ranges[axis] = _clamp(ranges[axis], max_positions if axis == "seq" else max_positions - 1, _LOWEST[axis])
    if max_positions is not None:
        for axis, limit in (("seq", max_positions), ("past", max_positions - 1)):
            if axis in given and given[axis].max > limit:
                raise MoetrtError(
                    f"profile axis {axis}={given[axis]} goes past the model's max_position_embeddings "
                    f"({max_positions}): {axis} can be at most {limit}; lower its MAX"
                )
    return ProfileSpec(ranges["batch"], ranges["seq"], ranges["past"])


def _defaults() -> dict[str, AxisRange]:
    return {item.split("=")[0]: _parse_range(item.split("=")[0], item.split("=")[1]) for item in DEFAULT_PROFILE.split(",")}


def parse_profiles(text: str | None = None, max_positions: int | None = None) -> list[ProfileSpec]:
    """Profiles separated by ``;``; ``None`` or ``""`` gives the one default profile."""
    parts = [p for p in (text or "").split(";") if p.strip()] or [None]
    return [parse_profile(p, max_positions) for p in parts]
