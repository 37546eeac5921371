"""The zoo's long-context tasks (the task families of RULER), generated and seeded.

A sample is a haystack (the context, prefilled) and questions asked after it in turn; each
question is a prompt (given tokens) and an answer (tokens the model must produce, scored by
exact match of all of them). `needles` are the haystack positions an answer is read from,
so that the evaluation can say whether their pages were resident when it was decoded.

Tasks (kind):
  recall      associative recall with near-miss distractors: records `k1 k2 = v1 v2 ;`,
              distractors share one token of a key; ask `Q k1 k2 =` -> `v1 v2` (retrieval)
  multiquery  three single-token keys asked at once: `Q a = va Q b = vb Q c = vc`, the values
              generated, the keys given; answers far apart (retrieval)
  vartrack    variable tracking: `x3 = x2 ; ... x2 = x1 ; ... x1 = 7 ;`, ask `Q x3 =` ->
              `x2 = x1 = 7`: every hop is generated, each needs the record of the one
              before (retrieval, multi-hop)
  passkey     a passkey in repetitive filler: `PK v1 v2 v3 v4 .`, ask `Q PK` -> the four
              values (retrieval)
  frequent    aggregation: tag tokens scattered with distinct counts; ask `Q CNT Ti Tj =`
              -> the more frequent of the two: the answer depends on every occurrence
              (aggregation)
Train and evaluation seeds are disjoint: training draws from seeds < 2**31, evaluation from
2**31 + its seed.
"""
import numpy as np

PAD, BOS, SEP, Q, EQ, PK, CNT, DOT = range(8)
FILLER = list(range(8, 40))   # 32 filler tokens
KEYS = list(range(40, 72))    # 32 key / variable symbols
VALUES = list(range(72, 88))  # 16 values
TAGS = list(range(88, 92))    # 4 tags
VOCAB = 96
EVAL_SEED_BASE = 1 << 31

TASKS = ["recall", "multiquery", "vartrack", "passkey", "frequent"]
KIND = {"recall": "retrieval", "multiquery": "retrieval", "vartrack": "retrieval",
        "passkey": "retrieval", "frequent": "aggregation"}


class Sample:
    def __init__(self):
        self.haystack = []   # token ids
        self.questions = []  # (prompt, answer, needle positions)


def _place(rng, length, items):
    """Places token lists at random non-overlapping positions of a filler haystack of about
    `length` tokens; returns (tokens, start position of each item)."""
    total = sum(len(it) for it in items)
    free = max(0, length - total)
    cuts = np.sort(rng.integers(0, free + 1, size=len(items)))
    order = rng.permutation(len(items))
    out, starts, prev = [], [0] * len(items), 0
    for cut, idx in zip(cuts, order):
        out.extend(_filler(rng, cut - prev))
        prev = cut
        starts[idx] = len(out)
        out.extend(items[idx])
    out.extend(_filler(rng, free - prev))
    return out, starts


def _filler(rng, n):
    return list(rng.choice(FILLER, size=n)) if n > 0 else []


def recall(rng, length, n_questions):
    s = Sample()
    n_rec = max(n_questions, 12)
    pairs = set()
    keys = []
    while len(keys) < n_rec:
        if keys and rng.random() < 0.6:  # a near miss of an earlier key
            a, b = keys[rng.integers(len(keys))]
            k = (a, int(rng.choice(KEYS))) if rng.random() < 0.5 else (int(rng.choice(KEYS)), b)
        else:
            k = (int(rng.choice(KEYS)), int(rng.choice(KEYS)))
        if k not in pairs and k[0] != k[1]:
            pairs.add(k)
            keys.append(k)
    vals = [(int(rng.choice(VALUES)), int(rng.choice(VALUES))) for _ in keys]
    items = [[a, b, EQ, v1, v2, SEP] for (a, b), (v1, v2) in zip(keys, vals)]
    s.haystack, starts = _place(rng, length, items)
    for i in rng.permutation(n_rec)[:n_questions]:
        a, b = keys[i]
        s.questions.append(([Q, a, b, EQ], list(vals[i]), [starts[i] + 3, starts[i] + 4]))
    return s


