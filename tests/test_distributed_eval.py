"""Evaluation sharded across the workers of a process group: each decodes its contiguous shard of the eval split
and the edit counts are summed with an all_reduce, so every worker gets the scores one scorer gets on all rows.
Two gloo processes (torch.multiprocessing) stand in for two Ray Train workers; the counts add up exactly."""

from __future__ import annotations

import random
from pathlib import Path

import jiwer
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ray.data.extensions import ArrowTensorArray
from transformers import StoppingCriteriaList, WhisperTokenizer

from tests.builders import free_port, random_adapters
from whisper_lora.data.prepared import iter_batches
from whisper_lora.evaluate import PROMPT_TOKENS, RowCaps, greedy_transcripts, score_split
from whisper_lora.languages import get_language
from whisper_lora.metrics import ErrorCounts, error_counts, error_rates
from whisper_lora.models.inference import load_for_inference

SENTENCES = ["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह बारह", "तेरह चौदह", "पंद्रह सोलह सत्रह अठारह"]
SCORES = ("wer", "cer", "raw_wer", "primary", "utterances")


def _eval_split(directory: Path, tokenizer: WhisperTokenizer, rows: int) -> str:
    """A prepared-looking eval split of ``rows`` utterances (random log-mel, Hindi references), written in two
    files whose order is not the id order. Label ids are short (generation stops at twice their length)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(rows)
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(rows)]
    table = pa.table(
        {
            "id": [f"u{i:02d}" for i in range(rows)],
            "sentence": sentences,
            "duration_s": np.full(rows, 2.0),
            "label_ids": [tokenizer(s).input_ids[: 3 + i % 3] for i, s in enumerate(sentences)],
            "input_features": ArrowTensorArray.from_numpy(rng.standard_normal((rows, 80, 200)).astype(np.float32)),
        }
    )
    half = rows // 2
    pq.write_table(table.slice(half), directory / "part-0.parquet")
    pq.write_table(table.slice(0, half), directory / "part-1.parquet")
    return str(directory)


@pytest.fixture(scope="module")
def adapted(tiny_model_dir, tmp_path_factory) -> tuple[str, str]:
    """The tiny base and a random LoRA adapter: transcripts that differ from row to row."""
    root = tmp_path_factory.mktemp("adapter")
    return tiny_model_dir, str(Path(random_adapters(tiny_model_dir, root, ["a"])["a"]) / "adapter")


def _scores_on_rank(rank: int, world: int, port: int, base: str, adapter: str, splits: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = load_for_inference(base, adapter, torch.device("cpu"), "fp32")
        tokenizer = WhisperTokenizer.from_pretrained(base)
        for index, split in enumerate(splits):
            scores = score_split(model, tokenizer, split, "hi", 2, rank=rank, world=world)
            torch.save({key: scores[key] for key in (*SCORES, "samples")}, f"{out}/{index}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_sharing_the_split_get_the_scores_of_one_scorer(adapted, tmp_path):
    base, adapter = adapted
    tokenizer = WhisperTokenizer.from_pretrained(base)
    model = load_for_inference(base, adapter, torch.device("cpu"), "fp32")
    # uneven shards (3 + 2 rows); fewer rows than workers (1 + 0)
    splits = [_eval_split(tmp_path / f"split-{rows}", tokenizer, rows) for rows in (5, 1)]
    mp.spawn(_scores_on_rank, args=(2, free_port(), base, adapter, splits, str(tmp_path)), nprocs=2, join=True)
    for index, split in enumerate(splits):
        alone = score_split(model, tokenizer, split, "hi", 2)
        assert any(sample["hypothesis"] for sample in alone["samples"])  # the adapter writes something to score
        sharded = [torch.load(tmp_path / f"{index}-{rank}.pt") for rank in range(2)]
        for scores in sharded:  # every worker has the whole split's scores
            assert {key: scores[key] for key in SCORES} == {key: alone[key] for key in SCORES}
        assert sharded[0]["samples"] == alone["samples"][: len(sharded[0]["samples"])]  # rank 0: the first rows


def test_shards_are_contiguous_cover_the_split_once_and_differ_by_at_most_a_row(adapted, tmp_path):
    split = _eval_split(tmp_path / "split", WhisperTokenizer.from_pretrained(adapted[0]), 7)
    whole = [i for batch in iter_batches(split, 2, limit=6) for i in batch["id"]]
    shards = [[i for batch in iter_batches(split, 2, 6, rank, 4) for i in batch["id"]] for rank in range(4)]
    assert whole == [f"u{i:02d}" for i in range(6)]  # id order, whatever the file order
    assert [i for shard in shards for i in shard] == whole and sorted(map(len, shards)) == [1, 1, 2, 2]


def test_counts_of_disjoint_shards_add_up_to_the_counts_of_the_whole():
    rng = random.Random(0)
    words = ["एक", "दो", "तीन", "चार", "पांच", "छह", "सात"]
    references = [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(40)]
    hypotheses = [" ".join(rng.choices(words, k=rng.randint(0, 7))) for _ in range(40)]
    hindi = get_language("hi")
    whole = error_counts(references, hypotheses, hindi)
    shards = [error_counts(references[i::3], hypotheses[i::3], hindi) for i in range(3)]
    assert shards[0] + shards[1] + shards[2] == whole
    assert error_counts([], [], hindi) == ErrorCounts()
    rates = error_rates(references, hypotheses, hindi)
    assert rates["wer"] == pytest.approx(jiwer.wer(references, hypotheses))  # jiwer's corpus rates, from counts
    assert rates["cer"] == pytest.approx(jiwer.cer(references, hypotheses))


def test_a_row_cut_at_its_own_cap_reads_as_decoding_it_alone_with_that_cap(adapted, tmp_path):
    base, adapter = adapted
    tokenizer = WhisperTokenizer.from_pretrained(base)
    model = load_for_inference(base, adapter, torch.device("cpu"), "fp32")
    features = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 80, 3000)).astype(np.float32))
    caps = [3, 9, 6]
    together = greedy_transcripts(model, tokenizer, {"input_features": features}, "hi", caps)
    alone = [
        greedy_transcripts(model, tokenizer, {"input_features": features[i : i + 1]}, "hi", caps[i])[0]
        for i in range(3)
    ]
    assert together == alone
    assert len(together[1]) > len(together[0])  # the caps are the rows' own


def test_a_batch_stops_when_every_row_has_its_cap_whatever_the_length_limit(adapted):
    """``RowCaps`` finishes rows one by one: Whisper's ``generate`` must honour per-row stopping, or one looping row
    holds a whole batch to the largest cap (evaluation time doubled on the demo's zero-shot Marathi)."""
    base, adapter = adapted
    model = load_for_inference(base, adapter, torch.device("cpu"), "fp32")
    features = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 80, 3000)).astype(np.float32))
    calls = []
    model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    caps = [3, 5]
    stop = RowCaps(caps, PROMPT_TOKENS)
    prompt = torch.zeros((2, PROMPT_TOKENS + 3), dtype=torch.long)
    assert stop(prompt, None).tolist() == [True, False]
    with torch.no_grad():
        model.generate(input_features=features, language="hi", task="transcribe", max_new_tokens=40)
        unstopped, calls[:] = len(calls), []
        tokens = model.generate(input_features=features, language="hi", task="transcribe", max_new_tokens=40,
                                stopping_criteria=StoppingCriteriaList([stop]))  # fmt: skip
    assert unstopped > max(caps)  # these rows do not end by themselves within the caps
    assert len(calls) == max(caps) and tokens.shape[1] <= max(caps) + PROMPT_TOKENS
