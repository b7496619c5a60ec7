"""Offline, seeded long-context retrieval tasks (RULER-style), sized with the model's own tokenizer.

    from bench.tasks import generate, build_prompt
    items = generate(tokenizer, tasks=["passkey", "vartrack"], lengths=[1024, 2048], n=4, seed=0)
    p = build_prompt(tokenizer, items[0])     # {"ids", "split", "prompt", ...}

Every item is a dict with at least
    context   the haystack with the needle(s) (plain text, no chat markup)
    question  what is asked about it
    answer    the gold answer (a string of digits for every task here)
    task      task name (see TASKS)
    length    the target prompt length in tokens (the whole chat prompt fits in it)
and also: ``tokens`` (the prompt's real token count), ``answer_prefix`` (the start of the assistant turn,
RULER-style, e.g. "The pass key is"), ``context_id`` (items that share a context share it: multi-key NIAH
and variable tracking ask several questions about one context), ``depth`` (needle position(s) as a
fraction of the context), ``id``.

Prompts (``build_prompt``): the model's chat template with one user turn ``context + "\\n\\n" + question``,
then the generation prompt and ``answer_prefix``. A tokenizer without a chat template (a base model such as
Gemma-3-270M) gets plain text instead: BOS, the context, ``"\\n\\nQuestion: " + question + "\\nAnswer: "`` and
``answer_prefix``. ``split`` is the token index where the context part ends:
question-aware compression prefills ``ids`` whole; question-agnostic compression prefills ``ids[:split]``
(system turn + user-turn start + context) and feeds ``ids[split:]`` (question, end of turn, assistant
start, answer prefix) as a separate chunk. Both modes use the very same token ids.

Determinism: everything is drawn from ``random.Random`` seeded with a string made of (seed, task, length,
sample index); the same seed and tokenizer give the same items in any process.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Sequence

TASKS = ("passkey", "niah_single_noise", "niah_single_varied", "niah_multikey_noise",
         "niah_multikey_varied", "vartrack")
LENGTHS = (1024, 2048, 4096)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.")
VT_INTRO = ("Memorize and track the chain(s) of variable assignment hidden in the following text.")

_ADJ = ["quiet", "bright", "ancient", "sleepy", "curious", "gentle", "rusty", "silver", "hollow", "narrow",
        "crowded", "windy", "golden", "tired", "clever", "muddy", "distant", "patient", "brave", "pale"]
_NOUN = ["river", "teacher", "garden", "lantern", "village", "farmer", "window", "mountain", "bicycle",
         "library", "kitten", "merchant", "bridge", "harbor", "painter", "forest", "castle", "wagon",
         "sailor", "orchard"]
_VERB = ["watched", "carried", "painted", "followed", "visited", "repaired", "noticed", "described",
         "cleaned", "passed", "admired", "guarded", "found", "remembered", "crossed"]
_PLACE = ["market", "valley", "station", "kitchen", "meadow", "harbor", "museum", "square", "workshop",
          "chapel", "courtyard", "tavern"]
_NAME = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karin",
         "Leo", "Maria", "Nils", "Olga", "Pablo"]
_TIME = ["In the morning", "Later that day", "Every spring", "At dusk", "Once a week", "Long ago",
         "After the rain", "Before the storm"]
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def varied_sentence(rng: random.Random) -> str:
    """One plain sentence (no digits) from small word lists."""
    a, b = rng.sample(_ADJ, 2)
    n1, n2 = rng.sample(_NOUN, 2)
    form = rng.randrange(5)
    if form == 0:
        return f"The {a} {n1} {rng.choice(_VERB)} the {b} {n2}."
    if form == 1:
        return f"{rng.choice(_NAME)} {rng.choice(_VERB)} a {a} {n1} near the {rng.choice(_PLACE)}."
    if form == 2:
        return f"{rng.choice(_TIME)}, the {n1} in the {rng.choice(_PLACE)} was {a}."
    if form == 3:
        return f"Nobody {rng.choice(_VERB)} the {a} {n1} that stood by the {b} {n2}."
    return f"{rng.choice(_NAME)} and {rng.choice(_NAME)} {rng.choice(_VERB)} the {n1} of the {rng.choice(_PLACE)}."


# ---------------------------------------------------------------------------------------------- prompts

_MARK = "\u2063\u2063ADAKV-SPLIT\u2063\u2063"  # never in generated text; removed before tokenizing


def encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def render(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[str, str]:
    """The chat prompt as ``(context part, question part)`` strings; their concatenation is the prompt."""
    content = context + _MARK + "\n\n" + question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    else:  # no chat template: a base model (Gemma-3-270M, the test tokenizer) reads plain text
        text = context + _MARK + "\n\nQuestion: " + question + "\nAnswer:" + (" " if answer_prefix else "")
    text = text + answer_prefix
    head, sep, tail = text.partition(_MARK)
    if not sep:
        raise ValueError("the chat template dropped the user content; cannot split the prompt")
    return head, tail


def _bos(tokenizer) -> List[int]:
    """``[bos]`` for a plain-text prompt (no chat template: the template would carry its own BOS text);
    base models such as Gemma 3 answer badly without it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if getattr(tokenizer, "chat_template", None) or bos is None else [int(bos)]


