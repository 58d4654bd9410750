"""The kinds of item on the edges between stages, as stage classes name them in ``consumes`` / ``produces``."""

ITEMS = {
    "documents": "dicts: `text`, `source`, and where it came from (`offset`, `end` in a text file; "
    "`shard`, `record` and the other columns in Arrow/Parquet)",
    "tokens": "dicts: `ids` (numpy int32 [n]) and the document's other fields",
    "windows": "numpy int32 blocks [n, max_length + 1]: input `row[:-1]`, target `row[1:]`",
    "batches": "dicts: `inputs`, `targets` (torch int64 [B, T]); after `embed` also `embeddings` [B, T, D]",
}
