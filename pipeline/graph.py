"""``Pipeline``: a graph of named stages, built in Python or from a config, iterated as a loader."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from torchdata.nodes import BaseNode

from pipeline.config import load_config
from pipeline.loader import Loader
from pipeline.metrics import DataClock, collect
from pipeline.registry import ConfigError, did_you_mean, stage_class
from pipeline.reshard import make_seam, reader_states
from pipeline.schema import FieldError, check_field, fields, item_kinds, takes
from pipeline.shard import Reader
from pipeline.stage import RunContext, Stage, inputs_of, upstream_nodes
from pipeline.storage import version
from pipeline.workers import Workers

STATE_VERSION = 1
_TOP_LEVEL = ("stages", "output")


def _refs(name: str, spec: Mapping[str, Any]) -> list[str]:
    """The inputs a stage names (``input`` or ``inputs``), checked for shape."""
    cls = stage_class(spec.get("type"), name)
    kind = takes(cls)
    if kind == "none":
        for key in ("input", "inputs"):
            if key in spec:
                raise ConfigError(f"type `{cls.type_name}` reads from files and takes no `{key}`", name, key)
        return []
    key, other = ("input", "inputs") if kind == "one" else ("inputs", "input")
    if other in spec:
        raise ConfigError(f"type `{cls.type_name}` takes `{key}`, not `{other}`", name, other)
    if key not in spec:
        raise ConfigError(f"type `{cls.type_name}` needs `{key}`", name, key)
    refs = [spec[key]] if kind == "one" else spec[key]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        want = "a stage name" if kind == "one" else "a list of stage names"
        raise ConfigError(f"`{key}` must be {want}, got {spec[key]!r}", name, key)
    return refs


def _check_ref(ref: str, specs: Mapping[str, Any], stage: str, key: str) -> str:
    """The stage a reference names (``name`` or ``split.branch``)."""
    base, dot, branch = ref.partition(".")
    if base not in specs:
        raise ConfigError(f"`{key}` names `{ref}`, which is not a stage{did_you_mean(ref, specs)}", stage, key)
    if dot:
        branches = stage_class(specs[base].get("type"), base).branch_names(specs[base])
        if not branches:
            raise ConfigError(f"`{key}` names `{ref}`, but `{base}` is not a split stage with branches", stage, key)
        if branch not in branches:
            raise ConfigError(f"split `{base}` has no branch `{branch}`{did_you_mean(branch, branches)}", stage, key)
    return base


def check_config(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """Check a whole config without building anything; return each stage's input references."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"a pipeline config must be a mapping, got {type(config).__name__}")
    unknown = [k for k in config if k not in _TOP_LEVEL]
    if unknown:
        raise ConfigError(
            f"unknown top-level key `{unknown[0]}`{did_you_mean(unknown[0], _TOP_LEVEL)}; expected `stages` and "
            "optionally `output`"
        )
    specs = config.get("stages")
    if not isinstance(specs, Mapping) or not specs:
        raise ConfigError("a pipeline config needs a non-empty `stages` mapping of name -> {type, input, ...}")
    output = config.get("output")
    if output is not None and not isinstance(output, str):
        raise ConfigError(f"`output` must be a stage name (or split.branch), got {output!r}", field="output")
    refs: dict[str, list[str]] = {}
    for name, spec in specs.items():
        if not isinstance(name, str):  # YAML reads `1:` as a number
            raise ConfigError(f"stage names must be strings, got {name!r} ({type(name).__name__}); quote it", str(name))
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise ConfigError("each stage needs a mapping with a `type`", name, "type")
        if "." in name:
            raise ConfigError("stage names may not contain `.` (it addresses split branches)", name)
        cls = stage_class(spec["type"], name)
        schema = fields(cls)
        for field, value in spec.items():
            if field in ("type", "input", "inputs"):
                continue
            if field not in schema:
                raise ConfigError(
                    f"unknown field `{field}` for type `{cls.type_name}`{did_you_mean(field, schema)}", name, field
                )
            try:
                check_field(field, schema[field].hint, value)
            except FieldError as e:
                raise ConfigError(str(e), name, e.field) from None
        for field in schema.values():
            if field.required and field.name not in spec:
                raise ConfigError(f"missing required field `{field.name}` for type `{cls.type_name}`", name, field.name)
        refs[name] = _refs(name, spec)
        key = "inputs" if takes(cls) == "many" else "input"
        for ref in refs[name]:
            _check_ref(ref, specs, name, key)
    _check_acyclic(specs, refs)
    _check_items(specs, refs)
    return refs


