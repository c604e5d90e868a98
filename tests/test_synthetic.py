"""--synthetic-weights: any architecture from its config, the base drawn and quantized by rows on each
rank (the same bytes as a 1-process build's rows), no checkpoint, held bytes equal to the planner's."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.model import synthetic
from fsdp_qlora.model.nf4 import quantize_nf4
from fsdp_qlora.model.sources import resolve_model
from fsdp_qlora.train.planner import Geometry, Options, static_bytes
from tests.architectures import COMMON, MOE_OVERRIDES, OVERRIDES
from tests.conftest import REPO, run_python, run_torchrun, subprocess_env, train_metrics

# tiny-llama (the alias: its registry-free generated config), Qwen 3 (tied embeddings, q/k norms) and
# gpt-oss (transposed NF4 experts with biases, a biased router, attention sinks): configs only.
MODELS = ("tiny-llama", "qwen3", "gpt_oss")
INNER = ("packed", "absmax_q", "nested_absmax", "offset")  # an NF4 tensor's, as the worker saves them


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """model -> world size -> rank -> (local tensors, {"rows", "bytes"}), from one torchrun per world size."""
    root = tmp_path_factory.mktemp("synthetic")
    names = []
    for model in MODELS:
        if model == "tiny-llama":
            names.append(model)
            continue
        overrides = OVERRIDES.get(model) or MOE_OVERRIDES[model]
        (root / model).mkdir()
        (root / model / "config.json").write_text(json.dumps({"model_type": model, **COMMON, **overrides}))
        names.append(str(root / model / "config.json"))
    result = {model: {} for model in MODELS}
    for world in (1, 2):
        prefix = root / f"world{world}"
        run_torchrun(REPO / "tests/workers/synthetic_worker.py", world, str(root / "cache"), str(prefix), *names,
                     env=subprocess_env(root / "cache"), timeout=300)
        for index, model in enumerate(MODELS):
            result[model][world] = [(load_file(f"{prefix}.{index}.rank{rank}.safetensors"),
                                     json.loads((root / f"world{world}.{index}.rank{rank}.json").read_text()))
                                    for rank in range(world)]
    return root / "cache", dict(zip(MODELS, names)), result


def _expected_rows(whole: dict, name: str, start: int, stop: int) -> dict[str, torch.Tensor]:
    """What a rank owning rows [start, stop) of parameter `name` must hold, cut from the 1-process model."""
    if f"{name}.packed" not in whole:
        return {name: whole[name][start:stop]}
    packed = whole[f"{name}.packed"]
    if packed.ndim == 3:  # NF4 experts: whole experts, every inner tensor by experts
        return {f"{name}.{inner}": whole[f"{name}.{inner}"][start:stop] for inner in INNER}
    blocks_per_row = packed.shape[1] * 2 // 64
    return {f"{name}.packed": packed[start:stop],
            f"{name}.absmax_q": whole[f"{name}.absmax_q"][start * blocks_per_row: stop * blocks_per_row],
            f"{name}.nested_absmax": whole[f"{name}.nested_absmax"], f"{name}.offset": whole[f"{name}.offset"]}


@pytest.mark.parametrize("model", MODELS)
def test_each_rank_holds_the_one_process_bytes_of_its_rows(built, model):
    """The project's rule for a real load, kept without a checkpoint: on 2 ranks each rank's NF4 codes
    and absmax are the 1-process model's at its rows (its whole experts), the nested constants the whole
    weight's, and every other frozen tensor its rows of the 1-process one; the ranks tile every tensor."""
    _, _, result = built
    whole, _ = result[model][1][0]
    for rank, (tensors, info) in enumerate(result[model][2]):
        for name, (start, stop) in info["rows"].items():
            for key, expected in _expected_rows(whole, name, start, stop).items():
                assert torch.equal(tensors[key], expected), (model, rank, key)
    rows = [result[model][2][rank][1]["rows"] for rank in range(2)]
    one = result[model][1][0][1]["rows"]
    for name, (_, total) in one.items():
        assert rows[0][name][0] == 0 and rows[0][name][1] == rows[1][name][0] and rows[1][name][1] == total, name


@pytest.mark.parametrize("model", MODELS)
def test_held_bytes_equal_the_planners_static_parts(built, model):
    """The planner treats a synthetic base as a load: what each rank holds is its static prediction."""
    cache, names, result = built
    config = json.loads((resolve_model(names[model], str(cache), synthetic=True) / "config.json").read_text())
    geo = Geometry.from_config(config)
    for world in (1, 2):
        planned = static_bytes(geo, Options(TrainConfig(fsdp_units="layer"), world))
        assert [info["bytes"] for _, info in result[model][world]] == [planned] * world, (model, world)


def test_values_are_the_seeded_normal_quantized_and_norms_are_one(built):
    """Oracle: the documented draw (synthetic_rows of the checkpoint name, seed 42, std initializer_range)
    quantized whole as bitsandbytes does gives the 1-process model's bytes; norm weights are 1."""
    _, _, result = built
    whole, _ = result["tiny-llama"][1][0]
    name = "model.layers.1.self_attn.k_proj.base.weight"  # the adapter wraps the checkpoint's k_proj
    rows, cols = whole[f"{name}.packed"].shape[0], whole[f"{name}.packed"].shape[1] * 2
    drawn = synthetic.synthetic_rows(name.replace(".base", ""), rows, cols, 0, rows, 42, 0.05, torch.device("cpu"))
    assert 0.045 < drawn.float().std() < 0.055  # tiny-llama's initializer_range
    expected = quantize_nf4(drawn)
    for inner in INNER:
        assert torch.equal(whole[f"{name}.{inner}"], getattr(expected, inner)), inner
    assert torch.equal(whole["model.norm.weight"], torch.ones_like(whole["model.norm.weight"]))
    v = whole["model.layers.1.self_attn.v_proj.base.weight.packed"]  # same shape, another name
    assert v.shape == expected.packed.shape and not torch.equal(v, expected.packed)


