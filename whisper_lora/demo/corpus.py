"""``whisper-lora demo-corpus``: a Common Voice-format release spoken by espeak-ng, for offline demos.

Train, dev and test differ in both text and speaker: sentences are split without overlap, and each split has
its own espeak-ng voice variants, with speed and pitch jitter per clip. An adapter that scores well on test
has learned the language's sounds and spelling, not one voice or one sentence list. Clips are 48 kHz MP3
like Common Voice's, so the main job reads them through the ordinary Common Voice source.
"""

from __future__ import annotations

import csv
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from whisper_lora.demo.sentences import CATALOG_PACKAGES, LICENSES, Sentence, catalog_sentences
from whisper_lora.languages import get_language

CLIP_RATE = 48_000
DEFAULT_PER_SPLIT = "train=400,dev=20,test=20"
"""Clips per split and language, where the catalogs have them (``allocate``): on the demo's whisper-base a Hindi
adapter at 160 steps scored dev WER 0.69 trained on 120 sentences (loss 0.03: memorised) and 0.58 on 400."""
HELD_OUT_SHARE = 8
"""A held-out split takes at most 1/8 of a language's sentences."""
VOICE_VARIANTS = {
    "train": ("m1", "m2", "m3", "m6", "f1", "f2", "f3", "adam", "linda", "john"),
    "dev": ("m4", "f4", "steph", "robert"),
    "test": ("m5", "m7", "f5", "david", "belinda", "annie"),
}
"""espeak-ng variants per split: no speaker is heard in two splits."""
SPEED_WPM = (130, 185)
PITCH = (30, 70)
TSV_COLUMNS = ("client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents", "locale")


class CorpusError(RuntimeError):
    """The corpus cannot be built here (no espeak-ng, no catalog packages)."""


def parse_per_split(spec: str) -> dict[str, int]:
    """``"train=60,dev=16,test=16"`` → ``{"train": 60, "dev": 16, "test": 16}``."""
    counts = {}
    for part in spec.split(","):
        split, _, count = part.partition("=")
        if split not in VOICE_VARIANTS or not count.isdigit():
            raise ValueError(f"bad split count {part!r}: use e.g. train=60,dev=16,test=16")
        counts[split] = int(count)
    return counts


def allocate(sentences: list[Sentence], wanted: dict[str, int], rng: random.Random) -> dict[str, list[Sentence]]:
    """Disjoint sentence lists per split: the held-out splits (every split but ``train``) first, each at most
    ``HELD_OUT_SHARE`` of the sentences, then ``train`` from the rest, up to its count. A language with few sentences
    keeps dev and test large enough to score and trains on what is left."""
    pool = sentences[:]
    rng.shuffle(pool)
    cap = max(1, len(pool) // HELD_OUT_SHARE)
    takes = {split: min(count, cap) for split, count in wanted.items() if split != "train"}
    if "train" in wanted:
        takes["train"] = max(1, min(wanted["train"], len(pool) - sum(takes.values())))
    allocated, start = {}, 0
    for split in wanted:
        allocated[split] = pool[start : start + takes[split]]
        start += takes[split]
    return allocated


def speak(text: str, voice: str, speed: int, pitch: int, out: Path) -> None:
    """Synthesize ``text`` with espeak-ng and write it as a 48 kHz mono MP3; ``--`` keeps a text that starts with
    ``-`` from being read as an option."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", wav.name, "--", text],
            check=True,
            capture_output=True,
        )
        samples, rate = sf.read(wav.name, dtype="float32")
    samples = soxr.resample(samples, rate, CLIP_RATE) if rate != CLIP_RATE else samples
    peak = float(np.max(np.abs(samples))) or 1.0
    sf.write(out, (0.9 / peak) * samples, CLIP_RATE, format="MP3")


def _license_readme(summary: dict, packages: list[str]) -> str:
    lines = [
        "# whisper-lora demo corpus",
        "",
        "Synthetic speech (Debian's espeak-ng) of real sentences from translation catalogs shipped in PyPI packages:",
        "",
        *(f"- {package} ({LICENSES[package]})" for package in packages),
        "",
        "Each clip's source catalog is listed in `sources.tsv`. Splits share no sentence and no voice variant.",
        "",
        "| language | " + " | ".join(VOICE_VARIANTS) + " |",
        "|---|" + "---|" * len(VOICE_VARIANTS),
        *(
            f"| {lang} | " + " | ".join(str(counts.get(split, 0)) for split in VOICE_VARIANTS) + " |"
            for lang, counts in summary["clips"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


def build_corpus(out: str | Path, languages: list[str], per_split: str = DEFAULT_PER_SPLIT, seed: int = 0) -> dict:
    """Write ``out/<lang>/{train,dev,test}.tsv`` + ``clips/*.mp3``; returns clip counts per language and split."""
    if shutil.which("espeak-ng") is None:
        raise CorpusError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    wanted = parse_per_split(per_split)
    out = Path(out)
    summary: dict = {"out": str(out), "clips": {}}
    sources: list[tuple[str, str, str]] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for code in languages:
            language = get_language(code)
            sentences = catalog_sentences(language)
            if len(sentences) < len(wanted):
                raise CorpusError(
                    f"{code}: only {len(sentences)} catalog sentences "
                    f"(install {', '.join(package.distribution for package in CATALOG_PACKAGES)})"
                )
            rng = random.Random(f"{seed}-{code}")
            clips = out / code / "clips"
            clips.mkdir(parents=True, exist_ok=True)
            jobs = []
            summary["clips"][code] = {}
            for split, chosen in allocate(sentences, wanted, rng).items():
                rows = []
                for index, sentence in enumerate(chosen):
                    name = f"demo_{code}_{split}_{index:04d}.mp3"
                    voice = f"{language.espeak_voice}+{rng.choice(VOICE_VARIANTS[split])}"
                    args = (sentence.text, voice, rng.randint(*SPEED_WPM), rng.randint(*PITCH), clips / name)
                    jobs.append(pool.submit(speak, *args))
                    rows.append(
                        {
                            "client_id": voice,
                            "path": name,
                            "sentence": sentence.text,
                            "up_votes": 2,
                            "down_votes": 0,
                            "locale": code,
                        }
                    )
                    sources.append((f"{code}/clips/{name}", sentence.package, sentence.catalog))
                with open(out / code / f"{split}.tsv", "w", newline="", encoding="utf-8") as handle:
                    writer = csv.DictWriter(
                        handle, TSV_COLUMNS, delimiter="\t", restval="", quoting=csv.QUOTE_NONE, escapechar="\\"
                    )
                    writer.writeheader()
                    writer.writerows(rows)
                summary["clips"][code][split] = len(rows)
            for job in jobs:
                job.result()
    with open(out / "sources.tsv", "w", encoding="utf-8") as handle:
        handle.write("clip\tpackage\tcatalog\n")
        handle.writelines(f"{clip}\t{package}\t{catalog}\n" for clip, package, catalog in sources)
    used = sorted({package for _, package, _ in sources}, key=list(LICENSES).index)
    (out / "README.md").write_text(_license_readme(summary, used), encoding="utf-8")
    return summary
