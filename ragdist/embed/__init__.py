"""Text encoders that turn passages and queries into normalized vectors."""

from ragdist.embed.embedder import Embedder, EmbedderConfig, build_embedder, embedder_name

__all__ = ["Embedder", "EmbedderConfig", "build_embedder", "embedder_name"]