def _check_acyclic(specs, refs) -> None:
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise ConfigError(f"the graph has a cycle: {' -> '.join(cycle)}", name, "input")
        state[name] = "visiting"
        for ref in refs[name]:
            visit(ref.partition(".")[0], path + [name])
        state[name] = "done"

    for name in specs:
        visit(name, [])


def _check_items(specs, refs) -> None:
    """Each stage's input must give a kind of item it takes (its ``consumes``)."""
    for name, names in refs.items():
        wants = item_kinds(stage_class(specs[name]["type"], name).consumes)
        for ref in names if wants else []:
            gives = stage_class(specs[ref.partition(".")[0]]["type"], ref).produces
            if gives not in wants:
                key = "inputs" if len(names) > 1 or "inputs" in specs[name] else "input"
                raise ConfigError(f"takes {' or '.join(wants)}, but its input `{ref}` gives {gives}", name, key)


def build_stages(config: Mapping[str, Any]) -> dict[str, BaseNode]:
    """Check a config's whole graph, then construct every stage in dependency order."""
    refs = check_config(config)
    specs = config["stages"]
    built: dict[str, BaseNode] = {}

    def build(name: str) -> BaseNode:
        if name in built:
            return built[name]
        spec = dict(specs[name])
        cls = stage_class(spec.pop("type"), name)
        spec.pop("input", None), spec.pop("inputs", None)
        sources = [_node(ref, build) for ref in refs[name]]
        try:
            if takes(cls) == "many":
                node = cls(sources, **spec)
            else:
                node = cls(*sources, **spec)
        except (ValueError, TypeError, FileNotFoundError) as e:  # the field, where a validator named it
            raise ConfigError(str(e), name, e.field if isinstance(e, FieldError) else None) from e
        node.name = name
        built[name] = node
        return node

    for name in specs:
        build(name)
    return built


def _node(ref: str, build) -> BaseNode:
    """The node a reference names: a stage, or a fresh branch of one (``split.train``)."""
    base, dot, branch = ref.partition(".")
    return build(base).branch(branch) if dot else build(base)


def check_stages(nodes: list[BaseNode]) -> None:
    """Each stage's own check against the stages upstream of it (``Stage.check_upstream``)."""
    for node in nodes:
        if isinstance(node, Stage):
            node.check_upstream(upstream_nodes(node)[1:])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _with_workers(root: BaseNode, num_workers: int) -> BaseNode:
    """``root`` with a ``Workers`` stage wrapping the topmost chain worth running in workers.

    The graph given is left as it is: the stages above the chain are this pipeline's shallow copies,
    reading from the ``Workers`` (they share the originals' settings, modules and counters).
    """
    if any(isinstance(n, Workers) for n in upstream_nodes(root)):
        raise ValueError("the pipeline already has a Workers stage; pass num_workers to one or the other")
    if isinstance(root, Stage) and root.in_workers:
        return Workers(root, num_workers)
    inputs = inputs_of(root)
    if len(inputs) != 1 or not isinstance(root, Stage):
        raise ValueError("num_workers: no chain of read/encode/window stages to put in workers")
    above = copy.copy(root)
    above.source = _with_workers(inputs[0], num_workers)
    return above


def _workers_at(root: BaseNode) -> BaseNode:
    """The topmost stage worth running in workers on the output's chain (where ``Workers`` goes)."""
    node = root
    while not (isinstance(node, Stage) and node.in_workers):
        inputs = inputs_of(node)
        if len(inputs) != 1:
            raise ValueError("num_workers: no chain of read/encode/window stages to put in workers")
        node = inputs[0]
    return node


