"""Token shards: ``prepare`` encodes a corpus once into Arrow shards and a manifest; ``read_tokens`` serves
windows from them.

``format`` (the manifest and its checks), ``writer`` (shards), ``local_engine`` and ``ray_engine`` (the
rows to write), ``prepare`` (the atomic job), ``read_tokens`` (the stage), ``objects`` (shards in object
storage, read by ranged requests).
"""

from stages.tokens.read_tokens import ReadTokens, WindowPermutation

__all__ = ["ReadTokens", "WindowPermutation"]
