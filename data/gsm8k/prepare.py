"""
GSM8K grade-school math (openai/grade-school-math, MIT) -> data/gsm8k/{train,val,test}_*.npy.

    python data/gsm8k/prepare.py --tokenizer=path/to/tokenizer.model [--source=DIR_OR_FILE]

The source has one JSON object per line: {"question", "answer"}. The question is the instruction
(no input); the response is the whole answer text, calculator annotations <<48/2=24>> included as
published, ending in "#### N" (eval.exact_match compares N). train.jsonl -> train and val
(val_fraction), test.jsonl -> test. --source may be a directory with train.jsonl (and test.jsonl)
or a single file, used as train. Rules: see sources.py.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import sources  # noqa: E402
import util  # noqa: E402

BASE_URL = (
    "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
)
# downloaded under other names: the prepared train.jsonl and test.jsonl go to the same folder
URLS = {"gsm8k_train.jsonl": BASE_URL + "train.jsonl", "gsm8k_test.jsonl": BASE_URL + "test.jsonl"}
FIELDS = {"instruction": "question", "response": "answer"}  # ours: the source's


def read_source(source, config):
    if not os.path.isdir(source):
        return {"train": sources.read_records(source, "gsm8k", FIELDS)}
    # the download
    prefix = "gsm8k_" if os.path.exists(os.path.join(source, "gsm8k_train.jsonl")) else ""
    splits = {
        "train": sources.read_records(os.path.join(source, f"{prefix}train.jsonl"), "gsm8k", FIELDS)
    }
    if os.path.exists(os.path.join(source, f"{prefix}test.jsonl")):
        splits["test"] = sources.read_records(
            os.path.join(source, f"{prefix}test.jsonl"), "gsm8k", FIELDS
        )
    return splits


def main(argv):
    return sources.prepare_main(
        "gsm8k", read_source, URLS, os.path.dirname(os.path.abspath(__file__)), argv
    )


if __name__ == "__main__":
    util.run_cli(main)
