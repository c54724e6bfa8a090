"""One declaration per op: its inputs, outputs and attributes (type, default, allowed values).

Every face of an op reads its :class:`OpSpec`: the ONNX ``OpSchema``, the attributes the export
writes on a node, the function body's attribute defaults, the pass readers
(``read_moe_layer``), the TensorRT plugin's attributes and each lowering, which states the
attribute values it implements and refuses every other one with a reason
(:meth:`OpSpec.unsupported`: reject by default).

Pure Python: importing it needs neither onnx nor torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Attr", "Port", "OpSpec"]

_KINDS = (int, float, str)


@dataclass(frozen=True)
class Attr:
    """One attribute: ``kind`` int | float | str; ``default`` None means required."""

    name: str
    kind: type
    default: Any = None
    allowed: tuple[Any, ...] | None = None  # the only values it may take (None: any value of its kind)
    doc: str = ""
    # attributes that only matter for some values of another one: {"activation": ("clamped_swiglu",)}
    only_with: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # written on every node even at its default: the attributes version-1 nodes have always carried
    # (keeps their exports byte-identical) and plugin_namespace, which TensorRT's parser looks for
    always: bool = False
    since: int = 1  # the op version that added it; a node carrying it needs that version of the domain
    # values added in a later version than the attribute: {"sparsemixer": 3} (a node holding one needs that version)
    since_values: Mapping[Any, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.kind in _KINDS, (self.name, self.kind)

    @property
    def required(self) -> bool:
        return self.default is None

    def applies(self, resolved: Mapping[str, Any]) -> bool:
        """Whether this attribute matters given the other attributes' values (see ``only_with``)."""
        return all(resolved[dep] in values for dep, values in self.only_with.items())

    def coerce(self, value: Any, op: str) -> Any:
        """``value`` as this attribute's kind, or ValueError naming the attribute and what it takes."""
        kind = self.kind
        ok = (
            (kind is int and isinstance(value, (int, bool)))
            or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (kind is str and isinstance(value, str))
        )
        if not ok:
            raise ValueError(f"{op}: attribute {self.name!r} must be {kind.__name__}, got {value!r}")
        value = kind(value)
        if self.allowed is not None and value not in self.allowed:
            raise ValueError(f"{op}: attribute {self.name!r} must be one of {self.allowed}, got {value!r}")
        return value


@dataclass(frozen=True)
class Port:
    """One input or output; ``types`` names its type variable (``"T"``), ``optional`` inputs may be absent."""

    name: str
    types: str
    doc: str = ""
    optional: bool = False
    since: int = 1  # the op version that added it (only optional inputs are added later)


