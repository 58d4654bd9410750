"""The concrete stages, one module per family; importing this package registers their types."""

from stages.batch import Batch
from stages.embed import Embed, InputEmbedding
from stages.encode import BpeEncode
from stages.encoding import load_encoding
from stages.arrow import ReadArrow
from stages.read import ReadText
from stages.window import SlidingWindow

__all__ = ["Batch", "BpeEncode", "Embed", "InputEmbedding", "ReadArrow", "ReadText", "SlidingWindow", "load_encoding"]
