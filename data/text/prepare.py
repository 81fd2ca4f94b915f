"""
Your own plain text -> a pretraining dataset (task "text"): BOS + the document + EOS, every token
after BOS a target (dataset.encode_document), for train.py --init_from=scratch --finetune=full.

    python data/text/prepare.py --source=corpus.txt --tokenizer=mytok.model --out_dir=data/mycorpus

The source is a UTF-8 text file with one document per line (blank lines are skipped), or a folder
of .txt files, one document each. val_fraction of the documents, drawn with seed, become the val
split. Documents longer than max_len tokens are dropped and counted, as in every prepare script
(sources.py): give max_len the context of the model you train (its max_seq_len).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import sources  # noqa: E402
import util  # noqa: E402
from util import UserError  # noqa: E402


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_source(source, config):
    if not source or source == config["out_dir"]:
        raise UserError(
            "--source: expected your text file (one document per line) or a folder of .txt files"
        )
    if os.path.isdir(source):
        names = sorted(f for f in os.listdir(source) if f.endswith(".txt"))
        documents = [read_text(os.path.join(source, f)).strip() for f in names]
    else:
        documents = [line.strip() for line in read_text(source).splitlines()]
    return {"train": [dict(task="text", text=d) for d in documents if d]}


def main(argv):
    return sources.prepare_main(
        "text", read_source, {}, os.path.dirname(os.path.abspath(__file__)), argv
    )


if __name__ == "__main__":
    util.run_cli(main)
