"""Where data comes from: `MEE_DATA_DIR`, else `../shared/data` beside the repo, else the hub.

Local files are JSON Lines with the Hugging Face field names, `<root>/<dataset>/<split>.jsonl`.
The local `validation` file of a dataset is a slice of the hub split named in `HUB_SOURCES`
(for some datasets that is the hub's `test` split), so both paths evaluate the same thing.
Paths never depend on the current directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from mee_bench.paths import DATA_DIR_ENV, data_root

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub and which hub split each local split file stands for."""

    path: str
    name: str | None
    splits: dict[str, str]


HUB_SOURCES: dict[str, HubSource] = {
    "squad": HubSource("rajpurkar/squad", "plain_text", {"validation": "validation", "train": "train"}),
    "cnn_dailymail": HubSource("abisee/cnn_dailymail", "3.0.0", {"validation": "test"}),
    "wmt15": HubSource("wmt/wmt15", "fr-en", {"validation": "test"}),
    "big_patent": HubSource("NortheasternUniversity/big_patent", "all", {"validation": "test"}),
}


RecordCheck = Callable[[Iterable[tuple[str, dict]], str], None]  # (located records, source name) -> raises


class DataUnavailableError(FileNotFoundError):
    """Neither a local JSONL slice nor the hub can provide a dataset split."""


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a JSON Lines file; a malformed line raises with its line number."""
    return (row for _, row in numbered_jsonl(path))


def numbered_jsonl(path: str | Path, error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSON Lines file, blank lines skipped; a malformed line raises `error` with its number."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove that line") from err
            if not isinstance(row, dict):
                raise error(
                    f"{path}:{number}: a JSON {type(row).__name__}, not a record (an object); fix or remove that line"
                )
            yield number, row


def local_split_path(dataset: str, split: str) -> Path | None:
    """`<root>/<dataset>/<split>.jsonl` when a data root holds it, else None."""
    root = data_root()
    if root is None:
        return None
    path = root / dataset / f"{split}.jsonl"
    return path if path.is_file() else None


def load_split(dataset: str, split: str, check: RecordCheck | None = None) -> "datasets.Dataset":
    """One split as a `datasets.Dataset`: the local JSONL slice when there is one, else the hub.

    The hub is the real loading path for users with a network (`HUB_SOURCES` holds its ids,
    configs and split names); offline, a missing local file is an error naming `MEE_DATA_DIR`.
    `check` sees every record with its location (`file:line`, or the hub row) and the source's
    name before the split is returned, so bad data stops a run before any compute.
    """
    import datasets

    path = local_split_path(dataset, split)
    if path is not None:
        numbered = list(numbered_jsonl(path))
        if check is not None:
            check([(f"{path}:{number}", row) for number, row in numbered], str(path))
        return datasets.Dataset.from_list([row for _, row in numbered])
    source = HUB_SOURCES.get(dataset)
    root = data_root()
    where = f"{root / dataset / f'{split}.jsonl'} does not exist" if root else "no local data root was found"
    if source is None or split not in source.splits:
        raise DataUnavailableError(
            f"{dataset}/{split} is only available locally and {where}: set {DATA_DIR_ENV} to a directory "
            f"holding {dataset}/{split}.jsonl (layout: <root>/<dataset>/<split>.jsonl)"
        )
    hub_split = source.splits[split]
    log.info("%s; loading %s (%s) split %s from the Hugging Face hub", where, source.path, source.name, hub_split)
    try:
        loaded = datasets.load_dataset(source.path, source.name, split=hub_split)
    except Exception as err:  # offline, hub errors and missing dataset scripts all end here
        raise DataUnavailableError(
            f"{dataset}/{split}: {where} and the Hugging Face hub failed ({type(err).__name__}: {err}). "
            f"Set {DATA_DIR_ENV} to a directory holding {dataset}/{split}.jsonl "
            f"(layout: <root>/<dataset>/<split>.jsonl), or connect to the hub"
        ) from err
    if check is not None:
        hub = f"{source.path} ({source.name}) split {hub_split}"
        check(((f"{hub} row {index}", row) for index, row in enumerate(loaded)), hub)
    return loaded
