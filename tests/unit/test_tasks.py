# SPDX-License-Identifier: Apache-2.0
"""The RULER-style task generator of benchmarks/quality.py (benchmarks/tasks.py): samples are
deterministic, exactly `context` tokens long, and their expected answers are right."""

import collections
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from tasks import TASKS, TaskGenerator, score  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def generators(tokenizer):
    return {fmt: TaskGenerator(tokenizer, seed=0, fmt=fmt) for fmt in ("plain", "chat")}


@pytest.mark.parametrize("fmt", ["plain", "chat"])
@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_and_exact_length(tokenizer, generators, task, fmt):
    first = generators[fmt].samples(task, 1024, 3)
    again = TaskGenerator(tokenizer, seed=0, fmt=fmt).samples(task, 1024, 3)
    assert first == again
    assert [len(s.prompt_ids) for s in first] == [1024] * 3
    assert len({tuple(s.prompt_ids) for s in first}) == 3
    assert TaskGenerator(tokenizer, seed=1, fmt=fmt).sample(task, 1024, 0) != first[0]
    assert len(generators[fmt].sample(task, 2048, 0).prompt_ids) == 2048


def _haystack(tokenizer, sample, question: str) -> str:
    """The decoded prompt between its (last) instruction and its question."""
    text = tokenizer.decode(sample.prompt_ids)
    return text[: text.rindex(question)]


@pytest.mark.parametrize("task,values", [("niah_single", 1), ("niah_multikey", 1),
                                         ("niah_multivalue", 4)])
def test_needle_answers(tokenizer, generators, task, values):
    for sample in generators["chat"].samples(task, 2048, 4):
        text = tokenizer.decode(sample.prompt_ids)
        key = re.search(r"special magic numbers? for (\S+) mentioned", text).group(1)
        found = re.findall(rf"special magic numbers for {re.escape(key)} is: (\d+)\.", text)
        assert sorted(found) == sorted(sample.answers) and len(found) == values
        needles = re.findall(r"special magic numbers for \S+ is: \d+\.", text)
        assert len(needles) == (4 if task != "niah_single" else 1)


def test_variable_tracking_answer_is_the_chain(tokenizer, generators):
    for sample in generators["plain"].samples("variable_tracking", 2048, 4):
        question = "Question: Find all variables that are assigned the value"
        text = _haystack(tokenizer, sample, question)
        value = re.search(rf"{question} (\d+)", tokenizer.decode(sample.prompt_ids)[len(text):]).group(1)
        body = text[text.rindex("they are:"):]  # after the solved example
        assigned = dict(re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", body))
        resolved = {}
        for name in assigned:
            target = name
            while target in assigned:
                target = assigned[target]
            resolved[name] = target
        assert sorted(n for n, v in resolved.items() if v == value) == sorted(sample.answers)
        assert len(sample.answers) == 5


def test_common_words_answer_is_the_most_frequent(tokenizer, generators):
    for sample in generators["chat"].samples("common_words", 2048, 3):
        question = "Question: What are the 10 most common words"
        text = _haystack(tokenizer, sample, question)
        body = text[text.rindex("most often.\n"):]  # the list after the solved example
        counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", body))
        ranked = counts.most_common()
        assert sorted(w for w, _ in ranked[:10]) == sorted(sample.answers)
        assert ranked[9][1] > 3 * ranked[10][1]


def test_score_is_exact_match():
    assert score(("1234567",), " 1234567.") == 1.0
    assert score(("1234567",), " 12345678") == 0.0       # a longer number is not the answer
    assert score(("1234567",), " 123456") == 0.0
    assert score(("1", "2", "3", "4"), "1, 2 and 9") == 0.5
    assert score(("ABCDE", "FGHIJ"), " abcde FGHIJK") == 0.5
    assert score(("show",), "shows, showing") == 0.0
