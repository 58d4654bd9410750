"""The kinds of item on the edges between stages, as stage classes name them in ``consumes`` / ``produces``."""

ITEMS = {
    "documents": "dicts: `text`, `source`, and where it came from (`offset`, `end` in a text file; "
    "`shard`, `record` and the other columns in Arrow/Parquet)",
    "tokens": "dicts: `ids` (numpy int32 [n]) and the document's other fields",
    "windows": "numpy int32 blocks [n, max_length + 1]: input `row[:-1]`, target `row[1:]`",
    "packed": "numpy int32 blocks [n, 2, max_length + 1]: the rows' tokens `[:, 0]` and each token's position "
    "in its document `[:, 1]` (-1 on padding)",
    "batches": "dicts: `inputs`, `targets` (torch int64 [B, T]); from packed rows also `position_ids` (int64 [B, T]) "
    "and `cu_seqlens` (int32); after `embed` also `embeddings` [B, T, D]",
}
