"""RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \
    -- python ray_jobs/compare_cost.py --config ray_jobs/configs/cluster.yaml train.language=hi

What did LoRA save us? Trains the same base model on the same language's data for the same steps twice through
the same Ray Train loop, full fine-tuning and LoRA, measures both (parameters, step time, samples/s, peak memory,
checkpoint bytes, WER/CER before and after), counts parameters for every Whisper size from configs alone, and
projects GPU-hours and money for the workload in the config's ``cost`` section. Writes
``<output_dir>/<experiment>/cost/cost.{md,csv,json,png}``. Without a cluster,
``python ray_jobs/compare_cost.py --config ray_jobs/configs/compare_cost.yaml`` runs it here (about 14 minutes
on 2 CPU cores with whisper-base). Recipe only: the components in ``whisper_lora.cost`` hold the logic.
"""

import sys

from whisper_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare-cost", *sys.argv[1:]]))
