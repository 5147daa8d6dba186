"""Flags, YAML recipes and the preflight that reconciles them with accelerate / DeepSpeed configs."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from utils.config import parse_args
from utils.errors import UserError
from utils.distributed import preflight


def write(path, text):
    path.write_text(text)
    return str(path)


def test_defaults_run_the_embedded_job():
    args = parse_args([])
    assert args.dataset_name is None and args.train_file is None and args.model_preset == "small"


def test_recipe_sets_flags_and_command_line_wins(tmp_path):
    recipe = write(tmp_path / "r.yaml", "learning_rate: 0.01\nblock_size: 64\nlr_scheduler_type: linear\n")
    args = parse_args(["--config", recipe, "--block_size", "32"])
    assert (args.learning_rate, args.block_size, args.lr_scheduler_type) == (0.01, 32, "linear")


def test_recipe_unknown_key_is_named(tmp_path):
    recipe = write(tmp_path / "r.yaml", "learning_rate: 0.01\nlearnig_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown key.*learnig_rate"):
        parse_args(["--config", recipe])


@pytest.mark.parametrize("text, message", [
    ("lr_scheduler_type: wavy\n", "lr_scheduler_type='wavy' is not one of"),
    ("- a list\n", "must be a mapping"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_bad_recipe_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        parse_args(["--config", write(tmp_path / "r.yaml", text)])


@pytest.mark.parametrize("argv, message", [
    (["--train_file", "/nonexistent/data.txt"], "does not exist"),
    (["--block_size", "0"], "--block_size must be at least 1"),
    (["--dataset_name", "x", "--train_file", __file__], "not both"),
    (["--train_file", __file__], "unsupported extension"),
])
def test_bad_flags_stop_early(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(argv)


def test_unknown_flag_is_named_by_the_script():
    result = subprocess.run([sys.executable, "train.py", "--learnig_rate", "1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "unrecognized arguments: --learnig_rate" in result.stderr


def test_abbreviated_flag_is_a_typo_not_a_prefix(capsys):
    """argparse would read --learning_rat as --learning_rate; a typo must fail like an unknown recipe key."""
    with pytest.raises(SystemExit):
        parse_args(["--learning_rat", "0.1"])
    assert "unrecognized arguments: --learning_rat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--conf", "recipe.yaml"])  # not a prefix of --config either


def test_global_batch_size_derives_accumulation():
    args = parse_args(["--global_batch_size", "64", "--per_device_train_batch_size", "8"])
    assert preflight(args, env={"WORLD_SIZE": "2"}).gradient_accumulation_steps == 4
    assert preflight(args, env={"WORLD_SIZE": "1"}).gradient_accumulation_steps == 8
    with pytest.raises(UserError, match="not a multiple of micro-batch 8 x 3 processes = 24"):
        preflight(args, env={"WORLD_SIZE": "3"})


def test_preflight_makes_nccl_raise_instead_of_hang_and_keeps_the_users_value():
    env = {"WORLD_SIZE": "2"}
    preflight(parse_args([]), env=env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    env = {"WORLD_SIZE": "2", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    preflight(parse_args([]), env=env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusals are for CPU-only machines")
@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "the FSDP config needs GPUs"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "mixed_precision fp16 needs a GPU"),
])
def test_settings_accelerate_ignores_on_cpu_are_refused(env, message):
    with pytest.raises(UserError, match=message):
        preflight(parse_args([]), env={"WORLD_SIZE": "2", **env})


@pytest.mark.parametrize("version", [None, "1"])
def test_an_fsdp1_config_is_refused_naming_the_fix(version):
    """FSDP1 (accelerate's default without fsdp_version) is neither built from the meta device nor
    saved by every process here: refused before any work, on any machine."""
    env = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", **({"FSDP_VERSION": version} if version else {})}
    with pytest.raises(UserError, match="set fsdp_version: 2"):
        preflight(parse_args([]), env=env)


def deepspeed_env(tmp_path, ds_config, mixed="no", world=2):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **ds_config}))
    return {"WORLD_SIZE": str(world), "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path), "ACCELERATE_MIXED_PRECISION": mixed}


@pytest.mark.parametrize("ds_config, mixed, message", [
    ({"fp16": {"enabled": True}}, "bf16", "sets fp16.enabled=true but the accelerate config has mixed_precision: bf16"),
    ({"bf16": {"enabled": True}}, "no", "sets bf16.enabled=true but the accelerate config has mixed_precision: no"),
    ({"train_batch_size": 64}, "no", "train_batch_size 64 but micro-batch x accumulation x processes = 32"),
    ({"train_micro_batch_size_per_gpu": 4}, "no", "train_micro_batch_size_per_gpu 4 but --per_device"),
    ({"gradient_clipping": 0.5}, "no", "gradient_clipping 0.5 but --max_grad_norm is 1.0"),
    ({"optimizer": {"type": "AdamW"}}, "no", "has an 'optimizer' section"),
])
def test_deepspeed_conflicts_name_both_sides(tmp_path, ds_config, mixed, message):
    env = deepspeed_env(tmp_path, ds_config, mixed)
    with pytest.raises(UserError, match=message) as error:
        preflight(parse_args([]), env=env)
    assert str(tmp_path / "ds.json") in str(error.value)


def test_deepspeed_config_accumulation_counts_unless_a_flag_disagrees(tmp_path):
    env = deepspeed_env(tmp_path, {"gradient_accumulation_steps": 4})
    assert preflight(parse_args([]), env=dict(env)).gradient_accumulation_steps == 4
    with pytest.raises(UserError, match="gradient_accumulation_steps 4 but --gradient_accumulation_steps gives 2"):
        preflight(parse_args(["--gradient_accumulation_steps", "2"]), env=dict(env))


def test_matching_deepspeed_config_passes_and_hands_over_clipping(tmp_path):
    env = deepspeed_env(tmp_path, {"train_batch_size": 32, "bf16": {"enabled": "auto"}})
    plan = preflight(parse_args(["--max_grad_norm", "0.5"]), env=env)
    assert plan.zero_stage == 2 and not plan.sharded_parameters
    assert env["ACCELERATE_GRADIENT_CLIPPING"] == "0.5" and env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "1"


def test_shipped_deepspeed_configs_use_the_ds_configs(tmp_path, monkeypatch):
    """One source of truth: every DeepSpeed accelerate config names a ds_configs/*.json, every ds_config
    is named by one, and the relative path resolves from any working directory."""
    import yaml

    named = {}
    for path in sorted((ROOT / "accelerate_configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if config["distributed_type"] == "DEEPSPEED":
            ds = config["deepspeed_config"]
            assert set(ds) <= {"deepspeed_config_file", "zero3_init_flag", "deepspeed_multinode_launcher"}, path.name
            named[path.name] = ds["deepspeed_config_file"]
    assert {str(p.relative_to(ROOT)) for p in (ROOT / "ds_configs").glob("*.json")} == set(named.values())
    monkeypatch.chdir(tmp_path)  # not the repository root
    for yaml_name, ds_file in named.items():
        env = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": ds_file}
        plan = preflight(parse_args([]), env=env)
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(ROOT / ds_file)
        assert plan.zero_stage == int(yaml_name.split("zero")[1][0]), yaml_name


def test_every_flag_has_help():
    from utils.config import build_parser

    missing = [a.option_strings[0] for a in build_parser()._actions if a.option_strings and not a.help]
    assert not missing, f"flags without help text: {missing}"


def test_flash_attention_without_its_package_is_one_line_before_any_work(tmp_path):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(UserError, match="needs a GPU and the flash-attn package"):
        parse_args(["--attn_implementation", "flash_attention_2", "--output_dir", str(tmp_path)])


def test_a_spike_window_of_one_step_is_refused():
    with pytest.raises(UserError, match="--spike_window must be at least 2"):
        parse_args(["--spike_window", "1"])


def test_help_lists_flags_with_their_defaults():
    """README: `python train.py -h` lists them all with their defaults (the recipe-only --datasets stays hidden)."""
    result = subprocess.run([sys.executable, "train.py", "-h"], cwd=ROOT, capture_output=True, text=True)
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert result.returncode == 0, result.stderr
    for default in ("tokens per training sequence (default: 128)", "reached after warmup (default: 0.003)",
                    "(default: cosine)", "(default: 1800)", "~30% more compute"):
        assert default in text, default
    assert "--datasets" not in text and "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_parse(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the files a recipe names, relative to where it is run
    (tmp_path / "data" / "medical").mkdir(parents=True)
    (tmp_path / "data" / "medical" / "notes.jsonl").write_text('{"text": "x"}\n')
    args = parse_args(["--config", str(ROOT / "recipes" / recipe)])
    assert args.config.endswith(recipe)
    if recipe == "mixture.yaml":
        assert [(s["label"], s["weight"]) for s in args.sources] == [("medical", 0.7), ("web", 0.3)]


def test_cpu_default_recipe_is_the_default_job():
    recipe = vars(parse_args(["--config", str(ROOT / "recipes" / "cpu_default.yaml")]))
    defaults = vars(parse_args([]))
    assert {k: v for k, v in recipe.items() if k != "config"} == {k: v for k, v in defaults.items() if k != "config"}


def test_debug_from_a_recipe_shows_tracebacks(tmp_path):
    """--debug used to be read from sys.argv, so a recipe's `debug: true` was ignored."""
    from utils import errors

    try:
        parse_args(["--config", write(tmp_path / "r.yaml", "debug: true\n")])
        assert errors.show_tracebacks
        parse_args([])
        assert not errors.show_tracebacks
    finally:
        errors.show_tracebacks = False


# --- Sources: flags, globs and the recipe's datasets: list (utils/sources.py) ----------------

def test_train_files_globs_and_weights_make_sources(tmp_path):
    for name in ("web-1.jsonl", "web-2.jsonl", "books.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n' if name.endswith("jsonl") else "x\n")
    args = parse_args(["--train_file", str(tmp_path / "web-*.jsonl"), str(tmp_path / "books.txt"),
                       "--train_weights", "3", "1", "--output_dir", str(tmp_path / "out")])
    web, books = args.sources
    assert web["files"] == [str(tmp_path / "web-1.jsonl"), str(tmp_path / "web-2.jsonl")] and web["weight"] == 3
    assert (books["label"], books["weight"], books["kind"]) == ("books", 1, "files")
    assert parse_args(["--output_dir", str(tmp_path / "o")]).sources[0]["kind"] == "embedded"


def test_recipe_datasets_list_is_the_full_form(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    recipe = write(tmp_path / "r.yaml", f"""datasets:
  - path: {tmp_path / "a.jsonl"}
    text_column: body
    weight: 0.7
    label: mine
  - name: org/corpus
    config: en
    split: train
    weight: 0.3
""")
    mine, hub = parse_args(["--config", recipe, "--output_dir", str(tmp_path / "out")]).sources
    assert (mine["label"], mine["text_column"], mine["weight"]) == ("mine", "body", 0.7)
    assert (hub["kind"], hub["name"], hub["config"], hub["label"], hub["weight"]) == ("hub", "org/corpus", "en",
                                                                                     "corpus-en", 0.3)


ONE = ["--train_file", "{d}/a.jsonl"]
TWO = ["--train_file", "{d}/a.jsonl", "{d}/b.jsonl"]


@pytest.mark.parametrize("argv, recipe, message", [
    ([*ONE, "--train_weights", "1", "2"], None, "2 values for 1 sources"),
    ([*TWO, "--train_weights", "0", "0"], None, "at least one positive"),
    ([*TWO, "--train_weights", "-1", "2"], None, "at least one positive"),
    (["--train_file", "{d}/nothing-*.jsonl"], None, "matches no file"),
    ([*TWO, "--validation_file", "{d}/a.jsonl"], None, "goes with one --train_file"),
    ([*TWO, "--streaming", "--max_train_steps", "5"], None, "needs their weights"),
    ([], "datasets:\n  - path: {d}/a.jsonl\n    name: x\n", "exactly one of path: .*or name:"),
    ([], "datasets:\n  - path: {d}/a.jsonl\n    wieght: 2\n", "unknown key.*wieght"),
    ([], "datasets:\n  - path: {d}/a.jsonl\n    weight: lots\n", "weight 'lots': give a number"),
    ([], "datasets:\n  - path: {d}/a.jsonl\n    weight: 1\n  - path: {d}/b.jsonl\n", "every source a weight, or none"),
    ([], "datasets: {d}/a.jsonl\n", "must be a non-empty list"),
    (ONE, "datasets:\n  - path: {d}/a.jsonl\n", "drop --train_file"),
])
def test_bad_sources_are_one_clear_line(tmp_path, argv, recipe, message):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    argv = [a.format(d=tmp_path) for a in argv] + ["--output_dir", str(tmp_path / "out")]
    if recipe is not None:
        argv += ["--config", write(tmp_path / "r.yaml", recipe.format(d=tmp_path))]
    with pytest.raises(UserError, match=message):
        parse_args(argv)
