"""Small lm-eval tasks over local JSONL files (these machines cannot download lm-eval's datasets): a
multiple-choice task, a rolling-perplexity task and a generation task, written as task YAML files into a folder
for `--include-path`. Used by tests/test_harness.py and benchmarks/eval_throughput.py."""

import json
from pathlib import Path

MULTIPLE_CHOICE = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red", "black"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "answer": 1},
    {"question": "Which is a fruit?", "choices": ["carrot", "potato", "apple", "onion"], "answer": 2},
    {"question": "What do bees make?", "choices": ["milk", "honey"], "answer": 1},
    {"question": "Water freezes at what temperature in Celsius?", "choices": ["zero", "fifty", "a hundred"],
     "answer": 0},
    {"question": "Which animal barks?", "choices": ["cat", "dog", "fish", "bird"], "answer": 1},
]
DOCUMENTS = [
    {"text": "The database stores each row of the table on disk, and the index points to it."},
    {"text": "A river runs through the old town. In spring the water rises and the bridges close."},
    {"text": "She wrote the letter in the morning and posted it before lunch, as she always did."},
    {"text": " ".join(["The model reads the text one token at a time and predicts the next."] * 12)},
]
PROMPTS = [
    {"prompt": "The capital of France is", "answer": " Paris"},
    {"prompt": "One, two, three,", "answer": " four"},
    {"prompt": "The opposite of hot is", "answer": " cold"},
    {"prompt": "Monday, Tuesday,", "answer": " Wednesday"},
    {"prompt": "The sky is", "answer": " blue"},
]

TASKS = {
    "argonne_choice": ("choice.jsonl", MULTIPLE_CHOICE, """\
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""),
    "argonne_rolling": ("documents.jsonl", DOCUMENTS, """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
"""),
    "argonne_generate": ("prompts.jsonl", PROMPTS, """\
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""),
}


def numbered(row: dict, copy: int) -> dict:
    """A copy of a document whose text differs (lm-eval's `hf` backend reuses the answer to an identical request)."""
    field = next(name for name in ("question", "text", "prompt") if name in row)
    return {**row, field: f"{copy}. {row[field]}"}


def write_tasks(folder: Path, repeat: int = 1) -> Path:
    """The three tasks' YAML and JSONL files in `folder` (data paths absolute, as datasets resolves them from
    the working directory), each document `repeat` times (benchmarks want more requests)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data_file, rows, body) in TASKS.items():
        data = folder / data_file
        copies = [row if copy == 0 else numbered(row, copy) for copy in range(repeat) for row in rows]
        data.write_text("".join(json.dumps(row) + "\n" for row in copies))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n")
    return folder
