"""Helpers of the example tasks: plain lm-eval, nothing from hmlm."""
import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_file, **_):
    """The items next to this file, as lm-eval's `custom_dataset` (found from any working directory, no hub)."""
    rows = [json.loads(line) for line in (HERE / data_file).read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_entity(doc):
    """The item's entity for hmlm's frequency buckets: its main name first, then other spellings."""
    return [doc["country"]]
