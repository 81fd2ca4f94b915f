"""
databricks-dolly-15k (15k human-written instruction records, CC BY-SA 3.0)
-> data/dolly/{train,val}_*.npy.

    python data/dolly/prepare.py --tokenizer=path/to/tokenizer.model \
        [--source=databricks-dolly-15k.jsonl]

The source has one JSON object per line: {"instruction", "context", "response", "category"}; the
context (often empty) becomes the input. Settings and rules (over-long examples dropped and counted,
malformed input stops): see sources.py.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import sources  # noqa: E402
import util  # noqa: E402

URLS = {
    "databricks-dolly-15k.jsonl": "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"
}
# ours: the source's
FIELDS = {
    "instruction": "instruction",
    "input": "context",
    "response": "response",
}


def read_source(source, config):
    return {
        "train": sources.read_records(
            sources.source_file(source, "databricks-dolly-15k.jsonl", ".jsonl"), "dolly", FIELDS
        )
    }


def main(argv):
    return sources.prepare_main(
        "dolly", read_source, URLS, os.path.dirname(os.path.abspath(__file__)), argv
    )


if __name__ == "__main__":
    util.run_cli(main)
