"""Train one language's LoRA adapter with Ray Train and print where the best adapter is.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \
        -- python ray_jobs/train_language.py --config ray_jobs/configs/cluster.yaml train.language=hi train.lora.rank=32

Needs the prepared data of the same config (``ray_jobs/prepare_data.py``). Recipe only: the components in
``whisper_lora.train`` hold the logic.
"""

import sys

from whisper_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
