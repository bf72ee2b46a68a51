"""STS evaluation: cosine-similarity Spearman (x100) of a sentence model on scored pairs."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from lmdistill.data.readers import StsPair


def encode_unique(model, sentences: list[str], batch_size: int = 64, progress: bool = True,
                  desc: str = "encoding") -> dict[str, np.ndarray]:
    """Embeddings of the unique sentences, L2-normalised, keyed by sentence."""
    uniq = list(dict.fromkeys(sentences))
    emb = model.encode(uniq, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=progress)
    return dict(zip(uniq, emb))


def sts_spearman(model, pairs: list[StsPair], batch_size: int = 64, progress: bool = True) -> dict:
    """``{"spearman": 100 * rho, "n": pairs}`` for a SentenceTransformer on ``pairs``."""
    vecs = encode_unique(model, [s for p in pairs for s in (p.s1, p.s2)], batch_size, progress)
    cos = np.array([float(vecs[p.s1] @ vecs[p.s2]) for p in pairs])
    gold = np.array([p.score for p in pairs])
    rho = spearmanr(cos, gold).statistic
    return {"spearman": round(float(rho) * 100, 2), "n": len(pairs)}
