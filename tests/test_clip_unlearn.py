"""Tests for CLIP zero-shot class unlearning on the bundled demo CLIP (offline), and its benchmark
(benchmarks/clip.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import replace

import pytest
import torch

from benchmarks._common import write_results
from benchmarks.clip import (
    DEMO_SHAPE_TEMPLATES,
    ClipBenchmarkConfig,
    acceptance,
    load_clip_model,
    load_demo_data,
    main,
    render_demo_split,
    results_markdown,
    run_clip_benchmark,
    summarize,
)
from munba_diffusion.bargaining import get_combiner
from munba_diffusion.classifiers import clip_unlearn
from munba_diffusion.classifiers.clip_unlearn import (
    ClipUnlearnConfig,
    ZeroShotTask,
    evaluate_clip_unlearning,
    player_losses,
    prepare_trainable,
    split_forget_retain,
    unlearn_clip,
)
from munba_diffusion.demo import SHAPES
from munba_diffusion.step import BargainedUpdate, NonFiniteGradientError, gram_matrix, player_gradients

CIRCLE = [SHAPES.index("circle")]


@pytest.fixture(scope="module")
def demo():
    """The demo CLIP (float32), its processor and a small render set (8 / 6 images per shape-colour pair)."""
    model, processor = load_clip_model("munba-demo", "float32", "cpu")
    data = load_demo_data(processor, DEMO_SHAPE_TEMPLATES, train_per_pair=8, test_per_pair=6)
    return model, processor, data


def _batch(data, shape_id: int, size: int = 8):
    return data.train.subset(torch.nonzero(data.train.labels == shape_id).flatten()[:size])


@pytest.mark.parametrize("adapter", ["lora", "direct"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_clip_gets_a_finite_bargained_step(demo, dtype, adapter) -> None:
    model, processor, data = demo
    half = copy.deepcopy(model).to(dtype)
    params = prepare_trainable(half, ClipUnlearnConfig(params="all-attention", adapter=adapter))
    assert params and all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]

    forget = _batch(data, CIRCLE[0])
    forget.labels = (forget.labels + 1) % len(SHAPES)
    losses = player_losses(half, processor.tokenizer, data.task, _batch(data, 1), forget)
    assert all(loss.dtype == torch.float32 for loss in losses.values())
    per_player = {
        name: player_gradients(loss, params, retain_graph=name == "preserve") for name, loss in losses.items()
    }
    gram = gram_matrix(list(per_player.values()))
    assert gram.dtype == torch.float64 and torch.isfinite(gram).all() and (gram.diagonal() > 0).all()

    update = BargainedUpdate(params, get_combiner("nash"))
    update.accumulate_gradients(per_player, {k: float(v.detach()) for k, v in losses.items()})
    diagnostics = update.write_gradients()
    assert all(w > 0 for w in diagnostics.weights)
    torch.optim.SGD(params, lr=0.01).step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    frozen = half.vision_model.embeddings.patch_embedding.weight
    assert frozen.dtype == dtype and not frozen.requires_grad


def test_non_finite_gradients_raise_or_skip(demo) -> None:
    model, processor, data = demo
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.logit_scale.fill_(100.0)  # exp(100) overflows float32: infinite logits, NaN losses and gradients
    config = ClipUnlearnConfig(method="munba", adapter="direct", steps=2, batch_size=8)
    with pytest.raises(NonFiniteGradientError, match="not finite"):
        unlearn_clip(broken, processor.tokenizer, data.task, data.train, CIRCLE, config)

    for method in ("munba", "rl"):
        skipped, record = unlearn_clip(
            broken,
            processor.tokenizer,
            data.task,
            data.train,
            CIRCLE,
            replace(config, method=method, nonfinite_gradients="skip"),
        )
        assert record["skipped_steps"] == 2
        for name, param in skipped.text_model.named_parameters():
            assert torch.equal(param, broken.text_model.get_parameter(name)), name


def test_unknown_class_is_a_one_line_error_naming_the_labels(demo) -> None:
    _, _, data = demo
    with pytest.raises(ValueError) as error:
        data.task.class_ids(["circle", "hexagon"])
    message = str(error.value)
    assert "\n" not in message and "'hexagon'" in message and "circle, square, triangle, cross" in message
    assert data.task.class_ids(["cross", "circle"]) == [3, 0]


def test_munba_follows_the_nonfinite_policy_for_one_nan_player(demo, monkeypatch) -> None:
    model, processor, data = demo

    def nan_forget_loss(*args, **kwargs):
        losses = player_losses(*args, **kwargs)
        losses["forget"] = losses["forget"] * float("nan")
        return losses

    monkeypatch.setattr(clip_unlearn, "player_losses", nan_forget_loss)
    config = ClipUnlearnConfig(method="munba", adapter="direct", steps=2, batch_size=4)
    with pytest.raises(NonFiniteGradientError) as error:
        unlearn_clip(model, processor.tokenizer, data.task, data.train, CIRCLE, config)
    assert error.value.players == ["forget"]
    skipped, record = unlearn_clip(
        model, processor.tokenizer, data.task, data.train, CIRCLE, replace(config, nonfinite_gradients="skip")
    )
    assert record["skipped_steps"] == 2 and "mean_weights" not in record
    assert all(torch.equal(p, q) for p, q in zip(skipped.parameters(), model.parameters()))


BAD_OPTIONS = [
    ("method", "ga"),
    ("combiner", "median"),
    ("params", "mlp"),
    ("adapter", "ia3"),
    ("lora_rank", 0),
    ("lora_alpha", 0.0),
    ("steps", 0),
    ("batch_size", 0),
    ("lr", 0.0),
    ("momentum", 1.0),
    ("weight_decay", -1e-4),
    ("max_grad_norm", 0.0),
    ("nonfinite_gradients", "ignore"),
]


@pytest.mark.parametrize(("field", "value"), BAD_OPTIONS)
def test_every_config_rule_is_a_one_line_error_naming_the_field(field, value) -> None:
    with pytest.raises(ValueError) as error:
        ClipUnlearnConfig(**{field: value})
    message = str(error.value)
    assert message.startswith(f"{field} (--{field})") and repr(value) in message and "\n" not in message


def test_every_config_field_has_a_rule_tested() -> None:
    assert {f.name for f in dataclasses.fields(ClipUnlearnConfig)} == {field for field, _ in BAD_OPTIONS}


def test_templates_need_a_label_slot() -> None:
    with pytest.raises(ValueError, match="lack '{label}'"):
        ZeroShotTask(("a", "b"), ("a photo of a thing",))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--forget", "hexagon"], "valid labels: circle, square, triangle, cross"),
        (["--methods", "munba", "salun"], "methods (--methods) must be one of ft, rl, munba; got 'salun'"),
        (["--params", "vision"], "params (--params) must be one of text-attention"),
        (["--dtype", "float8"], "dtype (--dtype) must be one of float32, float16, bfloat16; got 'float8'"),
        (["--templates", "a photo"], "lack '{label}'"),
        (["--lora_rank", "0"], "lora_rank (--lora_rank) must be >= 1"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(arguments, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--seeds", "0", "--steps", "1", "--quiet", "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage line, if any
    assert error.startswith("munba-unlearn-clip: error:") and message in error
    assert not (tmp_path / "out").exists()


def test_munba_forgets_the_class_and_keeps_the_others(demo) -> None:
    model, processor, data = demo
    before = evaluate_clip_unlearning(model, processor.tokenizer, data.task, data.test, CIRCLE, data.heldout)
    config = ClipUnlearnConfig(method="munba", params="text-attention", adapter="direct", steps=8, batch_size=16)
    unlearned, record = unlearn_clip(model, processor.tokenizer, data.task, data.train, CIRCLE, config, seed=0)
    after = evaluate_clip_unlearning(unlearned, processor.tokenizer, data.task, data.test, CIRCLE, data.heldout)

    assert before["forget_acc"] > 80
    forget_drop = before["forget_acc"] - after["forget_acc"]
    retain_drop = before["retain_acc"] - after["retain_acc"]
    assert forget_drop > retain_drop + 50
    assert after["forget_acc"] <= 25.0
    assert record["skipped_steps"] == 0 and all(w > 0 for w in record["mean_weights"])
    for name, param in unlearned.vision_model.named_parameters():  # only the text tower's attention trained
        assert torch.equal(param, model.vision_model.get_parameter(name)), name


def test_munba_with_the_sum_combiner_is_random_labelling(demo) -> None:
    model, processor, data = demo
    config = ClipUnlearnConfig(method="rl", params="text-attention", adapter="lora", steps=3, batch_size=8)
    rl, _ = unlearn_clip(model, processor.tokenizer, data.task, data.train, CIRCLE, config, seed=1)
    summed, _ = unlearn_clip(
        model,
        processor.tokenizer,
        data.task,
        data.train,
        CIRCLE,
        replace(config, method="munba", combiner="sum"),
        seed=1,
    )
    nash, _ = unlearn_clip(
        model, processor.tokenizer, data.task, data.train, CIRCLE, replace(config, method="munba"), seed=1
    )
    lora = [name for name, _ in rl.named_parameters() if "lora_B" in name]
    assert lora and all(name.startswith("text_model.") for name in lora)
    for name in lora:
        assert torch.allclose(rl.get_parameter(name), summed.get_parameter(name), atol=1e-6), name
    assert any(not torch.allclose(rl.get_parameter(n), nash.get_parameter(n), atol=1e-4) for n in lora)


def test_several_classes_can_be_forgotten_but_not_all() -> None:
    forget, retain = split_forget_retain(torch.tensor([0, 1, 2, 3, 0, 2]), [0, 2])
    assert forget.tolist() == [0, 2, 4, 5] and retain.tolist() == [1, 3]
    with pytest.raises(ValueError, match="both forgotten and retained"):
        split_forget_retain(torch.tensor([0, 1, 0]), [0, 1])


def test_demo_renders_are_balanced_and_seeded() -> None:
    images, shapes, colours = render_demo_split(2, seed=5)
    again, _, _ = render_demo_split(2, seed=5)
    assert len(images) == 32
    assert torch.bincount(shapes).tolist() == [8] * 4 and torch.bincount(colours).tolist() == [8] * 4
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    assert images[0].tobytes() != render_demo_split(2, seed=6)[0][0].tobytes()


def test_summary_and_acceptance_on_constructed_runs() -> None:
    runs = [
        {
            "setting": None,
            "method": "original",
            "seed": None,
            "forget_acc": 90.0,
            "retain_acc": 90.0,
            "heldout_acc": 100.0,
            "time_s": None,
        },
        *(
            {
                "setting": "s",
                "method": "munba",
                "seed": seed,
                "forget_acc": f,
                "retain_acc": r,
                "heldout_acc": 96.0,
                "time_s": 1.0,
            }
            for seed, f, r in [(0, 10.0, 86.0), (1, 30.0, 82.0)]
        ),
    ]
    summary = summarize(runs)
    assert summary["s"]["munba"]["forget_acc"] == {"mean": 20.0, "std": 10.0, "n": 2}
    assert summary["s"]["original"]["retain_acc"]["mean"] == 90.0 and "time_s" not in summary["s"]["original"]
    assert acceptance(summary["s"], "munba", chance=25.0) == {
        "forget_at_most_chance": True,
        "retain_acc_within_5": False,
        "heldout_acc_within_5": True,
    }


def test_benchmark_on_an_image_folder_writes_reports(demo, tmp_path, monkeypatch) -> None:
    """The ``datasets`` code path, offline: image folders (class = sub-folder) for the task and the held-out task."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    images, shapes, colours = render_demo_split(2, seed=3)
    for split in ("train", "test"):
        for index, (image, shape, colour) in enumerate(zip(images, shapes, colours)):
            shape_name = "round_shape" if SHAPES[shape] == "circle" else SHAPES[shape]  # '_' reads as a space
            for root, name in (("shapes", shape_name), ("colours", ("red", "green", "blue", "yellow")[colour])):
                folder = tmp_path / root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{index}.png")
    config = ClipBenchmarkConfig(
        dataset=str(tmp_path / "shapes"),
        forget=("round shape",),
        templates=("a {label}",),
        heldout_dataset=str(tmp_path / "colours"),
        heldout_templates=("a {label} object",),
        params=("text-attention",),
        adapters=("lora",),
        seeds=(0,),
        steps=2,
        batch_size=4,
    )
    results = run_clip_benchmark(config, progress=False)
    protocol = results["protocol"]
    assert protocol["classes"] == ["cross", "round shape", "square", "triangle"] and protocol["forget_ids"] == [1]
    assert protocol["heldout"]["size"] == 32 and protocol["test_size"] == 32
    assert list(results["summary"]["text-attention/lora"]) == ["original", "ft", "rl", "munba"]

    out = tmp_path / "report"
    assert protocol["unlearn"]["steps"] == 2 and "method" not in protocol["unlearn"]
    assert config.unlearn_config("ft", "text-attention", "lora") == ClipUnlearnConfig(
        method="ft", params="text-attention", adapter="lora", steps=2, batch_size=4
    )

    out = tmp_path / "report"
    paths = write_results(out, results, results_markdown)
    assert json.loads(paths[0].read_text())["protocol"]["forget"] == ["round shape"]
    table = paths[1].read_text()
    assert "| munba (nash) |" in table and "Held-out acc (" in table and "munba acceptance" in table
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_results(out, results, results_markdown)
