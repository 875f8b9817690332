"""Run the audio pipeline on a Ray cluster and write prepared Parquet shards plus ``stats.json``.

    ray job submit --working-dir . -- python ray_jobs/prepare_data.py --config ray_jobs/configs/cluster.yaml

Recipe only: it parses the config and calls ``whisper_lora.prepare``; the components hold the logic.
"""

import sys

from whisper_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
