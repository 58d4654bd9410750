"""``read_arrow``: documents from Arrow IPC (file or stream format) and Parquet corpora, by shard."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline.registry import register
from pipeline.schema import one_of
from pipeline.shard import ShardedSource
from pipeline.stage import Stage
from pipeline.storage import expand_paths, is_dir, is_remote, load_text, open_input, size, version
from stages.fields import Carried
from stages.text_rows import TextRows, offsets, text_bytes

ARROW_SUFFIXES = (".arrow", ".ipc", ".feather", ".arrows")
NULL_POLICIES = ("error", "skip")


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


class _ArrowFile:
    """One corpus file: its format, schema and number of shard units (record batches or row groups)."""

    def __init__(self, path: str):
        self.path = path
        if size(path) == 0:
            raise ValueError(f"{path}: empty file (0 bytes), not an Arrow or Parquet file")
        try:
            if path.endswith(".parquet"):
                self.format = "parquet"
                with self._open() as source:
                    meta = pq.ParquetFile(source)
                    self.schema, self.n_units = meta.schema_arrow, meta.metadata.num_row_groups
                return
            with self._open() as source:
                try:
                    reader = ipc.open_file(source)
                    self.format, self.schema, self.n_units = "file", reader.schema, reader.num_record_batches
                except pa.ArrowInvalid:  # not the file format: the stream format, which has no footer
                    source.seek(0)
                    self.format, self.schema = "stream", ipc.open_stream(source).schema
                    self._index_stream(source)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: not a readable Arrow IPC or Parquet file ({e})") from None

    def _open(self) -> pa.NativeFile:
        """The file, mapped locally (for one unit only, so RSS stays flat), else read by ranged requests."""
        return open_input(self.path) if is_remote(self.path) else pa.memory_map(self.path)

    def _index_stream(self, source: pa.NativeFile) -> None:
        """Where each message of a stream lies, found in one pass at build, so a unit is read in one seek.

        Locally the file is mapped, so only the message headers are touched; an object is read through once.

        ``_batches``: the record batch messages' spans; ``_dictionaries[i]``: the dictionary messages
        before batch ``i``, which the batch's dictionary columns refer to.
        """
        source.seek(0)
        messages, spans, self._batches, self._dictionaries = ipc.MessageReader.open_stream(source), [], [], []
        while True:
            start = source.tell()
            try:
                message = messages.read_next_message()
            except StopIteration:
                break
            if message.type == "record batch":
                self._batches.append((start, source.tell()))
                self._dictionaries.append(len(spans))
            elif message.type == "dictionary":
                spans.append((start, source.tell()))
            else:
                self._schema_span = (start, source.tell())
        self._dictionary_spans, self.n_units = spans, len(self._batches)

    def read_unit(self, index: int) -> pa.RecordBatch | pa.Table:
        with self._open() as source:
            if self.format == "parquet":
                return pq.ParquetFile(source).read_row_group(index)
            if self.format == "file":
                return ipc.open_file(source).get_batch(index)
            # A stream of its own: the schema, the dictionaries so far, then this batch (not every batch before it).
            spans = [self._schema_span, *self._dictionary_spans[: self._dictionaries[index]], self._batches[index]]
            stream = b"".join(source.read_at(end - start, start) for start, end in spans)
        return ipc.open_stream(stream).read_next_batch()


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def corpus_files(paths: str | list[str], split: str | None) -> list[str]:
    """The Arrow/Parquet files of ``paths``, where a Hugging Face ``save_to_disk`` folder gives its own.

    A ``Dataset`` folder (``state.json``) gives its Arrow files in the dataset's order; a ``DatasetDict``
    folder (``dataset_dict.json``) gives those of ``split``, which it requires. Other paths: files,
    globs and directories (files ending .arrow, .ipc, .feather, .arrows, .parquet).
    """
    files, saw_dict = [], False
    for path in [paths] if isinstance(paths, str) else list(paths):
        path = str(path)
        if not is_dir(path):
            files += expand_paths(path, ARROW_SUFFIXES + (".parquet",))
            continue
        if version(_join(path, "dataset_dict.json"))[0] is not None:
            saw_dict = True
            splits = json.loads(load_text(_join(path, "dataset_dict.json")))["splits"]
            if split not in splits:
                found = ", ".join(splits)
                hint = "set `split`" if split is None else f"no split `{split}`"
                raise ValueError(
                    f"{path}: a Hugging Face DatasetDict folder with splits {found}; {hint} to read one of them"
                )
            path = _join(path, split)
        if version(_join(path, "state.json"))[0] is not None:
            state = json.loads(load_text(_join(path, "state.json")))
            files += [_join(path, f["filename"]) for f in state["_data_files"]]
        else:
            files += expand_paths(path, ARROW_SUFFIXES + (".parquet",))
    if split is not None and not saw_dict:
        raise ValueError(f"`split` is {split!r} but no path is a Hugging Face DatasetDict folder (dataset_dict.json)")
    return files


@register("read_arrow")
class ReadArrow(ShardedSource, Stage[dict]):
    """Reads documents from Arrow IPC files (file or stream format) and Parquet files.

    Shard units are record batches (Arrow) and row groups (Parquet), so one large file still spreads
    over ranks and workers (``pipeline.shard``). Each item is a dict: ``text`` (from ``column``),
    ``source`` (the file), ``shard`` (the unit in the file), ``record`` (the row in the unit), and the
    file's other columns by name. A column named like a field of the pipeline's own (``ids``, ``offset``,
    ``end``, ``source``, ...: ``stages.fields.FIELDS``) would be taken for it: it is left out, with a
    warning naming it, or refused by name when ``columns`` lists it.

    Args:
        paths: files, globs or directories (directories: files ending .arrow, .ipc, .feather, .arrows, .parquet),
            local or URIs (``s3://``, ``gs://``, ``file://``: ``pipeline.storage``). A Hugging Face
            ``save_to_disk`` folder is read in the dataset's own file order.
        split: the split to read from a Hugging Face ``DatasetDict`` folder (required there, refused elsewhere).
        column: the text column (string or large_string).
        columns: other columns to carry with each document (default: all but those named like the pipeline's fields).
        on_null: a null text: ``error`` (naming file, shard and row) or ``skip`` (counted in ``stats``).
        rank, world_size, shuffle, seed: as in ``read_text``.
    """

    in_workers = True  # worth running in DataLoader worker processes
    produces = "documents"

    def __init__(
        self,
        paths: str | list[str],
        column: str = "text",
        columns: list[str] | None = None,
        on_null: str = "error",
        split: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        one_of("on_null", on_null, NULL_POLICIES)
        self.files = [_ArrowFile(path) for path in corpus_files(paths, split)]
        for f in self.files:
            if column not in f.schema.names:
                raise ValueError(f"{f.path}: no column `{column}` (columns: {', '.join(f.schema.names)}); set `column`")
            if not _is_string(f.schema.field(column).type):
                raise ValueError(f"{f.path}: column `{column}` is {f.schema.field(column).type}, not a string column")
            for name in columns or ():
                if name not in f.schema.names:
                    raise ValueError(f"{f.path}: no column `{name}` to carry (columns: {', '.join(f.schema.names)})")
        self.carried = Carried(columns, "columns", "column")
        self.carried.names({n for f in self.files for n in f.schema.names}, column)  # warns about any left out
        self.column, self.columns, self.on_null = column, columns, on_null
        self.init_shards(rank, world_size, shuffle, seed)
        self.units = [[i, j] for i, f in enumerate(self.files) for j in range(f.n_units)]
        self._rows = self._batch = self._text_array = None

    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def read(self, unit: list[int], position: int | None) -> tuple[dict, int] | None:
        file = self.files[unit[0]]
        if self._rows is None:
            self._as_lists(file, unit[1])
        row = position or 0
        texts, meta = self._rows
        if not 0 <= row <= len(texts):
            raise self.error(f"the state's position {row!r} is not a row of this shard ({len(texts)} rows)", file.path,
                             f"shard {unit[1]}")
        while row < len(texts) and texts[row] is None:
            if self.on_null == "error":
                raise self.error(
                    f"null in text column `{self.column}`; set on_null: skip to go on",
                    file.path,
                    f"shard {unit[1]}, row {row}",
                )
            self.stats["null_documents_skipped"] += 1
            row += 1
        if row >= len(texts):
            return None
        self.stats["documents"] += 1
        return self._document(file.path, unit[1], row), row + 1

    def read_many(self, unit: list[int], position: int, budget: int, size) -> tuple[list[dict], int, int] | None:
        """As ``read``, for many rows in one loop; a null text or a bad position goes to ``read``."""
        if self._rows is None:
            self._as_lists(self.files[unit[0]], unit[1])
        texts, meta = self._rows
        if not (isinstance(position, int) and 0 <= position < len(texts)) or texts[position] is None:
            return super().read_many(unit, position, budget, size)
        path, docs, total, row = self.files[unit[0]].path, [], 0, position
        while row < len(texts) and texts[row] is not None and total < budget:
            docs.append(self._document(path, unit[1], row))
            total += size(docs[-1])
            row += 1
        self.stats["documents"] += len(docs)
        return docs, row, total

    def _document(self, path: str, shard: int, row: int) -> dict:
        """Row ``row`` of the loaded record batch as a document: its carried columns, text, file, shard, row."""
        texts, meta = self._rows
        doc = {name: values[row] for name, values in meta.items()}
        doc.update(text=texts[row], source=path, shard=shard, record=row)
        return doc

    def _read_rows(self, budget: int) -> TextRows | None:
        """The next rows as one ``TextRows``, their texts as Arrow arrays (no string or dict a row), until
        their bytes add up to ``budget`` or the stream ends; None (nothing read) where the next row must go
        through ``read``: a null text, invalid UTF-8, a unit continued at a seam, a position the state
        gave that is not a row, the stream's end. The position moves past the rows given (``Stage.read_rows``)."""
        pieces = []
        while budget > 0 and self._index < len(self._assigned):
            unit, start, *windowed = self._assigned[self._index]
            if self._position is None and windowed:  # next() marks a piece continued at a seam
                break
            file, shard = self.files[self.units[unit][0]], self.units[unit][1]
            texts = self._texts(file, shard)
            row = (start or 0) if self._position is None else self._position
            if texts is None or not (isinstance(row, int) and 0 <= row <= len(texts)):
                break
            if row == len(texts):
                self._next_unit()
                continue
            ends = offsets(texts)
            end = max(row + 1, int(np.searchsorted(ends, int(ends[row]) + budget, side="left")))
            piece = texts.slice(row, min(end, len(texts)) - row)
            if piece.null_count:
                break
            try:
                piece.validate(full=True)  # Arrow does not check UTF-8 on read: read() finds the row
            except pa.ArrowInvalid:
                break
            pieces.append((file.path, shard, row, piece))
            budget -= text_bytes(piece)
            self._position = row + len(piece)
        rows = TextRows(pieces) if pieces else None
        self.stats["documents"] += len(rows) if rows else 0
        return rows

    def close_unit(self) -> None:
        self._rows = self._batch = self._text_array = None

    def _texts(self, file: _ArrowFile, index: int) -> pa.Array | None:
        """The unit's text column as one string or large_string array (None for another type)."""
        if self._batch is None:
            self._load(file, index)
        if self._text_array is None:
            texts = self._batch.column(self.column)
            self._text_array = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts  # Parquet
        texts = self._text_array
        return texts if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) else None

    def _load(self, file: _ArrowFile, index: int) -> None:
        try:
            self._batch = file.read_unit(index)
        except (pa.ArrowException, OSError) as e:
            raise self.error(f"cannot read this shard ({e})", file.path, f"shard {index}") from None

    def _as_lists(self, file: _ArrowFile, index: int) -> None:
        """The unit's texts and carried columns as Python lists (``_rows``), for ``read``."""
        if self._batch is None:
            self._load(file, index)
        batch = self._batch
        names = self.carried.names(batch.schema.names, self.column)
        try:
            self._rows = batch.column(self.column).to_pylist(), {n: batch.column(n).to_pylist() for n in names}
        except UnicodeDecodeError:  # Arrow does not check UTF-8 on read: find the row
            for name in [self.column, *names]:
                for row, value in enumerate(batch.column(name)):
                    try:
                        value.as_py()
                    except UnicodeDecodeError as e:
                        raise self.error(
                            f"invalid UTF-8 in column `{name}` ({e.reason})", file.path, f"shard {index}, row {row}"
                        ) from None
            raise
