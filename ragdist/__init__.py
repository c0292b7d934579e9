"""ragdist: retrieval-augmented fine-tuning at cluster scale."""

import os as _os

# Ray reads these when its node starts; without the first one it advertises the host's
# external address even when asked for 127.0.0.1.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("DS_ACCELERATOR", "cpu") if not _os.path.exists("/dev/nvidia0") else None
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_os.environ.setdefault("HF_HUB_OFFLINE", "1") if _os.environ.get("RAGDIST_ALLOW_HUB") != "1" else None

__version__ = "0.1.0"
