# SPDX-License-Identifier: Apache-2.0
"""Synthetic long-context tasks in the style of RULER, generated offline and deterministically.

RULER: Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
Models?", COLM 2024, https://arxiv.org/abs/2404.06654. Five of its tasks, with its wording:

- `niah_single`: one needle "One of the special magic numbers for {key} is: {value}." in a
  haystack of repeated noise sentences (RULER's niah_single_1); answer: the 7-digit value.
- `niah_multikey`: four needles with different keys in prose (RULER's niah_multikey_1, with
  CPython's pydoc text instead of Paul Graham's essays); asked about one; answer: its value.
- `niah_multivalue`: four needles with the same key and different values, in prose; answer:
  all four values.
- `variable_tracking`: one chain "VAR AAAAA = 12345." -> "VAR BBBBB = VAR AAAAA." ... of four
  hops hidden in noise, after one solved short example (as in RULER); answer: the five names.
- `common_words`: a numbered list of words where ten words appear 30 times and the others
  3 times, after one solved short example (as in RULER); answer: the ten frequent words.

Every prompt is exactly `context` tokens long: instruction, haystack (the filler's last piece
is cut to fit, needles inserted at sentence ends at seeded random depths), question and
answer prefix. Two prompt formats: `plain` (a completion prompt) and `chat` (the model's chat
template, the assistant turn opened by the answer prefix). The haystack text is the same for
every sample of a task and length (as in RULER), so only needles, keys and depths vary.
Samples depend only on (task, context, index, seed) and the tokenizer.

Score of one answer (RULER's string_match_all): the fraction of expected items found in the
greedy output; a number must equal a whole digit run, a word must match a whole word
(case-insensitive).
"""

import bisect
import functools
import random
import re
from dataclasses import dataclass

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
FORMATS = ("plain", "chat")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_ADJECTIVES = ("sleepy amber brave calm dusty eager fancy gentle hollow icy jolly keen lucky "
               "misty noble odd proud quiet rapid silent tidy urban vivid wild young zesty "
               "bitter clever crimson frozen golden").split()
_NOUNS = ("owl anchor badge candle dragon engine falcon garden harbor island jacket kettle "
          "lantern meadow needle orchard pebble quilt river saddle tower umbrella valley "
          "wagon yacht zebra basket cactus dolphin ember").split()
_NIAH_HEAD = ("Some special magic {kind} are hidden within the following text. Make sure to "
              "memorize it. I will quiz you about the {kind} afterwards.\n")
_NEEDLE = " One of the special magic numbers for {key} is: {value}."
_VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than "
             "others. Memorize the ones that appear most often.\n")


@dataclass(frozen=True)
class Sample:
    task: str
    context: int
    index: int
    prompt_ids: list[int]
    answers: tuple[str, ...]
    max_tokens: int


def score(answers: tuple[str, ...], text: str) -> float:
    """Fraction of `answers` found in `text` (whole digit runs / whole words, any case)."""
    numbers = set(re.findall(r"\d+", text))
    found = 0
    for answer in answers:
        if answer.isdigit():
            found += answer in numbers
        else:
            found += re.search(rf"(?<![A-Za-z]){re.escape(answer)}(?![A-Za-z])", text, re.I) is not None
    return found / len(answers)


