"""Sources of raw text: local files, Hub datasets and the embedded default corpus, one or a weighted mixture.

From flags:   --train_file a.jsonl 'web/*.jsonl' --train_weights 3 1   (one source per value; a glob is
              one source of every file it matches), or --dataset_name NAME
From a recipe, the full form, a `datasets:` list; each entry has `path` (a file or glob) or `name`
(a Hub dataset), and optionally `config`, `split` (default train), `validation` (a file, or a Hub
split; default: the Hub's validation split, else --validation_split_percentage held out),
`text_column`, `weight` and `label` (the name in logs and metrics; default: the file's or dataset's).

Weights are relative; without any, each source weighs its size (the mixture is the concatenation).
"""

import ast
import fnmatch
import functools
import glob
import hashlib
import json
import os
import random
import sysconfig
from pathlib import Path

from datasets import DatasetDict, Features, IterableDatasetDict, Value, load_dataset

from utils.errors import UserError, first_line
from utils.files import CACHE_ROOT, write_atomic

LOCAL_DATA_EXTENSIONS = {"txt": "text", "json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
ENTRY_KEYS = {"path", "name", "config", "split", "validation", "text_column", "weight", "label"}


def local_data_builder(path):
    """The `datasets` builder name for a local data file, or None for an unsupported extension."""
    return LOCAL_DATA_EXTENSIONS.get(path.rsplit(".", 1)[-1].lower())


# --- What the sources are (cheap: checked before any work) -----------------------------------

def parse_sources(args):
    """The run's sources as JSON-able dicts (they go into checkpoints and results.json); a bad entry
    fails here with one line (train.py --data_dir runs take theirs from the store)."""
    if args.datasets is not None:
        if args.train_file or args.dataset_name:
            raise UserError("the recipe's datasets: list names the sources: drop --train_file / --dataset_name")
        entries = recipe_entries(args.datasets)
    elif args.train_file:
        entries = [{"path": path} for path in args.train_file]
        if args.validation_file:
            if len(entries) > 1:
                raise UserError("--validation_file goes with one --train_file; for several, give each its "
                                "validation: in a recipe's datasets: list")
            entries[0]["validation"] = args.validation_file
    elif args.dataset_name:
        entries = [{"name": args.dataset_name, "config": args.dataset_config_name}]
    else:
        entries = [{"embedded": True, "label": "python-docs"}]
    if args.train_weights is not None:
        if args.datasets is not None:
            raise UserError("the recipe's datasets: entries carry their weight: drop --train_weights")
        if len(args.train_weights) != len(entries):
            raise UserError(f"--train_weights has {len(args.train_weights)} values for {len(entries)} sources: "
                            "give one weight per --train_file")
        for entry, weight in zip(entries, args.train_weights):
            entry["weight"] = weight
    sources = [_resolve(entry, args.text_column) for entry in entries]
    check_weights([s["weight"] for s in sources])
    seen = {}
    for s in sources:  # two files named data.jsonl in different folders: data, data-2
        seen[s["label"]] = seen.get(s["label"], 0) + 1
        s["label"] += f"-{seen[s['label']]}" if seen[s["label"]] > 1 else ""
    labels = [s["label"] for s in sources]
    if len(set(labels)) < len(labels):
        raise UserError(f"sources share a label ({', '.join(labels)}): give each a distinct label: in the recipe")
    if len(sources) > 1 and getattr(args, "streaming", False) and sources[0]["weight"] is None:
        raise UserError("--streaming several sources needs their weights (a stream's size is unknown until it has "
                        "been read): give --train_weights, or weight: in each datasets: entry")
    return sources


def check_weights(weights):
    """All None (each source weighs its size) or all numbers >= 0, at least one of them positive."""
    given = [w for w in weights if w is not None]
    if given and len(given) < len(weights):
        raise UserError("give every source a weight, or none (each source then weighs its size)")
    if given and (min(given) < 0 or max(given) <= 0):
        raise UserError(f"weights must be >= 0 with at least one positive (got {given}); a source of weight 0 is "
                        "evaluated but not trained on")


def store_weights(store_sources, entries, store):
    """The weights of a recipe's `datasets:` entries in the order of a token store's sources (its
    manifest's), each entry matched to the source it names: by `label`, else by `path` (the file, or a
    glob matching every file of the source), else by Hub `name` (and `config` / `split` when given).
    None when no entry has a weight (each source then weighs its size)."""
    entries = recipe_entries(entries)
    check_weights([entry.get("weight") for entry in entries])
    weights = [None] * len(store_sources)
    named = [False] * len(store_sources)
    for number, entry in enumerate(entries):
        matches = [i for i, source in enumerate(store_sources) if _names(entry, source)]
        what = entry.get("label") or entry.get("path") or entry.get("name")
        if len(matches) != 1:
            labels = ", ".join(s["label"] for s in store_sources)
            raise UserError(f"datasets: entry {number} ({what}) names {'no' if not matches else 'more than one'} "
                            f"source of token store {store} (its sources: {labels}): name one by its label:")
        if named[matches[0]]:
            raise UserError(f"datasets: entries name source {store_sources[matches[0]]['label']} of token store "
                            f"{store} twice: give each source one entry")
        named[matches[0]], weights[matches[0]] = True, entry.get("weight")
    if entries[0].get("weight") is None:
        return None
    missing = [source["label"] for source, seen in zip(store_sources, named) if not seen]
    if missing:
        raise UserError(f"the recipe's datasets: list gives no weight to {', '.join(missing)} of token store {store}: "
                        "add an entry for each (weight: 0 evaluates a source without training on it)")
    return weights


def _names(entry, source):
    """Whether recipe entry `entry` names `source` (a token store manifest's entry)."""
    identity = source["identity"]
    if entry.get("label") is not None:
        return str(entry["label"]) == source["label"]
    if "name" in entry:  # as parse_sources reads an entry: no config is none, no split is train
        return (identity.get("name"), identity.get("config"), identity.get("split")) == (
            entry["name"], entry.get("config"), entry.get("split") or "train")
    pattern = os.path.abspath(os.path.expanduser(entry["path"]))
    paths = [f["path"] for f in identity.get("files", [])] or [identity.get("path")]
    return None not in paths and all(_glob_matches(path, pattern) for path in paths)


def _glob_matches(path, pattern):
    """Whether glob.glob(pattern) would list `path` (without reading the disk: the store may have been
    prepared elsewhere): component by component, so * stays within a folder, and * skips hidden names."""
    names, parts = path.split(os.sep), pattern.split(os.sep)
    return len(names) == len(parts) and all(
        fnmatch.fnmatchcase(name, part) and (not name.startswith(".") or part.startswith("."))
        for name, part in zip(names, parts))


def recipe_entries(datasets):
    """A recipe's `datasets:` list, each entry checked (one line for the first bad one)."""
    if not isinstance(datasets, list) or not datasets:
        raise UserError("datasets: must be a non-empty list in the recipe (each entry with path: or name:)")
    return [_check_entry(entry, n) for n, entry in enumerate(datasets)]


def held_out_documents(count, validation_split_percentage, label):
    """How many of a source's first `count` documents become its validation split when it has none
    (at least one), the same on disk and streamed; refused when nothing would be left to train on."""
    held_out = max(1, round(count * validation_split_percentage / 100))
    if count and held_out >= count:
        raise UserError(f"{validation_split_percentage}% of the {count} documents of {label} leaves an empty split: "
                        "give it a validation file or change --validation_split_percentage")
    return held_out


def _check_entry(entry, number):
    if not isinstance(entry, dict):
        raise UserError(f"datasets: entry {number} must be a mapping with path: or name: (got {entry!r})")
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise UserError(f"datasets: entry {number} has unknown key(s) {', '.join(unknown)}: use {sorted(ENTRY_KEYS)}")
    if ("path" in entry) == ("name" in entry):
        raise UserError(f"datasets: entry {number} needs exactly one of path: (local files) or name: (a Hub dataset)")
    weight = entry.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
        raise UserError(f"datasets: entry {number} has weight {weight!r}: give a number")
    return dict(entry)


def _resolve(entry, default_text_column):
    """An entry with its files found (globs expanded) and a label."""
    source = {"weight": entry.get("weight"), "text_column": entry.get("text_column") or default_text_column}
    if entry.get("embedded"):
        return {**source, "label": entry["label"], "kind": "embedded"}
    if "name" in entry:
        label = entry.get("label") or entry["name"].rstrip("/").split("/")[-1] + (
            f"-{entry['config']}" if entry.get("config") else "")
        return {**source, "label": label, "kind": "hub", "name": entry["name"], "config": entry.get("config"),
                "split": entry.get("split") or "train", "validation": entry.get("validation")}
    files = _local_files(entry["path"], "--train_file")
    validation = _local_files(entry["validation"], "validation file") if entry.get("validation") else None
    stem = Path(files[0]).name.rsplit(".", 1)[0] if len(files) == 1 else Path(entry["path"]).parent.name or "files"
    return {**source, "label": str(entry.get("label") or stem), "kind": "files", "files": files,
            "validation": validation}


def _local_files(pattern, what):
    """The files a path or glob names: all existing, readable, of one supported kind."""
    files = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
    if not files:
        raise UserError(f"{what} {pattern} matches no file: check the pattern")
    for path in files:
        if not os.path.isfile(path):
            raise UserError(f"{what} {path} does not exist: check the path")
        if not os.access(path, os.R_OK):
            raise UserError(f"{what} {path} is not readable: check its permissions")
        if local_data_builder(path) is None:
            raise UserError(f"{what} {path}: unsupported extension, use one of {sorted(LOCAL_DATA_EXTENSIONS)}")
    if len({local_data_builder(path) for path in files}) > 1:
        raise UserError(f"{what} {pattern} matches files of different formats: give one source per format")
    return [os.path.abspath(path) for path in files]


# --- Reading them ---------------------------------------------------------------------------

def load_source(source, validation_split_percentage=5, streaming=False):
    """{'label', 'weight', 'identity', 'text_column', 'splits': {'train', 'validation'}, 'held_out'} of one source.

    Without a validation split or file (held_out: True), the first validation_split_percentage of train's
    documents become the validation split, of which evaluation takes its first blocks (utils/data.py
    open_blocks) and training gets the rest back. With streaming: IterableDatasets, and the evaluation
    blocks are held out by utils/stream.py."""
    kind = source["kind"]
    if kind == "hub":
        try:
            raw = load_dataset(source["name"], source["config"], streaming=streaming)
        except Exception as e:  # datasets raises many types for "not found / offline"
            raise UserError(f"cannot load dataset {source['name']!r} ({type(e).__name__}): check the name, "
                            "or pass local files with --train_file when offline") from e
        validation = source["validation"] or ("validation" if "validation" in raw else None)
        for split in (source["split"], validation):
            if split and split not in raw:
                raise UserError(f"dataset {source['name']!r} has no {split!r} split (splits: {sorted(raw)})")
        raw = {"train": raw[source["split"]], **({"validation": raw[validation]} if validation else {})}
    else:
        files = source["files"] if kind == "files" else [embedded_corpus_file()]
        raw = {"train": _load_local(files, streaming)}
        if source.get("validation"):
            raw["validation"] = _load_local(source["validation"], streaming)
    held_out_of_train = "validation" not in raw  # evaluation takes its first documents; the rest trains
    raw = IterableDatasetDict(raw) if streaming else DatasetDict(raw)
    label = source["label"]
    if streaming:
        if next(iter(raw["train"]), None) is None:
            raise UserError(f"the train data of {label} is empty: check the file or dataset")
    else:
        if "validation" not in raw:
            train = raw["train"]
            held_out = held_out_documents(len(train), validation_split_percentage, label)
            raw = DatasetDict(validation=train.select(range(held_out)), train=train.select(range(held_out, len(train))))
        for split in ("train", "validation"):
            if len(raw[split]) == 0:
                raise UserError(f"the {split} data of {label} is empty: check the file or dataset")
    return {"label": label, "weight": source["weight"], "identity": source_identity(source, raw),
            "text_column": resolve_text_column(raw["train"], source["text_column"]), "splits": raw,
            "held_out": held_out_of_train}


def in_memory_source(splits, label="data", text_column="text", weight=None):
    """A loaded source (as load_source returns) from `datasets` splits already at hand (a notebook, a test)."""
    return {"label": label, "weight": weight, "identity": {"fingerprint": getattr(splits["train"], "_fingerprint", label)},
            "text_column": text_column, "splits": splits}


def source_identity(source, raw=None):
    """What a source is, for caches, checkpoints and results.json: a Hub dataset's name, config, split and
    fingerprint, or each local file's path, size and modification time."""
    if source["kind"] == "hub":
        fingerprint = getattr(raw["train"], "_fingerprint", None) if raw else None
        return {"name": source["name"], "config": source["config"], "split": source["split"],
                **({"fingerprint": fingerprint} if fingerprint else {})}
    files = source["files"] if source["kind"] == "files" else [embedded_corpus_file()]
    stats = [{"path": path, "bytes": os.path.getsize(path), "mtime_ns": os.stat(path).st_mtime_ns} for path in files]
    return stats[0] if len(stats) == 1 else {"files": stats}


def _load_local(files, streaming=False):
    for path in files:
        if os.path.getsize(path) == 0:
            raise UserError(f"{path} is empty: give a file with text in it")
    builder = local_data_builder(files[0])
    kwargs = {"sample_by": "paragraph", "keep_linebreaks": True} if builder == "text" else {}
    try:
        return load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    except Exception as e:  # pyarrow / datasets raise many types for unreadable files
        problem = next(filter(None, map(_bad_json_line, files)), None) if builder == "json" else None
        raise UserError(f"cannot read {files[0] if len(files) == 1 else files}: {problem or first_line(e)}") from e


def _bad_json_line(path):
    """'PATH line N is not valid JSON (...)' for the first malformed line of a JSON-lines file, else None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if f.read(1) != "{":  # a single JSON document, not JSON lines: line numbers would mislead
            return None
        f.seek(0)
        for number, line in enumerate(f, 1):
            try:
                line.strip() and json.loads(line)
            except ValueError as e:
                return f"line {number} is not valid JSON ({e}): fix or remove that line"
    return None


def resolve_text_column(dataset, requested):
    features = dataset.features
    if features is None:  # a stream whose builder infers the columns while reading
        features = Features({name: Value("string") if isinstance(value, str) else Value("null")
                             for name, value in next(iter(dataset)).items()})
    if requested in features:
        return requested
    string_columns = [n for n, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(string_columns) == 1:
        return string_columns[0]
    raise UserError(f"no text column {requested!r} in the data (columns: {list(features)}): "
                    "pass --text_column NAME (or text_column: in the recipe's datasets: entry)")


# --- The embedded default corpus: English text that ships with every Python install ---------

@functools.cache  # parsing the standard library takes seconds; the result depends only on this Python
def embedded_corpus_file():
    """Write Python's own help topics and standard-library docstrings as JSON lines, once."""
    import pydoc_data.topics

    documents = list(pydoc_data.topics.topics.values())
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)))
        docstrings = [d for d in map(ast.get_docstring, nodes) if d and len(d) >= 80]
        if docstrings:
            documents.append("\n\n".join(docstrings))
    random.Random(0).shuffle(documents)  # the validation slice is the first few percent
    lines = "".join(json.dumps({"text": d}) + "\n" for d in documents)
    path = CACHE_ROOT / "corpus" / f"python-docs-{hashlib.sha256(lines.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lines)
    return str(path)
