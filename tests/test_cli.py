"""Flags, YAML and the errors a user sees before any weight loads."""

import json

import pytest
import yaml

from fsdp_qlora.config import TrainConfig, build_parser, config_fields, parse_config
from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model.sources import resolve_model
from tests.conftest import REPO, run_python, subprocess_env


def test_help_lists_every_flag_with_its_default():
    text = build_parser().format_help()
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
    assert text.count("(default:") == len(config_fields())
    for flag in ("--model", "--dataset", "--output-dir", "--train-type", "--lora-rank", "--lora-alpha",
                 "--lora-dropout", "--lora-target-modules", "--batch-size", "--grad-accum-steps",
                 "--context-length", "--max-steps", "--num-epochs", "--lr", "--warmup-steps",
                 "--weight-decay", "--max-grad-norm", "--seed", "--log-every"):
        assert flag in text


def test_precedence_defaults_alias_yaml_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"lr": 5e-4, "lora-rank": 4, "batch_size": 2}))
    cfg = parse_config(["--config", str(recipe), "--batch-size", "3", "--lora-target-modules", "q_proj,v_proj"])
    assert cfg.lr == 5e-4  # YAML beats the tiny-llama alias' 1e-3
    assert cfg.lora_rank == 4 and cfg.batch_size == 3  # the flag beats the YAML
    assert cfg.context_length == 256  # alias recommendation beats the field default
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert parse_config(["--model", "/some/dir"]).context_length == TrainConfig.context_length


def test_config_yaml_round_trips(tmp_path):
    cfg = parse_config(["--lora-rank", "16", "--no-trust-remote-code"])
    cfg.save_yaml(tmp_path / "config.yaml")
    again = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg


@pytest.mark.parametrize("argv, message", [
    (["--lora-rank", "0"], "--lora-rank must be positive"),
    (["--max-steps", "0"], "--max-steps must be positive or -1"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--activation-checkpointing-every", "2"], "--activation-checkpointing-every 2 does nothing without "
                                                "--activation-checkpointing"),
    (["--dataset-streaming", "--max-steps", "5", "--group-by-length"], "--group-by-length needs every example's"),
    (["--packing", "--group-by-length"], "--group-by-length has no effect with --packing"),
    (["--eval-every", "5"], "--eval-every 5 needs an eval set"),
])
def test_invalid_values(argv, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_config(argv)


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora_rnak: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'lora_rnak'.*did you mean 'lora_rank'"):
        parse_config(["--config", str(recipe)])


def _run_train(*args, cache):
    return run_python(str(REPO / "train.py"), *args, env=subprocess_env(cache), timeout=120)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_unknown_flag(tmp_path):
    _assert_one_line_error(_run_train("--lora-rnak", "4", cache=tmp_path), "unrecognized arguments: --lora-rnak",
                           "--help")


def test_nonexistent_model_path(tmp_path):
    proc = _run_train("--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "run"), cache=tmp_path)
    _assert_one_line_error(proc, "does not exist", "--model")
    assert not (tmp_path / "run").exists()  # failed before anything was written


def test_directory_without_safetensors(tmp_path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x02")
    proc = _run_train("--model", str(model_dir), cache=tmp_path)
    _assert_one_line_error(proc, "no *.safetensors", "pytorch_model.bin", "convert")


def test_directory_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    _assert_one_line_error(_run_train("--model", str(tmp_path / "m"), cache=tmp_path), "no config.json")


def test_checkpoint_not_matching_its_config(tmp_path):
    """Found while loading, before any training: one error line naming the tensor and the fix
    (after the data's progress bars: the data is prepared first). A truncated shard is the same
    kind of error (ShardFormatError is a ConfigError; its messages: tests/test_shard_reader.py)."""
    import shutil

    from fsdp_qlora.model.tiny_llama import ensure_tiny_llama

    mismatched = tmp_path / "mismatched"
    shutil.copytree(ensure_tiny_llama(tmp_path / "cache"), mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "intermediate_size": 384}))
    _assert_error_line(_run_train("--model", str(mismatched), "--output-dir", str(tmp_path / "run"),
                                  cache=tmp_path / "cache"),
                       "has shape (128, 256), the model's config.json gives (128, 384)", "does not match")
    assert not (tmp_path / "run" / "checkpoints").exists()


def _assert_error_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: "), proc.stderr[-2000:]
    assert all(needle in errors[0] for needle in needles), errors[0]
    assert "Traceback" not in proc.stderr


def test_finished_run_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    proc = _run_train("--output-dir", str(run_dir), "--max-steps", "1", cache=tmp_path / "cache")
    _assert_one_line_error(proc, "already holds a finished run", "--output-dir")
    assert (run_dir / "adapter" / "adapter_config.json").read_text() == "{}"


def test_hub_id_resolves_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """The hub code path, offline: a snapshot laid out as huggingface_hub caches it."""
    from fsdp_qlora.model.tiny_llama import ensure_tiny_llama

    source = ensure_tiny_llama(tmp_path / "gen")
    hub_cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub_cache / "models--acme--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).symlink_to(file)
    (hub_cache / "models--acme--tiny" / "refs").mkdir()
    (hub_cache / "models--acme--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("acme/tiny", str(tmp_path)) == snapshot
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        resolve_model("acme/absent", str(tmp_path))


def test_configuration_reference_is_up_to_date():
    from fsdp_qlora.config import config_reference_markdown

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == config_reference_markdown(), "docs/configuration.md is stale: run python tools/gen_config_docs.py"


def test_models_reference_is_up_to_date():
    from fsdp_qlora.model.registry import models_reference_markdown

    doc = (REPO / "docs" / "models.md").read_text()
    assert doc == models_reference_markdown(), "docs/models.md is stale: run python tools/gen_config_docs.py"


def test_console_entry_points_are_installed_and_run():
    """pyproject's [project.scripts]: each command maps to a main() that parses its flags."""
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("fsdp-qlora-")}
    assert set(scripts) == {f"fsdp-qlora-{n}" for n in ("train", "plan", "export", "merge", "generate")}
    for ep in scripts.values():
        assert callable(ep.load())
    proc = run_python("-c", "import sys; from fsdp_qlora.cli.plan import main; sys.exit(main(['--model', "
                      "'llama-3-8b', '--world-size', '1']))")
    assert proc.returncode == 0 and "memory plan for llama-3-8b" in proc.stdout, proc.stderr[-2000:]
