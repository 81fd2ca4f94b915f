"""
MMLU (Hendrycks et al., MIT) -> data/mmlu/{train,val,test}_*.npy.

    python data/mmlu/prepare.py --tokenizer=path/to/tokenizer.model [--source=DIR_OR_TAR]

The source is the original release, data.tar with data/{auxiliary_train,dev,val,test}/*.csv, or a
directory with some of those folders (auxiliary_train/, or dev/ with --train_on_dev). Each CSV row
is question, four choices, answer; the answer is A-D (original release) or 0-3 (re-exported
copies, which also start with a header row question,choice0..choice3,answer, skipped).
Splits: auxiliary_train -> train (world knowledge for training, as in the MultiLoRA mixture),
val -> val (or val_fraction of train when there is no val/), test -> test (evaluation only).
dev/ holds the 5 solved examples per subject that eval.py --task=mmlu --shots=5 puts before each
question: it joins train only with --train_on_dev=True (said loudly), and a source without
auxiliary_train/ is refused without it, rather than training on the few-shot examples unannounced.
One example: instruction naming the subject, input = question + lettered choices, response = the
letter.
Rules (over-long dropped and counted, malformed input stops): see sources.py.
"""

import os
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import sources  # noqa: E402
from configurator import S  # noqa: E402
from util import UserError  # noqa: E402
import util  # noqa: E402

URLS = {"data.tar": "https://people.eecs.berkeley.edu/~hendrycks/data.tar"}
HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
LETTERS = "ABCD"


def read_folder(folder, split):
    """All {subject}_{split}.csv files of one folder (auxiliary_train files have no subject)."""
    records = []
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".csv")):
        path = os.path.join(folder, name)
        subject = (
            name[: -len(f"_{split}.csv")].replace("_", " ")
            if name.endswith(f"_{split}.csv")
            else ""
        )
        about = f" about {subject}" if subject else ""
        for line, (question, *choices, answer) in sources.read_csv(path, HEADER, len(HEADER)):
            answer = answer.strip()
            if answer not in ("0", "1", "2", "3", "A", "B", "C", "D"):
                raise UserError(f"{path}:{line}: answer: expected 0-3 or A-D, got {answer!r}")
            records.append(
                dict(
                    task="mmlu",
                    instruction=f"The following is a multiple choice question{about}. "
                    "Answer with the letter of the correct choice.",
                    input=question
                    + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices)),
                    response=LETTERS[int(answer)] if answer.isdigit() else answer,
                )
            )
    return records


def read_source(source, config):
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "data.tar")):
        source = os.path.join(source, "data.tar")
    if os.path.isfile(source):  # the release tarball: read it from a temporary extraction
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with tarfile.open(source) as tar:
                    tar.extractall(tmp, filter="data")
            except tarfile.TarError as e:
                raise UserError(
                    f"{source}: neither a folder nor a readable tar file ({type(e).__name__})"
                ) from None
            return read_source(tmp, config)
    if not os.path.isdir(os.path.join(source, "dev")) and os.path.isdir(
        os.path.join(source, "data")
    ):
        source = os.path.join(source, "data")
    folders = {
        split: os.path.join(source, split) for split in ("auxiliary_train", "dev", "val", "test")
    }
    if not os.path.isdir(folders["auxiliary_train"]) and not (
        config["train_on_dev"] and os.path.isdir(folders["dev"])
    ):
        raise UserError(
            f"--source={source}: no auxiliary_train/ folder of CSV files; training on dev/ "
            f"(eval.py's few-shot examples) needs --train_on_dev=True"
        )
    if config["train_on_dev"]:
        print(
            "WARNING: --train_on_dev=True: dev/ is in train; eval.py --task=mmlu --shots=K shows "
            "the model questions it was trained on",
            file=sys.stderr,
        )
    read = {
        split: read_folder(folder, split)
        for split, folder in folders.items()
        if os.path.isdir(folder)
    }
    splits = {
        "train": read.get("auxiliary_train", [])
        + (read.get("dev", []) if config["train_on_dev"] else [])
    }
    splits.update({split: read[split] for split in ("val", "test") if split in read})
    return splits


def main(argv):
    return sources.prepare_main(
        "mmlu",
        read_source,
        URLS,
        os.path.dirname(os.path.abspath(__file__)),
        argv,
        train_on_dev=S(False, None, "also train on dev/, the few-shot examples eval.py uses"),
    )


if __name__ == "__main__":
    util.run_cli(main)