def build_prompt(tokenizer, item: Dict) -> Dict:
    """Token ids of the chat prompt and the split point (end of the context part)."""
    head, tail = render(tokenizer, item["context"], item["question"], item.get("answer_prefix", ""))
    h, t = _bos(tokenizer) + encode(tokenizer, head), encode(tokenizer, tail)
    return {"ids": h + t, "split": len(h), "prompt": head + tail, "context_ids": h, "question_ids": t}


def prompt_tokens(tokenizer, context: str, question: str, answer_prefix: str) -> int:
    head, tail = render(tokenizer, context, question, answer_prefix)
    return len(_bos(tokenizer)) + len(encode(tokenizer, head)) + len(encode(tokenizer, tail))


def _fit(tokenizer, length: int, make: Callable[[int], str], questions: Sequence[tuple[str, str]],
         max_units: int) -> tuple[str, List[int]]:
    """Largest k in [1, max_units] whose context ``make(k)`` fits ``length`` tokens with every
    ``(question, answer_prefix)`` (binary search; the token count grows with k).
    Returns the context and the prompt token count for each question."""
    def sizes(k):
        c = make(k)
        return [prompt_tokens(tokenizer, c, q, ap) for q, ap in questions]

    lo, hi = 1, max_units
    if max(sizes(lo)) > length:
        raise ValueError(f"target length {length} is too short for the task's fixed text")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if max(sizes(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return make(lo), sizes(lo)


def _haystack_units(kind: str, rng: random.Random, count: int) -> List[str]:
    if kind == "noise":
        return [NOISE] * count
    return [varied_sentence(rng) for _ in range(count)]


def _insert(units: List[str], needles: Sequence[str], depths: Sequence[float]) -> str:
    """Put each needle between haystack units at fraction ``depth`` of the units (stable order)."""
    out = list(units)
    placed = sorted(zip(depths, range(len(needles))), key=lambda x: (x[0], x[1]))
    for shift, (d, i) in enumerate(placed):
        pos = int(round(d * len(units))) + shift
        out.insert(pos, needles[i])
    return " ".join(out)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _rng(seed: int, task: str, length: int, i: int) -> random.Random:
    return random.Random(f"adakv-bench/{seed}/{task}/{length}/{i}")


def _max_units(length: int) -> int:
    # generous upper bound for the search: every unit is at least ~8 tokens
    return max(4, length // 6 + 8)


# ---------------------------------------------------------------------------------------------- tasks

def passkey(tokenizer, length: int, n: int, seed: int = 0, digits: int = 5, **_) -> List[Dict]:
    """Pass-key retrieval in the repeated-filler haystack (Mohtashami & Jaggi)."""
    items = []
    for i in range(n):
        rng = _rng(seed, "passkey", length, i)
        key = _number(rng, digits)
        depth = rng.uniform(0.05, 0.95)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        q, ap = "What is the pass key?", "The pass key is"
        ctx, toks = _fit(tokenizer, length,
                         lambda k: PASSKEY_INTRO + " " + _insert([NOISE] * k, [needle], [depth]),
                         [(q, ap)], _max_units(length))
        cid = f"passkey-{length}-{i}"
        items.append(dict(id=cid, task="passkey", length=length, tokens=toks[0], context=ctx, question=q,
                          answer=key, answer_prefix=ap, context_id=cid, depth=[round(depth, 4)]))
    return items


def _niah(tokenizer, task: str, haystack: str, keys_per_context: int, length: int, n: int, seed: int,
          digits: int, questions: int) -> List[Dict]:
    items = []
    for i in range(n):
        rng = _rng(seed, task, length, i)
        names = set()
        while len(names) < keys_per_context:
            names.add(f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}")
        names = sorted(names)
        rng.shuffle(names)
        values = [_number(rng, digits) for _ in names]
        depths = [rng.uniform(0.05, 0.95) for _ in names]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(names, values)]
        units = _haystack_units(haystack, rng, _max_units(length))
        asked = list(range(keys_per_context))
        rng.shuffle(asked)
        asked = asked[:max(1, min(questions, keys_per_context))]
        qs = [(f"What is the special magic number for {names[j]} mentioned in the provided text?",
               f"The special magic number for {names[j]} mentioned in the provided text is") for j in asked]
        ctx, toks = _fit(tokenizer, length, lambda k: NIAH_INTRO + " " + _insert(units[:k], needles, depths),
                         qs, len(units))
        cid = f"{task}-{length}-{i}"
        for qi, (j, (q, ap)) in enumerate(zip(asked, qs)):
            items.append(dict(id=f"{cid}-q{qi}", task=task, length=length, tokens=toks[qi], context=ctx,
                              question=q, answer=values[j], answer_prefix=ap, context_id=cid,
                              depth=[round(depths[j], 4)], key=names[j]))
    return items


def niah_single_noise(tokenizer, length, n, seed=0, digits=6, **_):
    """One needle ("special magic number for <key>") in the repeated-filler haystack."""
    return _niah(tokenizer, "niah_single_noise", "noise", 1, length, n, seed, digits, 1)


def niah_single_varied(tokenizer, length, n, seed=0, digits=6, **_):
    """One needle in a haystack of varied generated sentences."""
    return _niah(tokenizer, "niah_single_varied", "varied", 1, length, n, seed, digits, 1)


def niah_multikey_noise(tokenizer, length, n, seed=0, digits=6, keys=4, questions=1, **_):
    """``keys`` needles with different keys in the filler haystack; ``questions`` of them are asked."""
    return _niah(tokenizer, "niah_multikey_noise", "noise", keys, length, n, seed, digits, questions)


def niah_multikey_varied(tokenizer, length, n, seed=0, digits=6, keys=4, questions=1, **_):
    """``keys`` needles in the varied-sentence haystack; ``questions`` of them are asked."""
    return _niah(tokenizer, "niah_multikey_varied", "varied", keys, length, n, seed, digits, questions)


def vartrack(tokenizer, length, n, seed=0, digits=5, chains=2, hops=4, questions=1, **_):
    """RULER-style variable tracking: ``chains`` chains ``VAR A = 12345.``, ``VAR B = VAR A.``, ... spread
    over the filler haystack (statement h of a chain always after statement h-1); the question asks the
    value finally held by the last variable of one chain (the other chains are distractors)."""
    items = []
    for i in range(n):
        rng = _rng(seed, "vartrack", length, i)
        names = set()
        while len(names) < chains * (hops + 1):
            names.add("".join(rng.choice(_LETTERS) for _ in range(5)))
        names = sorted(names)
        rng.shuffle(names)
        values = set()
        while len(values) < chains:
            values.add(_number(rng, digits))
        values = sorted(values)
        rng.shuffle(values)
        statements, last = [], []
        for c in range(chains):
            var = names[c * (hops + 1):(c + 1) * (hops + 1)]
            statements.append([f"VAR {var[0]} = {values[c]}."] +
                              [f"VAR {var[h]} = VAR {var[h - 1]}." for h in range(1, hops + 1)])
            last.append(var[-1])
        depths = sorted(rng.uniform(0.05, 0.95) for _ in range(chains * (hops + 1)))
        flat = []
        for h in range(hops + 1):
            cs = list(range(chains))
            rng.shuffle(cs)
            flat += [statements[c][h] for c in cs]
        asked = list(range(chains))
        rng.shuffle(asked)
        asked = asked[:max(1, min(questions, chains))]
        qs = [(f"Find the numerical value that is finally assigned to VAR {last[c]}.",
               f"The value of VAR {last[c]} is") for c in asked]
        ctx, toks = _fit(tokenizer, length, lambda k: VT_INTRO + " " + _insert([NOISE] * k, flat, depths),
                         qs, _max_units(length))
        cid = f"vartrack-{length}-{i}"
        for qi, (c, (q, ap)) in enumerate(zip(asked, qs)):
            items.append(dict(id=f"{cid}-q{qi}", task="vartrack", length=length, tokens=toks[qi], context=ctx,
                              question=q, answer=values[c], answer_prefix=ap, context_id=cid,
                              depth=[round(d, 4) for d in depths], key=last[c]))
    return items


GENERATORS: Dict[str, Callable[..., List[Dict]]] = {
    "passkey": passkey,
    "niah_single_noise": niah_single_noise,
    "niah_single_varied": niah_single_varied,
    "niah_multikey_noise": niah_multikey_noise,
    "niah_multikey_varied": niah_multikey_varied,
    "vartrack": vartrack,
}


def generate(tokenizer, tasks: Sequence[str] = TASKS, lengths: Sequence[int] = LENGTHS, n: int = 2,
             seed: int = 0, questions: int = 1) -> List[Dict]:
    """Items for every (task, length): ``n`` contexts each; multi-key NIAH and variable tracking ask
    ``questions`` questions per context (items sharing ``context_id``)."""
    out = []
    for task in tasks:
        if task not in GENERATORS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        for length in lengths:
            out += GENERATORS[task](tokenizer, length, n, seed=seed, questions=questions)
    return out
