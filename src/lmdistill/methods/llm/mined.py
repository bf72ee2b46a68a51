"""MinED: minimum-edit-distance alignment (Wan et al. 2024, FuseLLM, arXiv 2401.10491), in the
online form of the DSKD repository's re-implementation.

Per example, dynamic time warping over the two response token-string sequences (cost =
Levenshtein distance, word-boundary markers stripped) aligns positions. A teacher->student
vocabulary map by minimum edit distance is computed once per tokenizer pair and cached. At a
student position aligned one-to-one with a teacher position whose mapped target token equals
the student's target token, the teacher's logits are scattered through the map into the
student vocabulary (max over collisions, -1e4 elsewhere); every other position gets a
one-hot target on the student's own token. Forward KL at temperature tau:
``L = (1 - alpha) CE + alpha KL``. Deviation: the one-hot fallback is a cross-entropy (the
KL to a one-hot target), as in that re-implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmdistill.align.vocab import dtw, edit_distance_map, token_strings
from lmdistill.methods.llm.base import LMMethod, vocab_rows
from lmdistill.registry import register


@dataclass
class MinEDOptions:
    """MinED options."""

    alpha: float = 0.5
    tau: float = 1.0


@register("mined", kind="lm")
class MinED(LMMethod):
    """DTW + minimum-edit-distance vocabulary map, KL where the alignment is one-to-one."""

    Options = MinEDOptions
    needs_teacher_logits = True
    cache_form = "token_logits"  # trains from a teacher cache of its response-position logits

    def __init__(self, opts, student, teacher, student_tokenizer, teacher_tokenizer, cache_dir=None):
        super().__init__(opts, student, teacher, student_tokenizer, teacher_tokenizer, cache_dir)
        vmap = torch.as_tensor(edit_distance_map(student_tokenizer, teacher_tokenizer, cache_dir))
        v_t = vocab_rows(teacher)  # the model's rows may differ from the tokenizer's
        if len(vmap) < v_t:
            vmap = torch.cat([vmap, vmap.new_full((v_t - len(vmap),), int(vmap[0]))])
        self.register_buffer("vmap", vmap[:v_t].clone(), persistent=False)
        self.s_str = token_strings(student_tokenizer)
        self.t_str = token_strings(teacher_tokenizer)
        self.v_student = vocab_rows(student)

    def forward(self, batch, s, t, heads):
        o = self.opts
        B = batch["s_input_ids"].size(0)
        s_rows_all, t_rows_all = s.resp.per_example(B), t.resp.per_example(B)
        pairs_s, pairs_t = [], []
        for si, ti in zip(s_rows_all, t_rows_all):
            ys = s.resp.target[si].tolist()
            yt = t.resp.target[ti].tolist()
            path = dtw([self.s_str[i] if i < len(self.s_str) else "" for i in ys],
                       [self.t_str[j] if j < len(self.t_str) else "" for j in yt])
            count_s, count_t = {}, {}
            for i, j in path:
                count_s[i] = count_s.get(i, 0) + 1
                count_t[j] = count_t.get(j, 0) + 1
            for i, j in path:
                if count_s[i] == 1 and count_t[j] == 1 and yt[j] < len(self.vmap) and int(self.vmap[yt[j]]) == ys[i]:
                    pairs_s.append(int(si[i]))
                    pairs_t.append(int(ti[j]))
        n = s.logits.size(0)
        log_q = F.log_softmax(s.logits.float() / o.tau, dim=-1)  # [N, V_S]
        target = F.one_hot(s.resp.target, log_q.size(-1)).float()
        if pairs_s:
            ps = torch.tensor(pairs_s, device=log_q.device)
            pt = torch.tensor(pairs_t, device=log_q.device)
            with torch.no_grad():
                t_log = t.logits[pt].float()  # [n, V_T]
                mapped = torch.full((len(pt), log_q.size(-1)), -1e4, device=log_q.device)
                mapped.scatter_reduce_(1, self.vmap.unsqueeze(0).expand(len(pt), -1), t_log, reduce="amax")
                target[ps] = F.softmax(mapped / o.tau, dim=-1)
        kl = (target * (target.clamp_min(1e-12).log() - log_q)).sum(-1).mean() if n else heads.ce * 0
        return {"ce": heads.ce, "kl": kl, "aligned": torch.tensor(float(len(pairs_s)) / max(n, 1)),
                "loss": (1 - o.alpha) * heads.ce + o.alpha * kl}
