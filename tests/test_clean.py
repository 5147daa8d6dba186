"""prepare_data.py --clean: planted duplicates, near duplicates, boilerplate, gibberish and validation text are
removed by the step meant for each, nothing else is; a given validation split is untouched; the work is
deterministic, resumes, and bad settings are refused in one line."""

import json
import random

import numpy as np
import pytest
from datasets import Dataset

from conftest import TINY, launch, results
from synthetic_text import boilerplate, document, exact_copy, gibberish, near_copy, with_passage_of
from utils import clean
from utils.data import document_encoder
from utils.errors import UserError
from utils.store import read_manifest


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Source a (train + a given validation file) and source b (10% held out for validation), with defects at
    known rows of each split (rows count from 0 in each split, as the store's do)."""
    r, folder = random.Random(0), tmp_path_factory.mktemp("planted")
    a, a_validation = [document(r) for _ in range(120)], [document(r) for _ in range(15)]
    a += [exact_copy(a[3]), near_copy(a[7], r), boilerplate(), gibberish(r), a_validation[2],
          with_passage_of(a_validation[5], r)]  # rows 120-125
    b_validation = [document(r) for _ in range(10)]
    b_validation[2] = gibberish(r)
    b_train = [document(r) for _ in range(90)]
    b_train[40:44] = [exact_copy(a[10]), near_copy(a[11], r), exact_copy(b_validation[4]),
                      with_passage_of(b_validation[6], r)]
    return {"a": write_jsonl(folder / "a.jsonl", a), "a_validation": write_jsonl(folder / "va.jsonl", a_validation),
            "b": write_jsonl(folder / "b.jsonl", b_validation + b_train), "texts": a_validation, "folder": folder}


@pytest.fixture(scope="module")
def cleaned_store(planted):
    from prepare_data import main as prepare

    recipe = planted["folder"] / "recipe.yaml"
    recipe.write_text(json.dumps({
        "datasets": [{"path": str(planted["a"]), "validation": str(planted["a_validation"])},
                     {"path": str(planted["b"])}],
        "clean": ["decontaminate", "all"]}))  # any order: the steps always run in clean.STEPS' order
    store = planted["folder"] / "store"
    prepare(["--config", str(recipe), "--validation_split_percentage", "10", "--vocab_size", "512",
             "--data_dir", str(store)])
    return store


def removed(store, source, split, step):
    steps = read_manifest(store)["sources"][source]["cleaning"][split]
    return sorted(clean.removed_rows(store / "cleaning", json.loads(
        (store / "cleaning" / "done.json").read_text())["sources"][source][split][step])), steps[step]


def test_each_planted_defect_is_removed_by_its_step_and_nothing_else(cleaned_store):
    manifest = read_manifest(cleaned_store)
    assert manifest["cleaning"]["steps"] == list(clean.STEPS)
    expected = {  # (source, split): {step: rows}
        (0, "train"): {"exact": [120], "minhash": [121], "decontaminate": [124, 125]},
        (1, "validation"): {"gopher_quality": [2]},  # held out of b: the same corpus, cleaned but not decontaminated
        (1, "train"): {"exact": [40, 42], "minhash": [41], "decontaminate": [43]}}
    quality = {(0, "train"): [122, 123]}  # boilerplate, gibberish: by the first quality filter that fails them
    for (source, split), steps in expected.items():
        stats = manifest["sources"][source]["cleaning"][split]
        every = []
        for step in clean.STEPS:
            rows, counts = removed(cleaned_store, source, split, step)
            every += rows
            if step in steps:
                assert rows == steps[step], (source, split, step)
            assert counts["documents"] == len(rows)
            assert (counts["tokens"] > 0) == bool(rows)
        assert sorted(every) == sorted(sum(steps.values(), []) + quality.get((source, split), []))
        kept = np.load(cleaned_store / "cleaning" / "kept" / f"{source:02d}-{split}.npy")
        assert stats["kept"] == len(kept) == stats["documents"] - len(every)
        assert manifest["sources"][source]["splits"][split]["documents"] == len(kept)
    boilerplate_step = [s for s in clean.STEPS if 122 in removed(cleaned_store, 0, "train", s)[0]]
    gibberish_step = [s for s in clean.STEPS if 123 in removed(cleaned_store, 0, "train", s)[0]]
    assert boilerplate_step == ["gopher_repetition"] and gibberish_step == ["gopher_quality"]
    assert "validation" not in manifest["sources"][0]["cleaning"]  # a given validation file: untouched
    sample = [json.loads(line) for line in (cleaned_store / "cleaning" / "removed_sample.jsonl").read_text().splitlines()]
    assert {(s["source"], s["split"], s["step"]) for s in sample} >= {("a", "train", "exact"), ("b", "validation",
                                                                                                "gopher_quality")}
    assert not (cleaned_store / "cleaning" / "work").exists()  # the signatures are deleted once done


def test_the_same_flags_again_read_the_finished_cleaning_and_store(cleaned_store, planted):
    import subprocess
    import sys

    from conftest import ROOT

    again = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--config", str(planted["folder"] / "recipe.yaml"),
                            "--validation_split_percentage", "10", "--vocab_size", "512", "--data_dir", str(cleaned_store)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "cleaning: " not in again.stdout  # no datatrove stage ran again: another process, the same identity
    assert json.loads(again.stdout.splitlines()[-2])["content_id"] == read_manifest(cleaned_store)["content_id"]


def test_a_run_from_the_cleaned_store_evaluates_on_the_untouched_validation_split(cleaned_store, planted, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cleaned_store / "tokenizer")
    given = sum(map(len, document_encoder(tokenizer)(planted["texts"])))
    assert read_manifest(cleaned_store)["sources"][0]["splits"]["validation"]["tokens"] == given
    out = tmp_path / "run"
    launch(["--data_dir", cleaned_store, "--output_dir", out, "--max_train_steps", "4", "--eval_steps", "4",
            "--max_eval_samples", "1000000", *TINY])
    res = results(out)
    a = res["sources"][0]
    assert a["eval_tokens"] == given // 32 * 32  # every token of the given file that fills a block
    assert a["cleaning"]["train"]["exact"]["documents"] == 1
    report = (out / "report.md").read_text()
    assert "## Cleaning" in report and "| a | train | decontaminate | 2 (1.6%) |" in report


def sources_in_memory(r, held_out=False):
    texts = [document(r) for _ in range(120)]
    texts[50], texts[90] = exact_copy(texts[10]), near_copy(texts[20], r)
    texts[60], texts[100] = gibberish(r), boilerplate()
    validation = [document(r) for _ in range(5)]
    texts[110] = validation[0]
    validation = validation[:1] if held_out else validation  # held out: task 0 is one document
    return [{"label": "m", "identity": {"test": "planted"}, "text_column": "text", "held_out": held_out,
             "splits": {"train": Dataset.from_dict({"text": texts}), "validation": Dataset.from_dict({"text": validation})}}]


def everything(folder):
    done = json.loads((folder / "done.json").read_text())
    return done["sources"], {step: clean.removed_rows(folder, s) for step, s in done["sources"][0]["train"].items()
                             if isinstance(s, dict)}, np.load(folder / "kept" / "00-train.npy").tolist()


def test_same_result_on_any_worker_count_and_after_an_interruption(tmp_path, monkeypatch):
    monkeypatch.setattr(clean, "TASK_DOCUMENTS", (25, 25))  # 5 tasks
    monkeypatch.setattr(clean, "MERGE_TASKS", 2)  # signatures merged by 2 tasks (per band): hash ranges meet
    # (ranged by the largest signature file: task 0's, a held-out split of one document, cannot be split in 2)
    chosen = {"steps": list(clean.STEPS), "minhash": {"ngrams": 5, "buckets": 14, "hashes_per_bucket": 8},
              "decontaminate_ngrams": 13}
    clean.clean(sources_in_memory(random.Random(1), held_out=True), chosen, str(tmp_path / "two"), workers=2)
    reference = everything(tmp_path / "two")
    assert reference[1]["exact"] == [50, 110] and reference[1]["minhash"] == [90]  # 110: the held-out one's copy,
    assert reference[1]["decontaminate"] == [] and len(reference[2]) == 115  # whose first copy is validation's

    runs, real_run = [], clean.Rows.run

    def counted(self, data=None, rank=0, world_size=1):
        runs.append(rank)
        if fail and runs.count(3) == 2:  # exact-1 passes; the first pass dies in its 4th task
            raise RuntimeError("killed")
        yield from real_run(self, data, rank, world_size)

    monkeypatch.setattr(clean.Rows, "run", counted)
    fail = True
    with pytest.raises(RuntimeError):
        clean.clean(sources_in_memory(random.Random(1), held_out=True), chosen, str(tmp_path / "one"), workers=1)
    first = list(runs)
    fail, runs[:] = False, []
    cleaned, _ = clean.clean(sources_in_memory(random.Random(1), held_out=True), chosen, str(tmp_path / "one"), workers=1)
    assert everything(tmp_path / "one") == reference
    assert len(cleaned[0]["splits"]["train"]) == 115
    assert runs[:2] == [3, 4] and first.count(0) == 2  # resumed at the task that died: exact-1's were all done


def test_bad_settings_are_refused_in_one_line(cleaned_store, planted, tmp_path):
    from prepare_data import main as prepare

    base = ["--train_file", str(planted["a"]), "--data_dir", str(tmp_path / "s"), "--vocab_size", "512"]
    for flags, message in [(["--clean", "minhash", "--minhash_buckets", "0"], "between 1 and 64"),
                           (["--clean", "exact", "--minhash_buckets", "20"], "add minhash to --clean"),
                           (["--clean", "decontaminate", "--decontaminate_ngrams", "2"], "between 4 and 50")]:
        with pytest.raises(UserError, match=message):
            prepare(base + flags)
    assert not (tmp_path / "s").exists()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no token store"):  # before any cleaning work
        prepare(base + ["--clean", "exact"])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["notes.txt"]
    recipe = planted["folder"] / "recipe.yaml"
    with pytest.raises(UserError, match="holds a store cleaned otherwise"):  # before any cleaning work
        prepare(["--config", str(recipe), "--clean", "exact", "--data_dir", str(cleaned_store)])
    from utils.config import parse_args

    with pytest.raises(UserError, match="are prepare_data.py's"):  # train.py on text would not clean it
        parse_args(["--config", str(recipe), "--output_dir", str(tmp_path / "run")])
    assert parse_args(["--config", str(recipe), "--data_dir", str(cleaned_store), "--output_dir",
                       str(tmp_path / "run")]).data_dir == str(cleaned_store)  # the recipe, shared: its store
    chosen = {"steps": ["exact"]}
    clean.clean(sources_in_memory(random.Random(2)), chosen, str(tmp_path / "c"), workers=1)
    with pytest.raises(UserError, match="other --clean settings"):
        clean.clean(sources_in_memory(random.Random(2)), {"steps": ["fineweb"]}, str(tmp_path / "c"), workers=1)


def test_a_changed_setting_is_another_store(planted, tmp_path):
    from prepare_data import main as prepare

    manifests = []
    for ngrams in (5, 6):
        store = tmp_path / f"s{ngrams}"
        prepare(["--train_file", str(planted["a_validation"]), "--data_dir", str(store), "--vocab_size", "512",
                 "--clean", "minhash", "--minhash_ngrams", str(ngrams)])
        manifests.append(read_manifest(store))
        assert manifests[-1]["cleaning"]["minhash"]["ngrams"] == ngrams
    assert manifests[0]["sources"][0]["content"] == manifests[1]["sources"][0]["content"]  # the same shards
    assert manifests[0]["content_id"] != manifests[1]["content_id"]  # cleaned otherwise: another store


def test_kept_rows_are_a_memory_mapped_selection_of_any_dataset(tmp_path):
    texts = [f"document {i}" for i in range(10)]
    selected = Dataset.from_dict({"text": texts}).select([5, 3, 1, 7, 9])  # a selection already: composed
    rows = tmp_path / "rows.npy"
    np.save(rows, np.array([0, 2, 4], dtype=np.int64))
    for _ in range(2):  # the second time from the indices file written the first
        kept = clean._kept_rows(selected, str(rows), "f")
        assert kept["text"] == ["document 5", "document 1", "document 9"] and kept._indices is not None
    whole = tmp_path / "all.npy"
    np.save(whole, np.arange(5, dtype=np.int64))
    assert clean._kept_rows(selected, str(whole), "g") is selected