class TaskGenerator:
    """Makes samples for one tokenizer; filler streams are tokenized once and cached."""

    def __init__(self, tokenizer, seed: int = 0, fmt: str = "plain"):
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
        self.tokenizer, self.seed, self.fmt = tokenizer, seed, fmt
        self._streams: dict[str, tuple[list[int], list[int]]] = {}

    # ------------------------------------------------------------ pieces
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _stream(self, name: str) -> tuple[list[int], list[int]]:
        """(token ids, indices i where a sentence ends before token i) of a filler text."""
        if name not in self._streams:
            if name == "noise":
                text = " ".join([NOISE] * 1000)
            else:
                from vllm_sparse.models import long_text

                text = long_text()
            ids = self._ids(text)
            tokens = self.tokenizer.convert_ids_to_tokens(ids)
            ends = [i + 1 for i, t in enumerate(tokens) if t.endswith((".", "Ċ"))]
            self._streams[name] = (ids, ends)
        return self._streams[name]

    def _wrap(self, head: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the haystack, in the chosen prompt format."""
        if self.fmt == "chat":
            marker = "\x00HAYSTACK\x00"
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{head}{marker}\n{question}"}],
                tokenize=False, add_generation_prompt=True)
            before, after = text.split(marker)
            return self._ids(before), self._ids(after + answer_prefix.lstrip())
        return self._ids(head), self._ids(f"\n{question}{answer_prefix}")

    def _haystack(self, stream: str, length: int, needles: list[list[int]],
                  depths: list[float]) -> list[int]:
        """`length` tokens of filler with each needle inserted at a sentence end near its depth."""
        ids, ends = self._stream(stream)
        room = length - sum(len(n) for n in needles)
        if room < 0 or room > len(ids):
            raise ValueError(f"haystack of {length} tokens does not fit the {stream} text")
        out, last = [], 0
        for needle, depth in sorted(zip(needles, depths), key=lambda p: p[1]):
            j = bisect.bisect_left(ends, int(depth * room))
            cut = min(ends[j] if j < len(ends) else room, room)
            cut = max(cut, last)
            out += ids[last:cut] + needle
            last = cut
        return out + ids[last:room]

    def _assemble(self, context, head, question, answer_prefix, stream, needles, depths):
        before, after = self._wrap(head, question, answer_prefix)
        body = self._haystack(stream, context - len(before) - len(after), needles, depths)
        return before + body + after

    # ------------------------------------------------------------ tasks
    def sample(self, task: str, context: int, index: int) -> Sample:
        rng = random.Random(f"{self.seed}:{task}:{context}:{index}")
        make = getattr(self, f"_{task}", None)
        if task not in TASKS or make is None:
            raise ValueError(f"task {task!r}: expected one of {TASKS}")
        prompt, answers, max_tokens = make(rng, context)
        assert len(prompt) == context, (task, context, len(prompt))
        return Sample(task, context, index, prompt, tuple(answers), max_tokens)

    def samples(self, task: str, context: int, count: int) -> list[Sample]:
        return [self.sample(task, context, i) for i in range(count)]

    def _keys(self, rng, count):
        pairs = rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], count)
        return [f"{a}-{n}" for a, n in pairs]

    def _niah(self, rng, context, stream, num_keys, num_values, kind):
        keys = self._keys(rng, num_keys)
        values = rng.sample(range(1_000_000, 10_000_000), num_keys * num_values)
        needles = [(k, values[i * num_values + j]) for i, k in enumerate(keys)
                   for j in range(num_values)]
        rng.shuffle(needles)
        depths = [rng.random() for _ in needles]
        query = keys[0]
        answers = [str(v) for k, v in needles if k == query]
        head = _NIAH_HEAD.format(kind=kind)
        if num_values == 1:
            question = f"What is the special magic number for {query} mentioned in the provided text?"
            prefix = f" The special magic number for {query} mentioned in the provided text is"
        else:
            question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
            prefix = f" The special magic numbers for {query} mentioned in the provided text are"
        needle_ids = [self._ids(_NEEDLE.format(key=k, value=v)) for k, v in needles]
        prompt = self._assemble(context, head, question, prefix, stream, needle_ids, depths)
        return prompt, answers, 12 * num_values

    def _niah_single(self, rng, context):
        return self._niah(rng, context, "noise", 1, 1, "numbers")

    def _niah_multikey(self, rng, context):
        return self._niah(rng, context, "prose", 4, 1, "numbers")

    def _niah_multivalue(self, rng, context):
        return self._niah(rng, context, "prose", 1, 4, "numbers")

    def _variable_tracking(self, rng, context, hops=4):
        def chain():
            names = set()
            while len(names) < hops + 1:
                names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
            names = rng.sample(sorted(names), hops + 1)
            value = str(rng.randint(10_000, 99_999))
            statements = [f" VAR {names[0]} = {value}."]
            statements += [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            return names, value, statements

        def question(value):
            return (f"Question: Find all variables that are assigned the value {value} in the text "
                    "above.", f" Answer: According to the chain(s) of variable assignment in the "
                    f"text above, {hops + 1} variables are assigned the value {value}, they are:")

        names, value, statements = chain()
        ex_names, ex_value, ex_statements = chain()  # RULER's one-shot example
        ex_question, ex_prefix = question(ex_value)
        example = "".join(f" {NOISE}{s}" for s in ex_statements).strip()
        head = f"{_VT_HEAD}{example}\n{ex_question}\n{ex_prefix.strip()} {' '.join(ex_names)}\n\n"
        depths = sorted(rng.random() for _ in statements)
        prompt = self._assemble(context, head, *question(value), "noise",
                                [self._ids(s) for s in statements], depths)
        return prompt, names, 8 * (hops + 1)

    def _common_words(self, rng, context, num_common=10, freq_common=30, freq_rare=3):
        vocabulary = _word_vocabulary()
        question = "Question: What are the 10 most common words in the above list?"
        prefix = " Answer: The top 10 words that appear most often in the list are:"
        # RULER's one-shot example: a short list, frequent words 3 times, others once
        words = rng.sample(vocabulary, 30)
        items = words[:10] * 3 + words[10:]
        rng.shuffle(items)
        example = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        head = (f"{_CWE_HEAD}{example}\n{question}\n{prefix.strip()} {', '.join(words[:10])}\n\n"
                f"{_CWE_HEAD}")
        vocabulary = sorted(set(vocabulary) - set(words))
        before, after = self._wrap(head, question, prefix)
        room = context - len(before) - len(after)
        num_rare = max(1, (room // 4 - num_common * freq_common) // freq_rare)
        while True:  # grow the list until it fills the room, then cut it there
            words = rng.sample(vocabulary, num_common + num_rare)
            common, rare = words[:num_common], words[num_common:]
            items = common * freq_common + rare * freq_rare
            rng.shuffle(items)
            body = self._ids(" ".join(f"{i + 1}. {w}" for i, w in enumerate(items)))
            if len(body) >= room:
                break
            num_rare = int(num_rare * 1.3) + 10
        return before + body[:room] + after, common, 4 * num_common


@functools.cache
def _word_vocabulary() -> list[str]:
    """Distinct lower-case words of 4 to 10 letters from CPython's pydoc text, sorted."""
    from vllm_sparse.models import long_text

    return sorted(set(re.findall(r"\b[a-z]{4,10}\b", long_text())))