@dataclass(frozen=True)
class OpSpec:
    name: str
    domain: str
    version: int
    doc: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    type_constraints: tuple[tuple[str, tuple[str, ...], str], ...]
    attrs: tuple[Attr, ...]

    # --- attributes ----------------------------------------------------------------------------
    def attr(self, name: str) -> Attr:
        for a in self.attrs:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} has no attribute {name!r}; its attributes: {[a.name for a in self.attrs]}")

    @property
    def defaults(self) -> dict[str, Any]:
        return {a.name: a.default for a in self.attrs if not a.required}

    def defaults_for(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults of the optional attributes that apply with these values (a function body's defaults).

        ``{"activation": "silu"}`` leaves out alpha and limit, which only the clamped activation reads.
        """
        resolved = self.resolve(values)
        return {a.name: a.default for a in self.attrs if not a.required and a.applies(resolved)}

    def resolve(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every attribute's value: ``values`` checked against the spec, defaults filled in.

        Raises ValueError for an unknown attribute, a missing required one, or a value of the
        wrong kind or outside the allowed ones.
        """
        unknown = sorted(set(values) - {a.name for a in self.attrs})
        if unknown:
            raise ValueError(f"{self.name}: unknown attribute(s) {unknown}; it has {[a.name for a in self.attrs]}")
        out = {}
        for a in self.attrs:
            if a.name in values and values[a.name] is not None:
                out[a.name] = a.coerce(values[a.name], self.name)
            elif a.required:
                raise ValueError(f"{self.name}: attribute {a.name!r} is required")
            else:
                out[a.name] = a.default
        return out

    def non_default(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The attributes a node must carry: required ones, those marked ``always``, and those that
        differ from their default where they apply (``only_with``), in the spec's order.

        Other defaults are left off, so a model that uses none of the newer options exports exactly
        as before.
        """
        resolved = self.resolve(values)
        out = {}
        for a in self.attrs:
            value = resolved[a.name]
            if a.required or a.always or (a.applies(resolved) and value != a.default):
                out[a.name] = value
        return out

    def version_for(self, values: Mapping[str, Any], inputs: tuple[str, ...] = ()) -> int:
        """The op version a node needs: the newest ``since`` among the attributes it carries
        (:meth:`non_default`) and the inputs it passes (``inputs``: names of the present ones).

        A node that uses none of the newer options needs version 1, so its model keeps importing
        the domain at the version it always did.
        """
        needed = [max(self.attr(name).since, self.attr(name).since_values.get(value, 1))
                  for name, value in self.non_default(values).items()]
        needed += [self.inputs[self.input_index(name)].since for name in inputs]
        return max(needed, default=1)

    def unsupported(self, values: Mapping[str, Any], implements: Mapping[str, tuple[Any, ...]],
                    what: str) -> str | None:
        """Why ``what`` (a lowering) cannot take a node with these attribute values, or None.

        ``implements`` maps attribute names to the values the lowering implements; an attribute
        it does not name must hold its default (reject by default). Attributes that only apply
        with other values (``only_with``) are not checked where they do not apply.
        """
        resolved = self.resolve(values)
        for a in self.attrs:
            if a.name == "plugin_namespace":
                continue
            if not a.applies(resolved):
                continue  # e.g. alpha when the activation is not the clamped one
            value = resolved[a.name]
            if a.name in implements:
                if value not in implements[a.name]:
                    return (f"{what} implements {a.name} in {tuple(implements[a.name])}, "
                            f"the node has {a.name}={value!r}")
            elif not a.required and value != a.default:
                return f"{what} does not implement {a.name}={value!r} (only the default {a.default!r})"
        return None

    # --- inputs --------------------------------------------------------------------------------
    def input_index(self, name: str) -> int:
        for i, p in enumerate(self.inputs):
            if p.name == name:
                return i
        raise KeyError(f"{self.name} has no input {name!r}; its inputs: {[p.name for p in self.inputs]}")

    @property
    def input_names(self) -> list[str]:
        return [p.name for p in self.inputs]

    @property
    def required_input_names(self) -> list[str]:
        return [p.name for p in self.inputs if not p.optional]

    @property
    def output_names(self) -> list[str]:
        return [p.name for p in self.outputs]

    # --- ONNX ------------------------------------------------------------------------------------
    def onnx_schema(self, version: int | None = None):
        """The ``onnx.defs.OpSchema`` of ``version`` (default the newest; registered only while exporting):
        the inputs and attributes that version has (their ``since``).

        Only required and ``always`` attributes are declared with their default: torch's dynamo
        exporter writes every default a schema declares onto each node, so the others are declared
        optional without one (their defaults live in the function body's attribute defaults), and a
        node carries exactly :meth:`non_default`.
        """
        from onnx import helper
        from onnx.defs import OpSchema

        kinds = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}
        option = OpSchema.FormalParameterOption

        def port(p: Port):
            return OpSchema.FormalParameter(p.name, p.types, p.doc,
                                            param_option=option.Optional if p.optional else option.Single)

        version = self.version if version is None else version
        if not 1 <= version <= self.version:
            raise ValueError(f"{self.name}: version must be in 1..{self.version}, got {version}")
        attributes = []
        for a in self.attrs:
            if a.since > version:
                continue
            if a.required:
                attributes.append(OpSchema.Attribute(a.name, kinds[a.kind], a.doc))
            elif a.always:
                attributes.append(OpSchema.Attribute(a.name, helper.make_attribute(a.name, a.default), a.doc))
            else:
                doc = f"{a.doc} (default {a.default!r})" if a.doc else f"default {a.default!r}"
                attributes.append(OpSchema.Attribute(a.name, kinds[a.kind], doc, required=False))
        return OpSchema(
            self.name, self.domain, version, doc=self.doc,
            inputs=[port(p) for p in self.inputs if p.since <= version], outputs=[port(p) for p in self.outputs],
            type_constraints=[(t, list(allowed), doc) for t, allowed, doc in self.type_constraints],
            attributes=attributes,
        )

    # --- torch -------------------------------------------------------------------------------------
    def torch_schema(self, attrs: tuple[str, ...], returns: str, kinds: Mapping[str, str] | None = None) -> str:
        """The ``torch.library`` schema of the torch op: the inputs (optional ones ``Tensor? = None``)
        and the attributes ``attrs`` with the spec's kinds and defaults, e.g.
        ``(Tensor x, Tensor? b=None, str activation="silu") -> Tensor``.

        Inputs come first unless ``attrs`` names them: an input added in a later version goes after
        the attributes existing callers pass by position (``attrs=("k", ..., "selection_bias", ...)``).
        ``kinds`` overrides the torch type of an attribute (``{"normalize": "bool"}``).
        """
        names = {int: "int", float: "float", str: "str"}
        kinds = dict(kinds or {})
        inputs = {p.name: p for p in self.inputs}

        def tensor(p: Port) -> str:
            return f"Tensor? {p.name}=None" if p.optional else f"Tensor {p.name}"

        args = [tensor(p) for p in self.inputs if p.name not in attrs]
        for name in attrs:
            if name in inputs:
                args.append(tensor(inputs[name]))
                continue
            a = self.attr(name)
            kind = kinds.get(name, names[a.kind])
            if a.required:
                args.append(f"{kind} {a.name}")
            elif kind == "bool":
                args.append(f"bool {a.name}={bool(a.default)}")
            else:
                default = f'"{a.default}"' if a.kind is str else repr(a.kind(a.default))
                args.append(f"{kind} {a.name}={default}")
        return f"({', '.join(args)}) -> {returns}"

    def read_ir_attributes(self, node) -> dict[str, Any]:
        """An onnx-ir node's attributes, resolved against the spec (defaults filled in)."""
        getters = {int: "as_int", float: "as_float", str: "as_string"}
        values = {}
        for name, attr in node.attributes.items():
            kind = self.attr(name).kind if name in {a.name for a in self.attrs} else None
            if kind is None:
                raise ValueError(f"{self.name} node {node.name!r} has an unknown attribute {name!r}")
            values[name] = getattr(attr, getters[kind])()
        return self.resolve(values)