def multiquery(rng, length, n_questions):
    s = Sample()
    n_rec = max(3 * n_questions, 12)
    keys = [int(k) for k in rng.choice(KEYS, size=min(n_rec, len(KEYS)), replace=False)]
    vals = [int(rng.choice(VALUES)) for _ in keys]
    items = [[k, EQ, v, SEP] for k, v in zip(keys, vals)]
    s.haystack, starts = _place(rng, length, items)
    order = list(rng.permutation(len(keys)))
    for qi in range(n_questions):
        idx = [order[(3 * qi + j) % len(keys)] for j in range(3)]
        prompt, answer, needles = [], [], []
        # Keys are given, values generated: the prompt interleaves with the answer, so the
        # answer tokens sit at prompt positions 2, 5, 8 (see `segments`).
        segs = []
        for j, i in enumerate(idx):
            segs.append(([Q, keys[i], EQ], [vals[i]]))
            needles.append(starts[i] + 2)
        s.questions.append((segs, None, needles))
    return s


def vartrack(rng, length, n_questions):
    s = Sample()
    names = [int(k) for k in rng.permutation(KEYS)]
    chains, items = [], []
    n_chains = max(n_questions, 4)
    for c in range(n_chains):
        x1, x2, x3 = names[3 * c: 3 * c + 3]
        v = int(rng.choice(VALUES))
        chains.append((x3, [x2, x1, v]))
        items += [[x3, EQ, x2, SEP], [x2, EQ, x1, SEP], [x1, EQ, v, SEP]]
    s.haystack, starts = _place(rng, length, items)
    for c in rng.permutation(n_chains)[:n_questions]:
        x3, (x2, x1, v) = chains[c]
        # Each hop is generated: `x2 = x1 = 7`, every `=` after a name asks for its value.
        s.questions.append(([Q, x3, EQ], [x2, EQ, x1, EQ, v], [starts[3 * c + j] + 2 for j in range(3)]))
    return s


def passkey(rng, length, n_questions):
    s = Sample()
    pattern = list(rng.choice(FILLER, size=8, replace=False))
    key = [int(v) for v in rng.choice(VALUES, size=4)]
    n = max(0, length - 6)
    at = int(rng.integers(0, n + 1))
    hay = [pattern[i % 8] for i in range(n)]
    s.haystack = hay[:at] + [PK] + key + [DOT] + hay[at:]
    for _ in range(n_questions):
        s.questions.append(([Q, PK], list(key), [at + 1 + j for j in range(4)]))
    return s


def frequent(rng, length, n_questions):
    s = Sample()
    counts = rng.choice(np.arange(1, 13), size=len(TAGS), replace=False)
    items = [[t] for t, c in zip(TAGS, counts) for _ in range(int(c))]
    s.haystack, starts = _place(rng, length, items)
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    for p in rng.permutation(len(pairs))[:n_questions]:
        i, j = pairs[p]
        win = TAGS[i] if counts[i] > counts[j] else TAGS[j]
        needles = [st for st, it in zip(starts, items) if it[0] in (TAGS[i], TAGS[j])]
        s.questions.append(([Q, CNT, TAGS[i], TAGS[j], EQ], [win], needles))
    return s


GENERATORS = {"recall": recall, "multiquery": multiquery, "vartrack": vartrack,
              "passkey": passkey, "frequent": frequent}


def segments(question):
    """A question as (prompt, answer) segments in order: most tasks have one; multiquery
    interleaves given keys with generated values."""
    prompt, answer, _ = question
    return prompt if answer is None else [(prompt, answer)]


def make(task, seed, length, n_questions, eval_split=True):
    rng = np.random.default_rng(seed + (EVAL_SEED_BASE if eval_split else 0))
    s = GENERATORS[task](rng, length, n_questions)
    s.haystack = [BOS] + [int(t) for t in s.haystack]
    s.questions = [(p, a, [n + 1 for n in nd]) for p, a, nd in s.questions]
    return s


def training_sequence(task, seed, length, n_questions):
    """(tokens, loss mask): the haystack and every question, answers teacher-forced; the
    loss falls on the answer tokens (predicted from the token before each)."""
    s = make(task, seed, length, n_questions, eval_split=False)
    toks, mask = list(s.haystack), [0] * len(s.haystack)
    for q in s.questions:
        for prompt, answer in segments(q):
            toks += prompt
            mask += [0] * len(prompt)
            toks += answer
            mask += [1] * len(answer)
        toks.append(SEP)
        mask.append(0)
    return toks, mask