class Pipeline:
    """A runnable graph of stages: iterate it for batches; save and restore where it stands.

    Args:
        stages: the output stage (its upstream stages are found through ``source``/``sources``), or
            a mapping of stage names to stages.
        output: with a mapping, the stage (or ``split.branch``) to iterate (default: the last one).
        rank, world_size: this process's place among the ranks, handed to every stage in the run context
            (default: each reader's own, from torch.distributed or the RANK / WORLD_SIZE environment).
        num_workers: worker processes for the reading, encoding and windowing stages (0: in this process).

    ``Pipeline.from_config`` builds the same objects from a YAML/TOML file or a dict.
    """

    def __init__(
        self,
        stages: BaseNode | Mapping[str, BaseNode],
        output: str | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
    ):
        if isinstance(stages, BaseNode):
            if output is not None:
                raise ValueError("output= selects a stage by name; pass a mapping of stages to use it")
            self.stages = {getattr(n, "name", type(n).__name__): n for n in reversed(upstream_nodes(stages))}
            root = stages
        else:
            self.stages = dict(stages)
            output = output if output is not None else list(self.stages)[-1]
            if not isinstance(output, str):
                raise ConfigError(f"output must be a stage name (or split.branch), got {output!r}", field="output")
            base, dot, branch = output.partition(".")
            if base not in self.stages:
                raise ConfigError(
                    f"output `{output}` is not a stage{did_you_mean(output, self.stages)}", field="output"
                )
            branches = self.stages[base].branches if isinstance(self.stages[base], Stage) else ()
            if dot and branch not in branches:
                raise ConfigError(
                    f"output `{output}`: `{base}` has no branch `{branch}`{did_you_mean(branch, branches)}",
                    field="output",
                )
            root = _node(output, self.stages.__getitem__) if dot else self.stages[base]
        self.output = getattr(root, "name", output)
        _check_consumed_once(root)
        check_stages(list(self.stages.values()) + upstream_nodes(root))
        self.num_workers = num_workers
        self.root = _with_workers(root, num_workers) if num_workers else root
        if (rank is not None or world_size is not None) and isinstance(self.root, Stage):
            self.root.set_context(RunContext(rank=rank, world_size=world_size))  # else each reader's own place
        self.loader = Loader(self.root)
        self.clock = DataClock()  # the consumer's wait in next(), read by metrics()

    @classmethod
    def from_config(
        cls, config: str | os.PathLike | Mapping[str, Any], output: str | None = None, **loader: Any
    ) -> Pipeline:
        """Build a pipeline from a config file (YAML, TOML, JSON) or dict: ``{stages: {name: {type, input, ...}}}``.

        ``loader`` takes the constructor's keywords: ``rank``, ``world_size``, ``num_workers``.
        """
        spec = load_config(config)
        built = build_stages(spec)
        return cls(built, output=output if output is not None else spec.get("output"), **loader)

    def __iter__(self) -> Iterator[Any]:
        return _Iteration(self)

    def close(self) -> None:
        """Stop worker processes now (also done when the pipeline is deleted or leaves a ``with``)."""
        for node in upstream_nodes(self.root):
            if isinstance(node, Workers):
                node.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self, _finalizing=sys.is_finalizing) -> None:  # bound now: at exit, module globals are gone
        if "root" in self.__dict__ and not _finalizing():
            self.close()

    @property
    def embedding(self):
        """The embed stage's module (``tok_emb``, ``pos_emb``), for the optimizer; None without one."""
        stages = [node for node in upstream_nodes(self.root) if isinstance(node, Stage)]
        return next((node.module for node in stages if node.module is not None), None)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: positions, epochs and seeds (JSON-serializable, no data)."""
        state = {"state_version": STATE_VERSION, "fits": self._fingerprint(), "loader": self.loader.state_dict()}
        # seams given to the readers here reach worker processes only when they start: kept here too
        seams = {n.name: n.seams for n in upstream_nodes(self.root) if isinstance(n, Reader) and n.seams}
        return {**state, "seams": seams} if seams else state

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]], reshard: bool = False) -> None:
        """Continue, at the next ``iter()``, with exactly the batches that followed ``state``.

        Raises ``ValueError`` naming what differs when the state was saved by another pipeline
        (stages or parameters, corpus files, rank, world size, workers).

        With ``reshard=True``, ``state`` is the list of the states of every rank of a run on another
        topology (ranks and workers; a single state when only ``num_workers`` changed): the epoch goes
        on from where they stood, every document read once over all ranks and workers, and the next
        epochs are this topology's (``pipeline.reshard``). Downstream buffers (tokens not yet windowed,
        windows not yet batched) are not carried over: their data is read again from the readers'
        saved positions.
        """
        if not reshard:
            self._check_fits(state, topology=True)
            for node in upstream_nodes(self.root):
                if isinstance(node, Reader):
                    node.set_seams(state.get("seams", {}).get(node.name, {}))
            self.loader.load_state_dict(state["loader"])
            return
        states = [state] if isinstance(state, Mapping) else list(state)
        for one in states:
            self._check_fits(one, topology=False)
        stage_root = self.root.source if isinstance(self.root, Workers) else self.root
        readers = [n for n in upstream_nodes(stage_root) if isinstance(n, Reader)]
        if not readers:
            raise ValueError("reshard=True: this pipeline has no reader stage to share out")
        workers = {one["fits"]["num_workers"] for one in states}
        world = {w for one in states for w in one["fits"]["world_size"]}
        ranks = [one["fits"]["rank"][0] for one in states]
        if len(workers) > 1 or len(world) > 1:
            raise ValueError(
                f"reshard=True: the states come from different runs (world sizes {sorted(world)}, workers "
                f"{sorted(workers)})"
            )
        (old_workers,), (old_world,) = workers, world
        (me, my_world), slots = readers[0].place(), max(self.num_workers, 1)
        if len(states) == 1 and old_world > 1:  # only num_workers changed: this rank deals its own units out
            if (old_world, ranks[0]) != (my_world, me):
                raise ValueError(
                    f"reshard=True with one state: it is rank {ranks[0]}'s of {old_world}; this is rank {me} of "
                    f"{my_world}; pass the states of all {old_world} ranks of the previous run"
                )
            among = [me * slots, slots]
        elif sorted(ranks) != list(range(old_world)):
            missing = sorted(set(range(old_world)) - set(ranks))
            raise ValueError(
                f"reshard=True needs the state of every rank of the previous run (0 to {old_world - 1}), "
                f"got ranks {sorted(ranks)}" + (f": missing {missing}" if missing else "")
            )
        else:
            among = [0, my_world * slots]
        wrapped = _workers_at(stage_root) if old_workers else None
        roots = sorted(zip(ranks, (one["loader"]["root"] for one in states)), key=lambda pair: pair[0])
        found = reader_states(stage_root, roots, wrapped, old_world)
        # ranks may be in different epochs (their shares differ): each epoch up to the last gets a seam
        epochs = {epoch for per_worker in found.values() for epoch, *_ in per_worker.values()}
        first, old_slots = min(epochs), old_world * max(old_workers, 1)
        for node in upstream_nodes(self.root):
            if isinstance(node, Reader):
                saved = [one.get("seams", {}).get(node.name, {}) for one in states]
                node.set_seams(
                    {
                        str(e): make_seam(node, found[id(node)], saved, e, old_slots, among)
                        for e in range(first, max(epochs) + 1)
                    }
                )
            if hasattr(node, "set_epoch"):  # Workers, batch; readers and mix take it from the context
                node.set_epoch(first)
        self.root.set_context(replace(self.root.context, epoch=first))
        self.loader = Loader(self.root)

    def _check_fits(self, state: Any, topology: bool) -> None:
        """Refuse a state of another version, graph or corpus (and, with ``topology``, rank or workers)."""
        if not isinstance(state, Mapping) or state.get("state_version") != STATE_VERSION:
            found = state.get("state_version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"not a pipeline state of version {STATE_VERSION} (state_version: {found!r})"
                + ("; a list of every rank's states is for reshard=True" if isinstance(state, list) else "")
            )
        mine = self._fingerprint()
        fits = state.get("fits")
        missing = [f for f in mine if f not in fits] if isinstance(fits, Mapping) else ["fits"]
        if missing or "loader" not in state:
            raise ValueError(f"this state lacks `{(missing or ['loader'])[0]}`: it cannot be checked against the "
                             "pipeline (a hand-edited or truncated state?)")
        for field, saved in fits.items():
            if mine.get(field) != saved and (topology or field in ("graph", "corpus")):
                moved = field in ("rank", "world_size", "num_workers")
                raise ValueError(
                    f"this state does not fit the pipeline: `{field}` was {saved!r} when it was saved and is "
                    f"{mine.get(field)!r} now"
                    + (" (the stages or their parameters differ)" if field == "graph" else "")
                    + ("; to continue on another topology, pass every rank's state with reshard=True" if moved else "")
                )

    def _fingerprint(self) -> dict[str, Any]:
        """What a saved state must match: the graph, the corpus files (sizes, and objects' modification times),
        rank and workers."""
        nodes = [n for n in reversed(upstream_nodes(self.root)) if isinstance(n, Stage) and n.params is not None]
        graph = [
            [n.name, n.type_name, {k: v for k, v in n.params.items() if k not in ("rank", "world_size")}] for n in nodes
        ]
        readers = [n for n in nodes if isinstance(n, Reader)]
        files = [path for n in readers for path in n.paths()]
        corpus = [[f, *version(f)] for f in files]
        places = [n.place() for n in reversed(upstream_nodes(self.root)) if isinstance(n, Reader)]  # a user's own too
        return {
            "graph": _digest(graph),
            "corpus": _digest(corpus),
            "rank": [rank for rank, _ in places],
            "world_size": [world_size for _, world_size in places],
            "num_workers": self.num_workers,
        }

    def stats(self) -> dict[str, dict[str, float]]:
        """Counters of every stage on the output's path, upstream first."""
        return {node.name: dict(node.stats) for node in reversed(upstream_nodes(self.root)) if isinstance(node, Stage)}

    def metrics(self) -> dict[str, float]:
        """A flat dict of numbers: per stage ``<stage>/items``, ``/tokens``, ``/busy_s``, ``/wait_s`` (this
        pass), and what stages add (a mix's draws per input, the workers' queues); ``data_wait_s`` and
        ``data_wait_share``: the consumer's time blocked in ``next()``, and its share of the wall time,
        since the previous call. See ``pipeline.metrics``."""
        return collect(self.root, self.clock)

    def __repr__(self) -> str:
        lines = [f"Pipeline(output={self.output!r}, num_workers={self.num_workers})"]
        for node in reversed(upstream_nodes(self.root)):
            if isinstance(node, Stage):
                inputs = ", ".join(getattr(n, "name", "?") for n in inputs_of(node))
                params = node.settings()
                gives = f" -> {node.produces}" if node.produces else ""
                lines.append(f"  {node.name}: {node.type_name}({params}){' <- ' + inputs if inputs else ''}{gives}")
        return "\n".join(lines)


class _Iteration:
    """One pass over a pipeline's loader; it holds the pipeline, whose deletion stops the workers."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self._clock = pipeline.clock  # kept across passes: metrics() covers the time since its previous call
        start = time.perf_counter()
        self._iterator = iter(pipeline.loader)  # may reset the stages and start workers: the consumer waits
        self._clock.waited += time.perf_counter() - start

    def __iter__(self) -> _Iteration:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self._clock.waited += time.perf_counter() - start


def _check_consumed_once(root: BaseNode) -> None:
    """A stream can feed one consumer: refuse an output whose graph reads one stage twice."""
    seen: set[int] = set()
    for node in upstream_nodes(root):
        if id(node) in seen:
            raise ConfigError(
                f"stage `{getattr(node, 'name', node)}` feeds two stages on the way to output "
                f"`{getattr(root, 'name', root)}`; "
                "a stream can be read by one stage (make two outputs, e.g. one per split branch)",
                getattr(node, "name", None),
            )
        seen.add(id(node))
