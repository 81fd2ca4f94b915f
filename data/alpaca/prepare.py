"""
Stanford Alpaca (52k instruction-following records, CC BY-NC 4.0) -> data/alpaca/{train,val}_*.npy.

    python data/alpaca/prepare.py --tokenizer=path/to/tokenizer.model [--source=alpaca_data.json]

The source is a JSON array of {"instruction", "input", "output"}; "output" becomes the response.
Settings and rules (over-long examples dropped and counted, malformed input stops): see sources.py.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import sources  # noqa: E402
import util  # noqa: E402

URLS = {
    "alpaca_data.json": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
}
# ours: the source's
FIELDS = {
    "instruction": "instruction",
    "input": "input",
    "response": "output",
}


def read_source(source, config):
    return {
        "train": sources.read_records(
            sources.source_file(source, "alpaca_data.json", ".json"), "alpaca", FIELDS
        )
    }


def main(argv):
    return sources.prepare_main(
        "alpaca", read_source, URLS, os.path.dirname(os.path.abspath(__file__)), argv
    )


if __name__ == "__main__":
    util.run_cli(main)