def test_rows_are_the_same_whichever_range_draws_them(monkeypatch):
    """Blocks of rows, seeded per block: any range equals the same rows of the whole draw, also across
    block boundaries (blocks of 3 rows here)."""
    monkeypatch.setattr(synthetic, "BLOCK_VALUES", 3 * 64)
    whole = synthetic.synthetic_rows("w", 10, 64, 0, 10, 7, 1.0, torch.device("cpu"))
    for start, stop in [(0, 4), (4, 10), (2, 7), (5, 6), (9, 10), (3, 3)]:
        part = synthetic.synthetic_rows("w", 10, 64, start, stop, 7, 1.0, torch.device("cpu"))
        assert torch.equal(part, whole[start:stop]), (start, stop)
    assert not torch.equal(synthetic.synthetic_rows("w", 10, 64, 0, 10, 8, 1.0, torch.device("cpu")), whole)


def test_two_rank_training_run_without_a_checkpoint(tmp_path):
    """train.py end to end on 2 ranks with --synthetic-weights and --dataset synthetic: the stand-in
    directory holds a config and a tokenizer and no weights; every step sees full rows (2 ranks x 1 x 64
    tokens); the run exports its adapter."""
    cache = tmp_path / "cache"
    rows = train_metrics(tmp_path / "run", cache, "--synthetic-weights", "--model", "qwen-2.5-0.5b",
                         "--dataset", "synthetic", "--max-steps", "3", "--batch-size", "1", "--context-length", "64",
                         "--lora-target-modules", "q_proj", "--save-every", "0", timeout=300)
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3] and all(row["loss"] == row["loss"] for row in steps)
    assert all(row["tokens_per_sec"] > 0 for row in steps)
    made = next(cache.glob("synthetic-qwen-2.5-0.5b-*"))
    assert sorted(p.name for p in made.glob("*.safetensors")) == [] and (made / "config.json").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("model,needle", [
    ("acme/not-an-alias", "neither an alias"),
    ("/nowhere/config.json", "does not exist"),
    ("model.gguf", "is a GGUF file"),
])
def test_bad_sources_fail_in_one_line_before_anything_loads(tmp_path, model, needle):
    proc = run_python(str(REPO / "train.py"), "--synthetic-weights", "--model", model, "--output-dir",
                      str(tmp_path / "run"), env=subprocess_env(tmp_path / "cache"), timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_vocabulary_smaller_than_the_bundled_tokenizer_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **COMMON, "vocab_size": 512}))
    proc = run_python(str(REPO / "train.py"), "--synthetic-weights", "--model", str(tmp_path), "--output-dir",
                      str(tmp_path / "run"), env=subprocess_env(tmp_path / "cache"), timeout=120)
    assert proc.returncode == 2 and "more than this model's vocab_size 512" in proc.stderr, proc.stderr[-2000:]


def test_plan_is_the_same_with_synthetic_weights(tmp_path):
    """--plan reads the config only: a synthetic base plans exactly as the real checkpoint would."""
    args = [str(REPO / "train.py"), "--model", "llama-2-70b", "--plan", "--context-length", "2048",
            "--batch-size", "1", "--activation-checkpointing"]
    real = run_python(*args, env=subprocess_env(tmp_path), timeout=120)
    fake = run_python(*args, "--synthetic-weights", env=subprocess_env(tmp_path), timeout=120)
    assert real.returncode == fake.returncode == 0 and "peak allocated" in real.stdout
    assert real.stdout == fake.stdout


def test_synthetic_dataset_rows_fill_the_context(tmp_path, monkeypatch):
    """--dataset synthetic: every row exactly --context-length tokens, loss on all but bos, rows for two
    optimizer steps of the launch (WORLD_SIZE x batch x accumulation) per epoch, the same for every rank."""
    from fsdp_qlora.data.pipeline import build_train_data
    from fsdp_qlora.data.prepare import column
    from fsdp_qlora.data.sources import synthetic_text
    from fsdp_qlora.model.tiny_llama import train_tokenizer, training_texts

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = TrainConfig(dataset="synthetic", context_length=96, batch_size=2, grad_accum_steps=2)
    data = build_train_data(cfg, train_tokenizer(training_texts(), 1024, 4096))
    lengths = column(data.rows, "length")
    assert len(data.rows) == 2 * 3 * 2 * 2 and (lengths == 96).all()
    assert all(sum(label != -100 for label in row) == 95 for row in data.rows["labels"])
    assert synthetic_text(cfg)["text"] == synthetic_text(cfg)["text"]  # seeded: every rank prepares the same
    assert synthetic_text(cfg)["text"] != synthetic_text(TrainConfig(dataset="synthetic", context_length=96,
                                                                     batch_size=2, grad_accum_steps=2, seed=1))["text"]
