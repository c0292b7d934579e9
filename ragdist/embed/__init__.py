"""Text encoders that turn passages and queries into normalized vectors."""

from ragdist.embed.embedder import Embedder, EmbedderConfig, build_embedder

__all__ = ["Embedder", "EmbedderConfig", "build_embedder"]
