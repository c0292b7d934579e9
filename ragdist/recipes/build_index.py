"""ragdist-index: corpus → chunks → embeddings → a sharded, versioned FAISS snapshot.

    ragdist-index                                    # built-in data, conf/index/flat.yaml
    ragdist-index corpus.path=docs.jsonl index.num_shards=4 index.factory='IVF256,PQ32'
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ragdist.config import conf_dir, register_configs
from ragdist.recipes.common import build_or_reuse_index, cli, resolve_data_paths, setup_logging


@cli
def run(cfg: DictConfig) -> str:
    setup_logging()
    resolve_data_paths(cfg)
    path = build_or_reuse_index(cfg)
    print(path)
    return str(path)


register_configs()
main = hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(run)

if __name__ == "__main__":
    main()
