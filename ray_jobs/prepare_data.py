"""Run the audio pipeline on a Ray cluster and write prepared Parquet shards plus ``stats.json``.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \
        -- python ray_jobs/prepare_data.py --config ray_jobs/configs/cluster.yaml

Recipe only: it parses the config and calls ``whisper_lora.prepare``; the components hold the logic.
"""

import sys

from whisper_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
