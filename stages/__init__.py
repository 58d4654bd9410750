"""The concrete stages, one module per stage type (named after it); importing this package registers their types."""

from stages.batch import Batch
from stages.book import create_dataloader_v1
from stages.bpe_encode import BpeEncode
from stages.embed import Embed, InputEmbedding
from stages.encoding import load_encoding
from stages.mix import Mix
from stages.pack import Pack
from stages.read_arrow import ReadArrow
from stages.read_jsonl import ReadJsonl
from stages.read_text import ReadText
from stages.sliding_window import SlidingWindow
from stages.split import Split
from stages.tokens import ReadTokens
from stages.word_encode import WordEncode

__all__ = [
    "Batch",
    "BpeEncode",
    "Embed",
    "InputEmbedding",
    "Mix",
    "Pack",
    "ReadArrow",
    "ReadJsonl",
    "ReadText",
    "ReadTokens",
    "SlidingWindow",
    "Split",
    "WordEncode",
    "create_dataloader_v1",
    "load_encoding",
]
