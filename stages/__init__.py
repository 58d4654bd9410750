"""The concrete stages, one module per family; importing this package registers their types."""

from stages.arrow import ReadArrow
from stages.batch import Batch
from stages.embed import Embed, InputEmbedding
from stages.encode import BpeEncode
from stages.encoding import load_encoding
from stages.mix import Mix
from stages.read import ReadText
from stages.split import Split
from stages.tokens import ReadTokens
from stages.window import SlidingWindow
from stages.word import WordEncode

__all__ = [
    "Batch",
    "BpeEncode",
    "Embed",
    "InputEmbedding",
    "Mix",
    "ReadArrow",
    "ReadText",
    "ReadTokens",
    "SlidingWindow",
    "Split",
    "WordEncode",
    "load_encoding",
]
