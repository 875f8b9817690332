"""RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \
    -- python ray_jobs/tune_languages.py --config ray_jobs/configs/cluster.yaml

The main job: per language, the best LoRA adapter over a grid of ranks and learning rates, published with a
manifest. Prepares the audio (Ray Data) when the prepared shards are missing or stale, measures the base model's
zero-shot score per language, runs one Ray Train run per trial under Ray Tune, picks each language's best adapter
on the eval split (WER, or CER where the registry says so) and publishes it to ``publish.storage`` (a path or
``s3://``) with ``manifest.json`` and ``report.md``. Run it again with the same config to resume an interrupted
sweep. Ray 2.60 clusters use token auth: the ``ray job submit`` client sets ``RAY_AUTH_MODE=token`` and gives the
token in ``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH``); the dashboard stays on the head's loopback and is reached
at ``http://127.0.0.1:8265`` through ``kubectl port-forward`` or ``ray dashboard`` (``cluster/README.md``).
``make cluster-dry-run`` runs this job on a local head and two isolated worker nodes first.
The job runs in an uploaded copy of this directory (``.gitignore``d files such as ``artifacts/`` stay behind), so
local paths in its config must be absolute, as on a cluster they are shared paths or ``s3://``; without a
cluster, ``python ray_jobs/tune_languages.py --config ray_jobs/configs/demo.yaml`` runs the same job here.
Recipe only: ``whisper_lora.job`` wires the components of ``whisper_lora.tune``, ``publish`` and ``report``.
"""

import sys

from whisper_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
