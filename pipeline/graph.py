"""``Pipeline``: a graph of named stages, built in Python or from a config, iterated as a loader."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from torchdata.nodes import BaseNode, Loader

from pipeline.registry import ConfigError, check_fields, did_you_mean, parameters, stage_class
from pipeline.shard import ShardedSource, resolve_rank
from pipeline.stage import upstream_nodes
from pipeline.workers import Workers


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a YAML, TOML or JSON file (or take a dict) describing a pipeline."""
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        import tomllib

        return tomllib.loads(raw.decode())
    if path.endswith(".json"):
        return json.loads(raw)
    import yaml

    loaded = yaml.safe_load(raw)
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping with a `stages` key, got {type(loaded).__name__}")
    return loaded


def build_stages(config: Mapping[str, Any]) -> dict[str, BaseNode]:
    """Check a config's whole graph, then construct its stages in dependency order."""
    specs = config.get("stages")
    if not isinstance(specs, Mapping) or not specs:
        raise ConfigError("a pipeline config needs a non-empty `stages` mapping of name -> {type, input, ...}")
    unknown = set(config) - {"stages", "output"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; expected `stages` and optionally `output`")
    for name, spec in specs.items():
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise ConfigError("each stage needs a mapping with a `type`", name, "type")
        cls = stage_class(spec["type"], name)
        fields = {k: v for k, v in spec.items() if k not in ("type", "input")}
        check_fields(cls, fields, name)
        takes_input = "source" in parameters(cls)
        if takes_input and "input" not in spec:
            raise ConfigError(f"type `{cls.type_name}` needs an `input`", name, "input")
        if not takes_input and "input" in spec:
            raise ConfigError(f"type `{cls.type_name}` reads from files and takes no `input`", name, "input")
        if takes_input and spec["input"] not in specs:
            raise ConfigError(f"input `{spec['input']}` is not a stage{did_you_mean(str(spec['input']), specs)}", name, "input")
    order = _topological(specs)
    built: dict[str, BaseNode] = {}
    for name in order:
        spec = dict(specs[name])
        cls = stage_class(spec.pop("type"), name)
        upstream = spec.pop("input", None)
        try:
            node = cls(built[upstream], **spec) if upstream is not None else cls(**spec)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise ConfigError(str(e), name) from e
        node.name = name
        built[name] = node
    _check_across(specs, built)
    return built


def _topological(specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise ConfigError(f"the graph has a cycle: {' -> '.join(cycle)}", name, "input")
        state[name] = "visiting"
        upstream = specs[name].get("input")
        if upstream is not None:
            visit(upstream, path + [name])
        state[name] = "done"
        order.append(name)

    for name in specs:
        visit(name, [])
    return order


def _check_across(specs: Mapping[str, Any], built: Mapping[str, BaseNode]) -> None:
    """Checks that need two stages: a window longer than the position table it feeds."""
    for name, node in built.items():
        context = getattr(node, "context_length", None)
        if context is None:
            continue
        for upstream in upstream_nodes(node):
            max_length = getattr(upstream, "max_length", None)
            if max_length is not None and max_length > context:
                raise ConfigError(
                    f"context_length {context} is shorter than the windows of stage `{upstream.name}` "
                    f"(max_length {max_length})",
                    name,
                    "context_length",
                )


STATE_VERSION = 1


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _with_workers(root: BaseNode, num_workers: int) -> BaseNode:
    """Put a ``Workers`` node above the topmost stage worth running in workers; return the new root."""
    if getattr(root, "in_workers", False):
        return Workers(root, num_workers)
    for node in upstream_nodes(root):
        if any(isinstance(n, Workers) for n in upstream_nodes(node)[1:]):
            raise ValueError("the pipeline already has a Workers stage; pass num_workers to one or the other")
        source = getattr(node, "source", None)
        if getattr(source, "in_workers", False):
            node.source = Workers(source, num_workers)
            return root
    raise ValueError("num_workers: no stage of this pipeline runs in workers (read, encode or window)")


class Pipeline:
    """A runnable graph of stages: iterate it for batches; save and restore where it stands.

    Args:
        stages: the output stage (its upstream stages are found through ``source``), or a mapping of
            stage names to stages.
        output: with a mapping, the name of the stage to iterate (default: the last one).
        rank, world_size: this process's place among the ranks, given to every reader (default: each
            reader's own, from torch.distributed or the RANK / WORLD_SIZE environment).
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
            chain = upstream_nodes(stages)
            stages = {getattr(node, "name", type(node).__name__): node for node in reversed(chain)}
            output = chain[0].name if hasattr(chain[0], "name") else list(stages)[-1]
        self.stages: dict[str, BaseNode] = dict(stages)
        self.output = output if output is not None else list(self.stages)[-1]
        if self.output not in self.stages:
            raise ConfigError(f"output `{self.output}` is not a stage{did_you_mean(self.output, self.stages)}", field="output")
        self.root = self.stages[self.output]
        if rank is not None or world_size is not None:
            for node in upstream_nodes(self.root):
                if isinstance(node, ShardedSource):
                    node.rank, node.world_size = resolve_rank(
                        node.rank if rank is None else rank, node.world_size if world_size is None else world_size
                    )
        self.num_workers = num_workers
        if num_workers:
            self.root = _with_workers(self.root, num_workers)
        self.loader = Loader(self.root)

    @classmethod
    def from_config(cls, config: str | os.PathLike | Mapping[str, Any], output: str | None = None, **loader: Any) -> Pipeline:
        """Build a pipeline from a config file (YAML, TOML, JSON) or dict: ``{stages: {name: {type, input, ...}}}``.

        ``loader`` takes the constructor's keywords: ``rank``, ``world_size``, ``num_workers``.
        """
        import stages as _  # noqa: F401  (registers the stage types)

        spec = load_config(config)
        built = build_stages(spec)
        output = output if output is not None else spec.get("output")
        if output is not None and output not in built:
            raise ConfigError(f"output `{output}` is not a stage{did_you_mean(str(output), built)}", field="output")
        return cls(built, output=output, **loader)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    @property
    def embedding(self):
        """The embed stage's module (``tok_emb``, ``pos_emb``), for the optimizer; None without one."""
        for node in upstream_nodes(self.root):
            if hasattr(node, "module"):
                return node.module
        return None

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: positions, epochs and seeds (JSON-serializable, no data)."""
        return {"state_version": STATE_VERSION, "fits": self._fingerprint(), "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue, at the next ``iter()``, with exactly the batches that followed ``state``.

        Raises ``ValueError`` naming what differs when the state was saved by another pipeline
        (stages or parameters, corpus files, rank, world size, workers).
        """
        if not isinstance(state, Mapping) or state.get("state_version") != STATE_VERSION:
            found = state.get("state_version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a pipeline state of version {STATE_VERSION} (state_version: {found!r})")
        mine = self._fingerprint()
        for field, saved in state["fits"].items():
            if mine.get(field) != saved:
                raise ValueError(
                    f"this state does not fit the pipeline: `{field}` was {saved!r} when it was saved and is "
                    f"{mine.get(field)!r} now" + (" (the stages or their parameters differ)" if field == "graph" else "")
                )
        self.loader.load_state_dict(state["loader"])

    def _fingerprint(self) -> dict[str, Any]:
        """What a saved state must match: the graph, the corpus files (with sizes), rank and workers."""
        nodes = [n for n in reversed(upstream_nodes(self.root)) if hasattr(n, "params")]
        graph = [[n.name, n.type_name, {k: v for k, v in n.params.items() if k not in ("rank", "world_size")}] for n in nodes]
        readers = [n for n in nodes if isinstance(n, ShardedSource)]
        files = [getattr(f, "path", f) for n in readers for f in n.files]
        corpus = [[f, os.path.getsize(f) if os.path.exists(f) else None] for f in files]
        return {
            "graph": _digest(graph),
            "corpus": _digest(corpus),
            "rank": [n.rank for n in readers],
            "world_size": [n.world_size for n in readers],
            "num_workers": self.num_workers,
        }

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters of every stage on the output's path, upstream first."""
        return {node.name: dict(node.stats) for node in reversed(upstream_nodes(self.root)) if hasattr(node, "stats")}

    def __repr__(self) -> str:
        path = " -> ".join(f"{n.name}:{n.type_name}" for n in reversed(upstream_nodes(self.root)) if hasattr(n, "type_name"))
        return f"Pipeline({path})"
